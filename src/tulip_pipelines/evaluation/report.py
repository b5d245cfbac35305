"""The retrieval report: a Markdown table, a bar chart of recall@1, and their MLflow logging."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

logger = logging.getLogger(__name__)


def report_markdown(metrics: pd.DataFrame, issues: pd.DataFrame | None = None) -> str:
    """One row per benchmark and model, columns ``I2T R@k`` / ``T2I R@k`` (recall in percent);
    below it, the number of queries per benchmark and the entries left out, by reason."""
    if metrics.empty:
        return ("# Retrieval\n\nNo benchmark was found, so nothing was scored "
                "(the log names the paths).\n")
    wide = metrics.pivot_table(
        index=["benchmark", "model"], columns=["direction", "k"], values="recall", sort=False)
    wide.columns = [f"{d.upper()} R@{k}" for d, k in wide.columns]
    lines = [
        "# Retrieval",
        "",
        "Recall@k in percent; image features from each model's own image tower.",
        "",
        wide.reset_index().to_markdown(index=False, floatfmt=".1f"),
        "",
        "## Benchmarks",
        "",
    ]
    for bench, group in metrics.groupby("benchmark", sort=False):
        n = group.groupby("direction")["n_queries"].first()
        left_out = ""
        if issues is not None and not issues.empty:
            counts = issues[issues["benchmark"] == bench]["reason"].value_counts()
            left_out = ", ".join(f"{c} {r}" for r, c in counts.items())
        lines.append(f"- {bench}: {n.get('i2t', 0)} image queries, {n.get('t2i', 0)} text queries; "
                     f"left out: {left_out or 'none'}")
    return "\n".join(lines) + "\n"


def report_figure(metrics: pd.DataFrame, k: int = 1) -> plt.Figure:
    """Grouped bars of recall@k per model, one panel per benchmark and direction."""
    data = metrics[metrics["k"] == k]
    panels = list(dict.fromkeys(zip(data["benchmark"], data["direction"])))
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3.6), squeeze=False
    )
    for ax, (bench, direction) in zip(axes[0], panels):
        part = data[(data["benchmark"] == bench) & (data["direction"] == direction)]
        bars = ax.bar(range(len(part)), part["recall"], color=plt.cm.tab10.colors[: len(part)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(part)), part["model"], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{bench} {direction} R@{k}", fontsize=9)
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("recall (%)")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no benchmark found", ha="center", va="center")
    fig.tight_layout()
    return fig


def log_to_mlflow(
    tracker, metrics: pd.DataFrame, report: str, figure: plt.Figure, issues: pd.DataFrame
) -> None:
    """Log ``recall/<benchmark>/<model>/<direction>_r<k>`` and the report files into the
    tracker's run (:class:`tulip_pipelines.tracking.StageTracker`; nothing without a run)."""
    if not tracker.run_id:
        return
    names = [f"recall/{r.benchmark}/{r.model}/{r.direction}_r{r.k}" for r in metrics.itertuples()]
    tracker.log(dict(zip(names, metrics["recall"])), step=0)
    client = tracker.client
    client.log_text(tracker.run_id, report, "retrieval_report.md")
    tracker.log_figure(figure, "retrieval_report.png")
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in (("retrieval_metrics", metrics), ("benchmark_issues", issues)):
            path = Path(tmp) / f"{name}.parquet"
            frame.to_parquet(path, index=False)
            client.log_artifact(tracker.run_id, str(path))
    logger.info("logged %d recall metrics to MLflow run %s", len(metrics), tracker.run_id)
