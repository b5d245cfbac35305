"""Compare MLflow runs of this project: ``tulip-compare`` (``python -m tulip_pipelines.compare``).

Reads runs from the tracking store with :func:`mlflow.search_runs` and writes, for the selected
runs, one table with the parameters that differ between them, their final losses, every recall
figure and, for a run that exported a model, where its model card is, as Markdown and CSV, plus
a bar chart of recall@1 per run. Nothing here needs Kedro.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "tulip_pipelines"
RUN_COLUMNS = ["run_id", "tags.mlflow.runName", "start_time", "status"]
# Metrics worth putting side by side: the recalls (a stage run's own model's ``eval/``, the
# parent run's headline ``long_r1/``; ``final``/``recall/`` of runs logged before them).
METRIC_PREFIXES = ("eval/", "long_r1/", "final", "recall/")
MODEL_CARD_TAG = "tags.tulip.model_card"  # tracking.stage_runs.StageTracker.log_model


@dataclass
class Comparison:
    table: pd.DataFrame
    recall_at_1: pd.DataFrame


def search_runs(tracking_uri: str, experiment: str, max_runs: int, run_name: str | None = None):
    """Runs of ``experiment``, newest first (only those whose name contains ``run_name``, if
    given)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ValueError(
            f"no MLflow experiment named {experiment!r} in {tracking_uri}; run `kedro run` first "
            "or pass --experiment / --tracking-uri"
        )
    runs = mlflow.search_runs(
        experiment_names=[experiment], max_results=max_runs, order_by=["attributes.start_time DESC"]
    )
    if run_name:
        runs = runs[runs["tags.mlflow.runName"].fillna("").str.contains(run_name, regex=False)]
    return runs.reset_index(drop=True)


def compare_runs(runs: pd.DataFrame) -> Comparison:
    """Reduce ``mlflow.search_runs`` output to what differs and what was measured."""
    if runs.empty:
        raise ValueError("no runs to compare")
    params = [c for c in runs.columns if c.startswith("params.")]
    differing = [c for c in params if runs[c].astype(str).nunique(dropna=False) > 1]
    metrics = [
        c
        for c in runs.columns
        if c.startswith("metrics.") and c.removeprefix("metrics.").startswith(METRIC_PREFIXES)
        and runs[c].notna().any()
    ]
    base = [c for c in RUN_COLUMNS if c in runs.columns]
    table = runs[base + differing + sorted(metrics)].copy()
    table.columns = [c.removeprefix("tags.").removeprefix("metrics.") for c in table.columns]
    if MODEL_CARD_TAG in runs.columns and "artifact_uri" in runs.columns:
        cards = [f"{uri}/{card}" if isinstance(card, str) else None
                 for uri, card in zip(runs["artifact_uri"], runs[MODEL_CARD_TAG])]
        table.insert(len(base), "model_card", cards)
    r1 = [c for c in metrics if (c.startswith(("metrics.recall/", "metrics.eval/"))
                                 and c.endswith("_r1")) or c.startswith("metrics.long_r1/")]
    recall = runs[["run_id"] + r1].copy()
    recall.columns = ["run_id"] + [c.removeprefix("metrics.").removeprefix("recall/")
                                   for c in r1]
    return Comparison(table=table, recall_at_1=recall)


def plot_recall_at_1(recall: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = recall.set_index("run_id").T
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(data) + 3), 4.5))
    if data.empty:
        ax.text(0.5, 0.5, "no recall metrics in these runs", ha="center", va="center")
    else:
        data.columns = [c[:8] for c in data.columns]
        data.plot.bar(ax=ax)
        ax.set_ylabel("recall@1 (%)")
        ax.set_xlabel("benchmark/model/direction")
        ax.legend(title="run", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "run_comparison.csv",
        "markdown": out_dir / "run_comparison.md",
        "plot": out_dir / "run_comparison_recall_at_1.png",
    }
    comparison.table.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(comparison.table.to_markdown(index=False, floatfmt=".4g") + "\n")
    plot_recall_at_1(comparison.recall_at_1, paths["plot"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--max-runs", type=int, default=10)
    parser.add_argument("--run-name", default=None, help="only runs whose name contains this")
    parser.add_argument("--out", type=Path, default=Path("data/08_reporting/compare"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    runs = search_runs(args.tracking_uri, args.experiment, args.max_runs, args.run_name)
    comparison = compare_runs(runs)
    paths = write_comparison(comparison, args.out)
    logger.info("compared %d runs; wrote %s", len(runs), ", ".join(str(p) for p in paths.values()))
    print(paths["markdown"].read_text())  # noqa: T201 - a CLI prints its result
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
