"""Zero-shot classification (no Kedro): what a long-text model keeps of CLIP's short-text skill.

A benchmark is an image folder, ``<root>/<class>/<image>`` (``format: imagefolder``); class names
are the folder names, or come from a mapping file (a JSON object ``{folder: class name}``). Each
model's classifier is open_clip's: every class name in every prompt template, encoded by the
model's own text tower and averaged (``open_clip.zero_shot_classifier``); the templates default to
open_clip's ImageNet ones (``OPENAI_IMAGENET_TEMPLATES``). Top-k accuracy comes with the same 95%
bootstrap interval as recall (over images).

Nothing is dropped silently: a class folder without images stays a candidate label and is
reported (``class_without_images``), a file that is not an image is reported (``not_an_image``),
an image that cannot be decoded is left out and reported (``unreadable_image``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from tulip_pipelines.evaluation.benchmark import (
    ISSUE_COLUMNS,
    BenchmarkIssue,
    BenchmarkMissing,
    IssueReason,
)
from tulip_pipelines.evaluation.encode import encode_images, image_tower_key
from tulip_pipelines.evaluation.metrics import bootstrap_interval
from tulip_pipelines.models.device import inference_autocast, on_device, worker_devices
from tulip_pipelines.models.spec import ModelBundle

if TYPE_CHECKING:
    from tulip_pipelines.evaluation.evaluate import EvaluateParams

logger = logging.getLogger(__name__)

CLASSIFICATION_FORMATS = ("imagefolder",)  # scored by zero-shot classification, not retrieval

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASSIFICATION_COLUMNS = ["benchmark", "model", "k", "accuracy", "n_images", "n_classes",
                          "ci_low", "ci_high"]


@dataclass
class ClassificationBenchmark:
    """Images, their class index, the class names (in label order) and the entries left out."""

    name: str
    image_paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    issues: list[BenchmarkIssue] = field(default_factory=list)
    templates: list[str] | None = None  # None: open_clip's ImageNet templates

    def issues_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"benchmark": [self.name] * len(self.issues),
                             "item": [i.item for i in self.issues],
                             "reason": [i.reason.value for i in self.issues],
                             "detail": [i.detail for i in self.issues]},
                            columns=["benchmark", "item", "reason", "detail"])


def default_templates() -> list[Any]:
    """open_clip's ImageNet prompt templates (callables of the class name)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def read_imagefolder(root: str | Path, name: str = "imagefolder", classes: str | None = None,
                     templates: Sequence[str] | None = None) -> ClassificationBenchmark:
    """``<root>/<class folder>/<image>``, classes in sorted folder order; ``classes``: a JSON
    mapping file ``{folder: class name}`` (relative to ``root`` or absolute) whose folders are the
    classes, in its order. ``templates``: format strings with ``{}`` for the class name."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkMissing(name, root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        mapping_path = root / classes
        if not mapping_path.is_file():
            raise BenchmarkMissing(name, mapping_path)
        mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
        if not isinstance(mapping, dict) or not all(
                isinstance(v, str) and v.strip() for v in mapping.values()):
            raise ValueError(f"{mapping_path}: expected a JSON object {{folder: class name}} of "
                             "non-empty strings")
        unmapped = sorted(set(folders) - set(mapping))
        if unmapped:
            raise ValueError(f"{mapping_path}: class folder(s) {unmapped} under {root} have no "
                             f"class name; it maps {sorted(mapping)}")
        names = {folder: label.strip() for folder, label in mapping.items()}
    else:
        names = {folder: folder for folder in folders}
    if not names:
        raise ValueError(f"{name}: {root} holds no class folder (<root>/<class>/<image>)")
    paths, labels, issues = [], [], []
    for label, folder in enumerate(names):
        directory = root / folder
        files = sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        issues += [BenchmarkIssue(f"{folder}/{p.name}", IssueReason.NOT_AN_IMAGE,
                                  f"suffix {p.suffix!r} is not one of {list(IMAGE_SUFFIXES)}")
                   for p in files if p not in images and not p.name.startswith(".")]
        if not images:
            issues.append(BenchmarkIssue(folder, IssueReason.CLASS_WITHOUT_IMAGES,
                                         f"class {names[folder]!r}: no image under {directory}; "
                                         "still a candidate label"))
        paths += [str(p.resolve()) for p in images]
        labels += [label] * len(images)
    return ClassificationBenchmark(name, paths, np.asarray(labels, dtype=np.int64),
                                   list(names.values()), issues,
                                   list(templates) if templates is not None else None)


def check_templates(where: str, templates: Any) -> None:
    """A template list: non-empty strings, each with one ``{}`` for the class name."""
    if templates is None:
        return
    if not isinstance(templates, (list, tuple)) or not templates or not all(
            isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError(f"{where}.templates must be null (open_clip's ImageNet templates) or a "
                         "list of strings with one '{}' for the class name, e.g. "
                         f"['a photo of a {{}}.'], got {templates!r}")


def classify(models: Mapping[str, ModelBundle], bench: ClassificationBenchmark,
             ks: Sequence[int], batch_size: int, device: torch.device,
             autocast: str | None, resamples: int, seed: int
             ) -> tuple[list[tuple], ClassificationBenchmark]:
    """Top-k accuracy rows (:data:`CLASSIFICATION_COLUMNS`) of every model on ``bench``; image
    features are encoded once per distinct image tower. Returns the rows and the benchmark with
    its unreadable images recorded."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    templates = bench.templates or default_templates()
    towers: dict[str, torch.Tensor] = {}
    unreadable: dict[int, str] = {}
    rows = []
    for model_name, bundle in models.items():
        key = image_tower_key(bundle)
        if key not in towers:
            towers[key] = encode_images(bundle, bench.image_paths, batch_size,
                                        desc=f"{bench.name}/{model_name} images",
                                        unreadable=unreadable, device=device, autocast=autocast)
        readable = torch.tensor([i not in unreadable for i in range(len(bench.image_paths))])
        model = bundle.model.eval()
        with on_device(model, device), inference_autocast(device, autocast):
            weights = build_zero_shot_classifier(model, bundle.tokenizer, bench.class_names,
                                                 templates, num_classes_per_batch=10,
                                                 device=device).float().cpu()
        logits = towers[key][readable] @ weights
        labels = torch.as_tensor(bench.labels)[readable]
        order = logits.argsort(dim=1, descending=True)
        for k in ks:
            if k > len(bench.class_names):
                continue
            hits = (order[:, :k] == labels[:, None]).any(dim=1).numpy()
            low, high = bootstrap_interval(hits, resamples, seed)
            rows.append((bench.name, model_name, int(k), 100.0 * float(hits.mean()) if len(hits)
                         else float("nan"), int(len(hits)), len(bench.class_names), low, high))
    issues = bench.issues + [
        BenchmarkIssue(bench.image_paths[i], IssueReason.UNREADABLE_IMAGE, error)
        for i, error in sorted(unreadable.items())]
    return rows, ClassificationBenchmark(bench.name, bench.image_paths, bench.labels,
                                         bench.class_names, issues, bench.templates)


def classification_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CLASSIFICATION_COLUMNS).astype(
        {"k": "int64", "n_images": "int64", "n_classes": "int64", "accuracy": "float64"})


def classification_markdown(metrics: pd.DataFrame) -> str:
    """One row per benchmark and model; a column per top-k (accuracy [95% interval])."""
    cells = [f"{a:.1f} [{lo:.1f}, {hi:.1f}]" if np.isfinite(lo) else f"{a:.1f}"
             for a, lo, hi in metrics[["accuracy", "ci_low", "ci_high"]].to_numpy()]
    wide = metrics.assign(cell=cells).pivot_table(index=["benchmark", "model"], columns="k",
                                                  values="cell", aggfunc="first", sort=False)
    wide.columns = [f"top-{k}" for k in wide.columns]
    return wide.reset_index().to_markdown(index=False)


def load_classification_benchmarks(params: EvaluateParams) -> dict[str, ClassificationBenchmark]:
    """Every configured ``imagefolder`` benchmark that is present (one whose folder is absent is
    skipped with a log line naming the path)."""
    out = {}
    for name, entry in params.benchmarks.items():
        if entry.format not in CLASSIFICATION_FORMATS:
            continue
        try:
            bench = read_imagefolder(entry.root, name=name, **entry.options)
        except BenchmarkMissing as err:
            logger.warning("skipping %s: %s not found", name, err.path)
            continue
        logger.info("benchmark %s (zero-shot classification): %d images in %d classes; %d "
                    "entries reported", name, len(bench.image_paths), len(bench.class_names),
                    len(bench.issues))
        for issue in bench.issues[:5]:
            logger.warning("%s: %s (%s: %s)", name, issue.item, issue.reason.value, issue.detail)
        if not bench.image_paths:
            logger.warning("skipping %s: no image under %s", name, entry.root)
            continue
        out[name] = bench
    return out


def score_classification(models: Mapping[str, ModelBundle],
                         benchmarks: Mapping[str, ClassificationBenchmark],
                         params: EvaluateParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top-k zero-shot accuracy (percent, with its 95% bootstrap interval over images) of every
    model on every classification benchmark, and the entries left out or reported."""
    device = worker_devices(params.device, 1)[0]
    rows, issues = [], []
    for bench in benchmarks.values():
        bench_rows, scored = classify(models, bench, params.top_k, params.batch_size, device,
                                      params.autocast, params.bootstrap_resamples,
                                      params.bootstrap_seed)
        rows += bench_rows
        issues.append(scored.issues_frame())
    frames = [f for f in issues if len(f)]
    return (classification_frame(rows),
            pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=ISSUE_COLUMNS))
