"""The retrieval report: a Markdown table (recall@k with its 95% interval, then R@1 against the
tokens read and by caption length), a bar chart of recall@1 with error bars, a line chart of R@1
against the tokens read, and their MLflow logging."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

logger = logging.getLogger(__name__)


def _with_interval(metrics: pd.DataFrame) -> pd.Series:
    """``recall [ci_low, ci_high]`` as text (the recall alone where there is no interval)."""
    if not {"ci_low", "ci_high"} <= set(metrics.columns):
        return metrics["recall"].map("{:.1f}".format)
    return pd.Series([f"{r:.1f} [{lo:.1f}, {hi:.1f}]" if np.isfinite(lo) else f"{r:.1f}"
                      for r, lo, hi in metrics[["recall", "ci_low", "ci_high"]].to_numpy()],
                     index=metrics.index)


def report_markdown(metrics: pd.DataFrame, issues: pd.DataFrame | None = None,
                    by_tokens_read: pd.DataFrame | None = None,
                    by_caption_length: pd.DataFrame | None = None,
                    classification: pd.DataFrame | None = None,
                    classification_issues: pd.DataFrame | None = None) -> str:
    """One row per benchmark and model, columns ``I2T R@k`` / ``T2I R@k`` (recall in percent and
    its 95% bootstrap interval); below it, the number of queries per benchmark and the entries
    left out, by reason; then R@1 against the tokens read and R@1 by caption length; then the
    zero-shot classification's top-k accuracy of every model (``classification``)."""
    zero_shot = classification_section(classification, classification_issues)
    if metrics.empty:
        return ("# Retrieval\n\nNo benchmark was found, so nothing was scored "
                "(the log names the paths).\n" + zero_shot)
    wide = metrics.assign(cell=_with_interval(metrics)).pivot_table(
        index=["benchmark", "model"], columns=["direction", "k"], values="cell", sort=False,
        aggfunc="first")
    wide.columns = [f"{d.upper()} R@{k}" for d, k in wide.columns]
    lines = [
        "# Retrieval",
        "",
        "Recall@k in percent, with its 95% bootstrap interval over queries in brackets; image "
        "features from each model's own image tower.",
        "",
        wide.reset_index().to_markdown(index=False),
        "",
        "## Benchmarks",
        "",
    ]
    for bench, group in metrics.groupby("benchmark", sort=False):
        n = group.groupby("direction")["n_queries"].first()
        lines.append(f"- {bench}: {n.get('i2t', 0)} image queries, {n.get('t2i', 0)} text queries; "
                     f"left out: {_reason_counts(issues, bench)}")
    if issues is not None and (issues["reason"] == "unreadable_image").any():
        lines += ["", "Images that could not be read (unreadable_image) were left out with their "
                  "captions: recall is over the queries that remain (they are listed in "
                  "benchmark_issues and skipped_samples)."]
    if by_tokens_read is not None and not by_tokens_read.empty:
        lines += ["", "## Recall@1 against the tokens read", "",
                  "Captions of the long-caption benchmarks cut at n tokens (start and end token "
                  "included; a model reads at most its context). Flat past a length: nothing "
                  "after it is used.", "", tokens_read_markdown(by_tokens_read)]
    if by_caption_length is not None and not by_caption_length.empty:
        lines += ["", "## Recall@1 by caption length", "",
                  "Queries binned at the quantiles of their caption's token count (an image by its "
                  "longest caption); each column gives the tokens of its bin and its queries."]
        for bench, group in by_caption_length.groupby("benchmark", sort=False):
            lines += ["", f"### {bench}", "", caption_length_markdown(group)]
    return "\n".join(lines) + "\n" + zero_shot


def classification_section(classification: pd.DataFrame | None,
                           issues: pd.DataFrame | None = None) -> str:
    """The zero-shot classification table and its benchmarks' reported entries ('' without
    classification benchmarks)."""
    if classification is None or classification.empty:
        return ""
    from tulip_pipelines.evaluation.classification import classification_markdown

    lines = ["", "# Zero-shot classification", "",
             "Top-k accuracy in percent, with its 95% bootstrap interval over images in "
             "brackets: every class name in every prompt template, averaged per class (open_clip's "
             "zero-shot classifier); what a long-text model keeps of CLIP's short-text skill.",
             "", classification_markdown(classification), ""]
    for bench, group in classification.groupby("benchmark", sort=False):
        lines.append(f"- {bench}: {int(group['n_images'].iloc[0])} images, "
                     f"{int(group['n_classes'].iloc[0])} classes; reported: "
                     f"{_reason_counts(issues, bench)}")
    return "\n".join(lines) + "\n"


def tokens_read_markdown(by_tokens_read: pd.DataFrame) -> str:
    """One row per benchmark, model and direction; one column per cut."""
    wide = by_tokens_read.pivot_table(index=["benchmark", "model", "direction"], columns="tokens",
                                      values="recall", sort=False)
    wide.columns = [f"{n} tok" for n in wide.columns]
    return wide.reset_index().to_markdown(index=False, floatfmt=".1f")


def caption_length_markdown(by_caption_length: pd.DataFrame) -> str:
    """One benchmark: one row per model and direction; one column per length bin, headed by the
    token range and the number of its text queries (the captions)."""
    labels: dict[int, str] = {}
    for row in by_caption_length.sort_values("direction", ascending=False).itertuples():
        labels.setdefault(row.bin, f"Q{row.bin}: {row.min_tokens}-{row.max_tokens} tok "
                                   f"(n={row.n_queries})")
    wide = by_caption_length.pivot_table(index=["model", "direction"], columns="bin",
                                         values="recall", sort=False).sort_index(axis=1)
    wide.columns = [labels[b] for b in wide.columns]
    # a bin without queries of a direction (images binned by their longest caption): "-"
    return wide.reset_index().to_markdown(index=False, floatfmt=".1f", missingval="-")


def report_figure(metrics: pd.DataFrame, k: int = 1) -> plt.Figure:
    """Grouped bars of recall@k per model, one panel per benchmark and direction; error bars:
    the 95% bootstrap interval (when ``metrics`` has ``ci_low``/``ci_high``)."""
    data = metrics[metrics["k"] == k]
    panels = list(dict.fromkeys(zip(data["benchmark"], data["direction"])))
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3.6), squeeze=False
    )
    for ax, (bench, direction) in zip(axes[0], panels):
        part = data[(data["benchmark"] == bench) & (data["direction"] == direction)]
        errors, tops = None, part["recall"]
        if {"ci_low", "ci_high"} <= set(part.columns) and part["ci_low"].notna().all():
            errors = np.vstack([part["recall"] - part["ci_low"], part["ci_high"] - part["recall"]])
            tops = part["ci_high"]
        ax.bar(range(len(part)), part["recall"], color=plt.cm.tab10.colors[: len(part)],
               yerr=errors, capsize=3, error_kw={"elinewidth": 0.8})
        for x, (value, top) in enumerate(zip(part["recall"], tops)):
            ax.text(x, top + 1.5, f"{value:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(part)), part["model"], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{bench} {direction} R@{k}", fontsize=9)
        ax.set_ylim(0, 110)
    axes[0][0].set_ylabel("recall (%)")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no benchmark found", ha="center", va="center")
    fig.tight_layout()
    return fig


def tokens_read_figure(by_tokens_read: pd.DataFrame, context: int = 77) -> plt.Figure:
    """R@1 against the tokens read: one panel per long-caption benchmark and direction, one line
    per model; a dotted line at ``context`` (a CLIP's 77 tokens)."""
    panels = list(dict.fromkeys(zip(by_tokens_read["benchmark"], by_tokens_read["direction"])))
    models = list(dict.fromkeys(by_tokens_read["model"]))
    colors = dict(zip(models, plt.cm.tab10.colors * (len(models) // 10 + 1)))
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False, sharey=True)
    for ax, (bench, direction) in zip(axes[0], panels):
        part = by_tokens_read[(by_tokens_read["benchmark"] == bench)
                              & (by_tokens_read["direction"] == direction)]
        for model, line in part.groupby("model", sort=False):
            ax.plot(line["tokens"], line["recall"], marker="o", markersize=3, linewidth=1.4,
                    color=colors[model], label=model)
        ax.axvline(context, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(sorted(part["tokens"].unique()))
        ax.tick_params(labelsize=7)
        ax.set_title(f"{bench} {direction}", fontsize=9)
        ax.set_xlabel("caption tokens read", fontsize=8)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("R@1 (%)")
    if panels:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    else:
        axes[0][0].text(0.5, 0.5, "no long-caption benchmark found", ha="center", va="center")
    fig.tight_layout()
    return fig


def log_to_mlflow(tracker, metrics: pd.DataFrame, report: str,
                  figures: Mapping[str, plt.Figure], tables: Mapping[str, pd.DataFrame]) -> None:
    """Log the report, ``figures`` (file name -> figure) and the full table with ``tables``
    (name -> table, as Parquet) into the tracker's run (a
    :class:`tulip_pipelines.tracking.stage_runs.StageTracker`; nothing without a run). The
    recalls as metrics go to the runs that trained each model (``eval/...``) and the headline to the
    parent run, where the charts put the models side by side."""
    if not tracker.run_id:
        return
    client = tracker.client
    client.log_text(tracker.run_id, report, "retrieval_report.md")
    for name, figure in figures.items():
        tracker.log_figure(figure, name)
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in {"retrieval_metrics": metrics, **tables}.items():
            path = Path(tmp) / f"{name}.parquet"
            frame.to_parquet(path, index=False)
            client.log_artifact(tracker.run_id, str(path))
    logger.info("logged the retrieval table (%d rows) to MLflow run %s", len(metrics),
                tracker.run_id)


def _reason_counts(issues: pd.DataFrame | None, bench: str) -> str:
    """``"2 unreadable_image, 1 not_an_image"``: a benchmark's issues by reason, or ``none``."""
    if issues is None or issues.empty:
        return "none"
    counts = issues[issues["benchmark"] == bench]["reason"].value_counts()
    return ", ".join(f"{c} {r}" for r, c in counts.items()) or "none"
