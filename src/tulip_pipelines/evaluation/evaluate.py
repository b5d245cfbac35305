"""Score every model on every benchmark, side by side, and render the report."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from tulip_pipelines.evaluation.metrics import retrieval_recall
from tulip_pipelines.evaluation.readers import READERS, BenchmarkMissing, RetrievalBenchmark, read_sharegpt4v
from tulip_pipelines.models.spec import ModelBundle
from tulip_pipelines.training.data import trim_padding

logger = logging.getLogger(__name__)
METRIC_COLUMNS = ["benchmark", "model", "direction", "k", "recall", "n_queries"]


@dataclass
class EvaluateConfig:
    """``params:evaluate``: benchmarks {name: {format, root, kind, ...reader options}}."""

    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 256
    chunk_size: int = 1024
    longclip_keep: int = 20

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "EvaluateConfig":
        params = dict(params or {})
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown evaluate parameter(s) {unknown}")
        cfg = cls(**params)
        for name, spec in cfg.benchmarks.items():
            fmt = spec.get("format")
            if fmt not in (*READERS, "sharegpt4v"):
                raise ValueError(f"benchmark {name}: unknown format {fmt!r}; one of {sorted([*READERS, 'sharegpt4v'])}")
            if fmt != "sharegpt4v" and not spec.get("root"):
                raise ValueError(f"benchmark {name}: `root` (the benchmark folder) is required")
            if spec.get("kind", "long") not in ("long", "short"):
                raise ValueError(f"benchmark {name}: kind must be long or short")
        return cfg


def load_benchmarks(cfg: EvaluateConfig, val_captions: pd.DataFrame | None, image_root: str) -> dict[str, RetrievalBenchmark]:
    """Read every configured benchmark; absent ones are skipped with a log line naming the path."""
    out = {}
    for name, spec in cfg.benchmarks.items():
        options = {k: v for k, v in spec.items() if k not in ("format", "root", "kind")}
        try:
            if spec["format"] == "sharegpt4v":
                bench = read_sharegpt4v(val_captions, image_root, name=name, **options)
            else:
                bench = READERS[spec["format"]](spec["root"], name=name, **options)
        except BenchmarkMissing as err:
            logger.warning("skipping benchmark %s: %s", name, err)
            continue
        for entry, reason in bench.issues[:5]:
            logger.warning("benchmark %s: %s: %s", name, entry, reason)
        logger.info("benchmark %s: %d images, %d texts, %d entries not usable", name,
                    len(bench.image_paths), len(bench.texts), len(bench.issues))
        out[name] = bench
    return out


@torch.no_grad()
def encode(model_bundle: ModelBundle, bench: RetrievalBenchmark, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features with the model's own towers and tokenizer."""
    model = model_bundle.model.eval()
    images, texts = [], []
    for start in range(0, len(bench.image_paths), batch_size):
        batch = []
        for path in bench.image_paths[start : start + batch_size]:
            with Image.open(path) as im:
                batch.append(model_bundle.preprocess(im.convert("RGB")))
        images.append(model.encode_image(torch.stack(batch), normalize=True).float())
    for start in range(0, len(bench.texts), batch_size):
        tokens = trim_padding(model_bundle.tokenizer(bench.texts[start : start + batch_size]))
        texts.append(model.encode_text(tokens, normalize=True).float())
    return torch.cat(images), torch.cat(texts)


def score(models: Mapping[str, ModelBundle], benchmarks: Mapping[str, RetrievalBenchmark],
          ks: Sequence[int] = (1, 5, 10), batch_size: int = 256, chunk_size: int = 1024) -> pd.DataFrame:
    """The ``retrieval_metrics`` table: recall (percent) per benchmark, model, direction and k."""
    rows = []
    jobs = [(b, m) for b in benchmarks for m in models]
    for bench_name, model_name in tqdm(jobs, desc="evaluate", unit="model"):
        bench = benchmarks[bench_name]
        image_features, text_features = encode(models[model_name], bench, batch_size)
        result = retrieval_recall(image_features, text_features, bench.text_to_image, ks, chunk_size)
        for direction in ("i2t", "t2i"):
            for k in ks:
                rows.append((bench_name, model_name, direction, int(k), result[direction][k],
                             result["n_queries"][direction]))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def report_markdown(metrics: pd.DataFrame) -> str:
    """One row per benchmark and model; columns I2T/T2I R@k."""
    if metrics.empty:
        return "No benchmark was found, so nothing was scored (see the log for the paths).\n"
    wide = metrics.pivot_table(index=["benchmark", "model"], columns=["direction", "k"], values="recall", sort=False)
    wide.columns = [f"{d.upper()} R@{k}" for d, k in wide.columns]
    return "Recall (%) of image-text retrieval.\n\n" + wide.reset_index().to_markdown(index=False, floatfmt=".1f") + "\n"


def report_figure(metrics: pd.DataFrame, k: int = 1):
    """Bar chart of recall@k per benchmark, model and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = metrics[metrics["k"] == k]
    benchmarks = list(dict.fromkeys(data["benchmark"]))
    fig, axes = plt.subplots(1, max(1, len(benchmarks)), figsize=(5 * max(1, len(benchmarks)), 4), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks):
        table = data[data["benchmark"] == bench].pivot(index="model", columns="direction", values="recall")
        table = table.reindex(list(dict.fromkeys(data[data["benchmark"] == bench]["model"])))
        table.plot.bar(ax=ax, rot=30)
        ax.set_title(f"{bench}: R@{k}")
        ax.set_ylabel("recall (%)")
        ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig
