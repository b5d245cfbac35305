"""The model card (``MODEL_CARD.md``) in every model directory.

A card is rendered from the model's :class:`~tulip_pipelines.models.spec.ModelSpec` alone, so
that it always agrees with ``config.json``: ``spec.extra`` holds the provenance a training stage
records (``stage``, ``mlflow_run_id``, the enclosing ``kedro_run_id``, ``parent`` and
``training``: data counts, key parameters, final metrics; see
:func:`tulip_pipelines.training.stages.base.run_stage`).
:func:`~tulip_pipelines.models.files.save_model` writes it with every model; the evaluation
rewrites it with the model's retrieval rows (:func:`add_retrieval`). Loading ignores it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from tulip_pipelines import atomic
from tulip_pipelines.models.spec import ModelSpec

logger = logging.getLogger(__name__)

CARD = "MODEL_CARD.md"

STAGES = {
    "teacher": "a CLIP trained from scratch with a 77-token absolute-position text tower (the "
               "embedded default's teacher)",
    "distill": "TULIP stage 1, relative position distillation: a RoPE student learns the frozen "
               "teacher's text embeddings",
    "expand": "TULIP stage 2, relative position expansion: contrastive fine-tuning of the "
              "distilled student at its full context, on long captions and their first sentence",
    "longclip": "the Long-CLIP baseline: the teacher's positions stretched, then fine-tuned",
    "longclip_authors": "the Long-CLIP baseline with its authors' recipe: the teacher's positions "
                        "stretched (the first rows kept and frozen), fine-tuned with Long-CLIP's "
                        "own loss and optimiser",
    "longclip_equal_budget": "the Long-CLIP baseline at TULIP's stage-2 budget: the teacher's "
                             "positions stretched, fine-tuned with expand's loss, budget and data "
                             "(only the position scheme differs)",
}


def render_model_card(spec: ModelSpec, retrieval: pd.DataFrame | None = None) -> str:
    """The card of a model with this spec; ``retrieval``: its rows of ``retrieval_metrics``
    (columns benchmark, model, direction, k, recall, n_queries[, ci_low, ci_high])."""
    extra = spec.extra
    stage = extra.get("stage")
    title = f"{spec.model_name}, {stage} stage" if stage else spec.model_name
    lines = [f"# Model card: {title}", ""]
    if stage:
        lines += [f"Trained by the `{stage}` stage of tulip_pipelines: "
                  f"{STAGES.get(stage, 'a training stage of this project')}.", ""]
    lines += ["## Architecture", "", _table({
        "open_clip model": spec.model_name,
        "text positions": "RoPE" if spec.kind == "rope" else "learned absolute",
        "context length (tokens)": spec.context_length,
        **({"RoPE base": spec.rope_theta} if spec.kind == "rope" else {}),
        "text activation": spec.activation or "the open_clip config's",
    }), ""]
    lines += ["## Provenance", "", *_provenance(spec), ""]
    training = extra.get("training")
    if training:
        lines += ["## Data", "", *_data(training), ""]
        if training.get("params"):
            lines += ["## Key parameters", "", _table(training["params"]), ""]
        if training.get("final_metrics"):
            lines += ["## Final losses and metrics", "",
                      "The last logged value of each (the end of its curve in the MLflow run).", "",
                      _table({k: f"{v:.4g}" for k, v in training["final_metrics"].items()}), ""]
    lines += ["## Retrieval", "", *_retrieval(retrieval), ""]
    lines += ["## Use", "", "```python", "import tulip_pipelines",
              'model, preprocess, tokenizer = tulip_pipelines.load_model("<this directory>")',
              "```", ""]
    return "\n".join(lines)


def _table(values: Mapping[str, Any]) -> str:
    rows = ["| | |", "|---|---|"]
    rows += [f"| {k} | {_text(v)} |" for k, v in values.items()]
    return "\n".join(rows)


def _text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _provenance(spec: ModelSpec) -> list[str]:
    extra = spec.extra
    out = []
    run_id = extra.get("mlflow_run_id")
    if extra.get("stage"):
        if run_id:
            enclosing = extra.get("kedro_run_id")
            within = f", within the `kedro run` MLflow run `{enclosing}`" if enclosing else ""
            out.append(f"- MLflow run: `{run_id}`{within}; this model is its artifact "
                       f"`runs:/{run_id}/model`.")
        else:
            out.append("- MLflow run: none (trained without tracking).")
    parent = extra.get("parent")
    if parent:
        parent_run = parent.get("mlflow_run_id")
        what = f"the `{parent['stage']}` model" if parent.get("stage") else "the model"
        where = (f"from MLflow run `{parent_run}` (`runs:/{parent_run}/model`)" if parent_run
                 else f"`{parent.get('source')}`, not tracked by this project (no MLflow run)")
        out.append(f"- Parent model: {what} ({parent.get('model_name')}) {where}.")
        out.append(f"- Parent MLflow run: `{parent_run}`." if parent_run
                   else "- Parent MLflow run: none.")
    elif extra.get("stage"):
        out.append("- Parent model: none, trained from scratch. Parent MLflow run: none.")
    else:
        source = extra.get("origin") or extra.get("file") or extra.get("pretrained")
        out.append("- Not trained by a stage of this project (source: "
                   f"{source or 'not recorded'}); no MLflow run.")
    return out


def _data(training: Mapping[str, Any]) -> list[str]:
    records = training.get("records", {})
    out = [_table({f"{role} records": n for role, n in records.items()}), ""]
    steps, batch = training.get("steps"), training.get("global_batch")
    if steps is not None and batch:
        seen = steps * batch
        times = f" ({seen / records['train']:.1f} x the train records)" if records.get("train") \
            else ""
        out.append(f"{steps:,} optimizer steps of {batch:,} samples (global batch): "
                   f"{seen:,} samples seen{times}.")
    if training.get("resumed_from") is not None:
        out.append(f"Resumed from the checkpoint of step {training['resumed_from']:,}.")
    if training.get("skipped_samples"):
        out.append(f"{training['skipped_samples']:,} unreadable samples skipped (listed in the "
                   "run's `skipped_samples.parquet`).")
    images = training.get("images") or {}
    where = images.get("root") or images.get("folder")
    if where:
        out.append(f"Images: the `{images.get('kind')}` source `{where}`.")
    return out


def _retrieval(retrieval: pd.DataFrame | None) -> list[str]:
    if retrieval is None or retrieval.empty:
        return ["Not evaluated yet: the `evaluate` pipeline adds this model's retrieval rows "
                "here (and to `data/08_reporting/retrieval_report.md`)."]
    table = retrieval.copy()
    has_ci = {"ci_low", "ci_high"} <= set(table.columns)
    table["recall"] = [
        f"{r.recall:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}]" if has_ci else f"{r.recall:.1f}"
        for r in table.itertuples()]
    wide = table.pivot_table(index=["benchmark", "model", "direction"], columns="k",
                             values="recall", aggfunc="first", sort=False)
    wide.columns = [f"R@{k}" for k in wide.columns]
    return ["Recall@k in percent" + (", 95% bootstrap interval in brackets" if has_ci else "")
            + " (`model`: its name in the evaluation).", "",
            wide.reset_index().to_markdown(index=False)]


def write_model_card(directory: str | Path, retrieval: pd.DataFrame | None = None) -> Path:
    """(Re)write ``directory/MODEL_CARD.md`` from its ``config.json`` (and ``retrieval`` rows),
    atomically."""
    directory = Path(directory)
    spec = ModelSpec.from_dict(json.loads((directory / "config.json").read_text()))
    path = directory / CARD
    atomic.write_text(path, render_model_card(spec, retrieval))
    return path


def add_retrieval(models: Mapping[str, Any], metrics: pd.DataFrame) -> dict[Path, list[str]]:
    """Rewrite the card of every scored model that was loaded from a model directory with its
    rows of ``metrics`` (``models``: evaluation name -> :class:`ModelBundle`). A directory whose
    ``config.json`` no longer matches the loaded model (replaced since) is left alone. Returns
    the cards written, with the evaluation names they hold."""
    by_dir: dict[Path, list[str]] = {}
    for name, bundle in models.items():
        directory = getattr(bundle, "source_dir", None)
        if directory is None or not (Path(directory) / "config.json").is_file():
            continue
        on_disk = json.loads((Path(directory) / "config.json").read_text())
        if on_disk != json.loads(json.dumps(asdict(bundle.spec))):
            logger.warning("%s: %s changed since it was loaded; its card is left as it is",
                           name, directory)
            continue
        by_dir.setdefault(Path(directory), []).append(name)
    for directory, names in by_dir.items():
        write_model_card(directory, metrics[metrics["model"].isin(names)])
        logger.info("model card %s: retrieval rows of %s", directory / CARD, ", ".join(names))
    return {directory / CARD: names for directory, names in by_dir.items()}
