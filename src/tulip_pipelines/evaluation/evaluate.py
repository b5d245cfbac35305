"""Score every model on every benchmark, side by side (no Kedro).

Each model encodes images with its own image tower and texts with its own tokenizer (the
teacher's truncates at 77 tokens, the long models' at 248, end-of-text kept). Image features are
cached per benchmark and image-tower weights: models that share an image tower (the teacher and
the untrained Long-CLIP stretch, a student distilled with a frozen image tower) encode once, and
the analyses of :mod:`.analysis` (recall against tokens read, by caption length) reuse them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tulip_pipelines.data.images import SKIPPED_COLUMNS, ImageSource
from tulip_pipelines.evaluation import analysis
from tulip_pipelines.evaluation.benchmark import ISSUE_COLUMNS
from tulip_pipelines.evaluation.classification import (
    CLASSIFICATION_FORMATS,
    check_templates,
    read_imagefolder,
)
from tulip_pipelines.evaluation.encode import (
    encode_images,
    encode_tokens,
    image_tower_key,
    tokenize,
)
from tulip_pipelines.evaluation.metrics import (
    RetrievalRanks,
    bootstrap_interval,
    retrieval_ranks,
)
from tulip_pipelines.evaluation.readers import (
    READERS,
    BenchmarkMissing,
    IssueReason,
    RetrievalBenchmark,
    build_dci_long,
    read_sharegpt4v,
)
from tulip_pipelines.models.device import (
    autocast_in_effect,
    check_placement,
    map_on_devices,
    worker_devices,
)
from tulip_pipelines.models.spec import ModelBundle
from tulip_pipelines.params import Params, Problems, is_int

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ["benchmark", "model", "direction", "k", "recall", "n_queries", "ci_low",
                  "ci_high"]
FORMATS = {**READERS, "sharegpt4v": read_sharegpt4v, "imagefolder": read_imagefolder}
# Options of a dci_long entry used to build dci_long.csv from the DCI release (not by the reader).
DCI_BUILD_OPTIONS = ("annotations", "photos_prefix")
_SET_BY_CONFIG = {"root", "name", "kind", "val_captions", "images"}


def _reader_options(fmt: str) -> set[str]:
    extra = set(DCI_BUILD_OPTIONS) if fmt == "dci_long" else set()
    return set(inspect.signature(FORMATS[fmt]).parameters) - _SET_BY_CONFIG | extra


@dataclass
class BenchmarkParams:
    """One entry of ``evaluate.benchmarks``: ``format``, ``root`` (a folder; not for sharegpt4v),
    ``kind`` (long/short) and the reader's own options (e.g. ``karpathy_json`` for flickr30k)."""

    name: str
    format: str
    kind: str = "long"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"evaluate.benchmarks.{self.name}"
        if self.format not in FORMATS:
            raise ValueError(
                f"{where}.format: unknown format {self.format!r}; one of {sorted(FORMATS)}"
            )
        if self.kind not in ("long", "short"):
            raise ValueError(f"{where}.kind must be 'long' or 'short', got {self.kind!r}")
        if self.format != "sharegpt4v" and not self.root:
            raise ValueError(f"{where}.root is required (the benchmark's folder)")
        unknown = sorted(set(self.options) - _reader_options(self.format))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown} for format {self.format}; "
                             f"known: {sorted(_reader_options(self.format))}")
        if self.format == "imagefolder":
            check_templates(where, self.options.get("templates"))

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> "BenchmarkParams":
        if not isinstance(params, Mapping) or "format" not in params:
            raise ValueError(f"evaluate.benchmarks.{name} must be a mapping with a `format`")
        own = {k: params[k] for k in ("format", "kind", "root") if k in params}
        return cls(name, options={k: v for k, v in params.items() if k not in own}, **own)


@dataclass
class EvaluateParams(Params):
    """``params:evaluate``.

    Attributes:
        benchmarks: name -> benchmark entry (see :class:`BenchmarkParams`); an entry set to null
            (e.g. in an environment overlay) removes a benchmark that base configures.
        ks: the k of recall@k.
        batch_size: images / texts per encoding batch.
        chunk_size: queries per similarity chunk in the recall computation.
        num_workers: image-loading worker processes.
        bootstrap_resamples: resamples of the 95% bootstrap interval of every recall (over
            queries, ``ci_low``/``ci_high``).
        bootstrap_seed: the seed of every interval's resampling.
        tokens_read: the cuts (in tokens, start and end token included) at which the captions of
            every long-caption benchmark are encoded again (``recall_by_tokens_read``); [] for
            none.
        caption_length_bins: the number of quantile bins of ``recall_by_caption_length``.
        device: where the models encode (``auto``: the accelerator when one is present, else
            the CPU; or ``cpu``, ``cuda``, ``cuda:1``).
        autocast: the dtype of the encoders' autocast on an accelerator (``bf16``, ``fp16``;
            null: float32); similarities, recall and intervals are float32 whatever it is.
        parallel_models: models encoded at once, each on its own device (null: one per GPU of
            the node with ``device: auto``, else 1).
        top_k: the k of the zero-shot classification's top-k accuracy (``imagefolder``
            benchmarks; a k above a benchmark's number of classes is left out).
    """

    section = "evaluate"

    benchmarks: dict[str, BenchmarkParams] = field(default_factory=dict)
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 64
    chunk_size: int = 1024
    num_workers: int = 0
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    tokens_read: tuple[int, ...] = (20, 40, 77, 120, 160, 200, 248)
    caption_length_bins: int = 4
    device: str = "auto"
    autocast: str | None = "bf16"
    parallel_models: int | None = None
    top_k: tuple[int, ...] = (1, 5)

    def __post_init__(self) -> None:
        self.benchmarks = {
            name: entry if isinstance(entry, BenchmarkParams)
            else BenchmarkParams.from_params(name, entry)
            for name, entry in (self.benchmarks or {}).items() if entry is not None
        }
        self.ks = tuple(self.ks) if isinstance(self.ks, (list, tuple)) else self.ks
        self.top_k = tuple(self.top_k) if isinstance(self.top_k, (list, tuple)) else self.top_k
        if isinstance(self.tokens_read, (list, tuple)):
            self.tokens_read = tuple(self.tokens_read)
        p = Problems(self.section)
        p.check(bool(self.ks) and isinstance(self.ks, tuple) and all(is_int(k, 1) for k in self.ks),
                "ks", f"must be a list of positive integers, got {self.ks!r}")
        p.check(bool(self.top_k) and isinstance(self.top_k, tuple)
                and all(is_int(k, 1) for k in self.top_k),
                "top_k", f"must be a list of positive integers, got {self.top_k!r}")
        p.int_at_least("batch_size", self.batch_size, 1)
        p.int_at_least("chunk_size", self.chunk_size, 1)
        p.int_at_least("num_workers", self.num_workers, 0)
        p.int_at_least("bootstrap_resamples", self.bootstrap_resamples, 1)
        p.int_at_least("bootstrap_seed", self.bootstrap_seed, 0)
        p.check(isinstance(self.tokens_read, tuple) and all(is_int(n, 2) for n in self.tokens_read),
                "tokens_read", "must be a list of integers >= 2 (start and end token included), "
                f"got {self.tokens_read!r}")
        p.int_at_least("caption_length_bins", self.caption_length_bins, 1)
        check_placement(p, "device", self.device, "autocast", self.autocast)
        p.int_at_least("parallel_models", self.parallel_models, 1, optional=True)
        p.raise_if_any()

    def long_benchmarks(self) -> list[str]:
        """The configured benchmarks of long captions (``kind: long``), in their order."""
        return [name for name, bench in self.benchmarks.items() if bench.kind == "long"]


# ---------------------------------------------------------------------------------------------
# Benchmarks


def load_benchmarks(
    params: EvaluateParams, val_captions: pd.DataFrame | None, images: ImageSource | str | Path
) -> dict[str, RetrievalBenchmark]:
    """Read every configured benchmark (``sharegpt4v`` ones read ``val_captions``' images from
    ``images``, the ``prepared_images`` source). One whose files are absent (or that has no
    usable pair) is skipped with a log line naming the path, and gets no rows in the results."""
    out = {}
    for name, entry in params.benchmarks.items():
        if entry.format in CLASSIFICATION_FORMATS:
            continue
        options = {k: v for k, v in entry.options.items() if k not in DCI_BUILD_OPTIONS}
        try:
            if entry.format == "sharegpt4v":
                bench = read_sharegpt4v(val_captions, images, name=name, kind=entry.kind, **options)
            else:
                bench = READERS[entry.format](entry.root, name=name, kind=entry.kind, **options)
        except BenchmarkMissing as err:
            logger.warning("skipping %s: %s not found", name, err.path)
            continue
        bench.log_summary()
        for issue in bench.issues[:5]:
            logger.warning(
                "%s: left out %s (%s: %s)", name, issue.item, issue.reason.value, issue.detail
            )
        if not bench.texts:
            logger.warning(
                "skipping %s: no usable image-text pair under %s", name, entry.root or images
            )
            continue
        out[name] = bench
    return out


def issues_table(benchmarks: Mapping[str, RetrievalBenchmark]) -> pd.DataFrame:
    """Every entry left out of a scored benchmark, with its reason (``benchmark_issues``)."""
    frames = [b.issues_frame() for b in benchmarks.values() if b.issues]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ISSUE_COLUMNS)


def prepare_dci_long(params: EvaluateParams) -> pd.DataFrame:
    """Write ``<root>/dci_long.csv`` for each dci_long entry with ``annotations`` (the folder of
    DCI's per-image JSON files, relative to root) whose CSV does not exist yet; returns a
    summary."""
    rows = []
    for name, entry in params.benchmarks.items():
        if entry.format != "dci_long" or "annotations" not in entry.options:
            continue
        root = Path(entry.root)
        csv_path = root / entry.options.get("csv_name", "dci_long.csv")
        if csv_path.exists():
            logger.info("%s: %s exists, kept as it is", name, csv_path)
            rows.append((name, str(csv_path), "kept", None, None))
            continue
        try:
            frame, without_long = build_dci_long(
                root / entry.options["annotations"], entry.options.get("photos_prefix", "photos"))
        except BenchmarkMissing as err:
            logger.warning("%s: cannot build %s: %s not found", name, csv_path, err.path)
            rows.append((name, str(csv_path), "missing", None, None))
            continue
        frame.to_csv(csv_path, sep="\t", index=False)
        logger.info("%s: wrote %s (%d records; %d without a long caption left out)",
                    name, csv_path, len(frame), without_long)
        rows.append((name, str(csv_path), "written", len(frame), without_long))
    return pd.DataFrame(
        rows, columns=["benchmark", "path", "action", "records", "without_long_caption"]
    )


@dataclass
class Scores:
    """What :func:`score` measures: ``retrieval_metrics``, ``recall_by_tokens_read`` and
    ``recall_by_caption_length`` (recall in percent, 0-100), and the benchmarks as scored (less
    the images that could not be read, with their texts, each recorded as an issue)."""

    metrics: pd.DataFrame
    by_tokens_read: pd.DataFrame
    by_caption_length: pd.DataFrame
    benchmarks: dict[str, RetrievalBenchmark] = field(default_factory=dict)


def _encode_benchmark_images(
    models: Mapping[str, ModelBundle], tower_keys: Mapping[str, str], name: str,
    bench: RetrievalBenchmark, params: EvaluateParams, devices: list[torch.device],
) -> tuple[RetrievalBenchmark, dict[str, torch.Tensor]]:
    """Image features of ``bench`` for every distinct image tower (spread over ``devices``), and
    the benchmark that is scored: an image that any tower could not read is left out with its
    texts (recall is over the queries that remain)."""
    unreadable: dict[int, str] = {}
    in_source = bench.image_source is not None
    towers: dict[str, str] = {}  # each distinct image tower -> the first model that has it
    for model_name in models:
        towers.setdefault(tower_keys[model_name], model_name)

    def encode(key: str, device: torch.device) -> torch.Tensor:
        model_name = towers[key]
        return encode_images(
            models[model_name], bench.image_handles if in_source else bench.image_paths,
            params.batch_size, params.num_workers, desc=f"{name}/{model_name} images",
            source=bench.image_source, unreadable=unreadable, device=device,
            autocast=params.autocast)

    features = dict(zip(towers, map_on_devices(encode, list(towers), devices)))
    if not unreadable:
        return bench, features
    logger.warning("%s: %d of %d images could not be read; scored without them and their texts "
                   "(benchmark_issues, reason unreadable_image)", name, len(unreadable),
                   len(bench.image_paths))
    keep = torch.tensor([i not in unreadable for i in range(len(bench.image_paths))])
    return bench.without_images(unreadable), {k: f[keep] for k, f in features.items()}


def score(
    models: Mapping[str, ModelBundle],
    benchmarks: Mapping[str, RetrievalBenchmark],
    params: EvaluateParams,
) -> Scores:
    """Every model on every benchmark: recall@k with its bootstrap interval, R@1 by caption
    length, and, on long-caption benchmarks, R@1 against the tokens read."""
    tower_keys = {name: image_tower_key(b) for name, b in models.items()}
    devices = worker_devices(params.device, params.parallel_models)
    logger.info("evaluation on %s (autocast: %s): %d models, %d benchmarks",
                ", ".join(str(d) for d in devices),
                autocast_in_effect(devices[0], params.autocast), len(models), len(benchmarks))
    rows, by_tokens, by_length, scored = [], [], [], {}
    for bench_name, bench in benchmarks.items():
        bench, image_features = _encode_benchmark_images(models, tower_keys, bench_name, bench,
                                                         params, devices)
        scored[bench_name] = bench
        if not bench.texts:
            logger.warning("%s: no readable image with a text left; not scored", bench_name)
            continue
        lengths = analysis.caption_token_counts(bench.texts)

        def score_model(model_name: str, device: torch.device):
            logger.info("scoring %s on %s (%s)", model_name, bench_name, device)
            bundle, out = models[model_name], ([], [], [])
            rank = partial(_rank_texts, bundle, image_features[tower_keys[model_name]], bench,
                           params=params, desc=f"{bench_name}/{model_name} texts", device=device)
            tokens = tokenize(bundle, bench.texts)
            ranks = rank(tokens, cap=max(params.ks))
            for d in analysis.DIRECTIONS:
                for k in params.ks:
                    low, high = bootstrap_interval(
                        ranks.hits(d, k), params.bootstrap_resamples, params.bootstrap_seed)
                    out[0].append((bench_name, model_name, d, int(k), ranks.recall(d, k),
                                   ranks.n(d), low, high))
            out[1].extend(analysis.recall_by_caption_length(
                bench_name, model_name, ranks, lengths, bench.text_to_image,
                params.caption_length_bins))
            if bench.kind == "long":
                out[2].extend(analysis.recall_by_tokens_read(
                    bench_name, model_name, tokens, ranks, partial(rank, cap=1),
                    params.tokens_read))
            return out

        for model_rows, model_by_length, model_by_tokens in map_on_devices(
                score_model, list(models), devices):
            rows += model_rows
            by_length += model_by_length
            by_tokens += model_by_tokens
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS).astype(
        {"k": "int64", "n_queries": "int64", "recall": "float64"})
    return Scores(metrics, analysis.frame(by_tokens, analysis.TOKENS_READ_COLUMNS),
                  analysis.frame(by_length, analysis.CAPTION_LENGTH_COLUMNS), scored)


def unreadable_images_table(benchmarks: Mapping[str, RetrievalBenchmark]) -> pd.DataFrame:
    """The images left out at scoring time as rows of ``skipped_samples`` (stage ``evaluate``,
    split = the benchmark; no step)."""
    rows = [{"stage": "evaluate", "split": name, "step": None, "record_id": issue.item,
             "path": issue.item, "error": issue.detail}
            for name, bench in benchmarks.items() for issue in bench.issues
            if issue.reason == IssueReason.UNREADABLE_IMAGE]
    return pd.DataFrame(rows, columns=SKIPPED_COLUMNS).astype({"step": "Int64"})


def _rank_texts(bundle: ModelBundle, images: torch.Tensor, bench: RetrievalBenchmark,
                tokens: torch.Tensor, cap: int, params: EvaluateParams, desc: str,
                device: torch.device) -> RetrievalRanks:
    """Per-query ranks of the benchmark when its texts are ``tokens`` (encoded by ``bundle``)."""
    texts = encode_tokens(bundle, tokens, params.batch_size, desc=desc, device=device,
                          autocast=params.autocast)
    return retrieval_ranks(images, texts, bench.text_to_image, cap, params.chunk_size)
