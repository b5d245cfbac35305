"""tulip: use a trained model on your own texts and images.

    tulip encode --model M --texts captions.txt --out embeddings.parquet
    tulip encode --model M --images DIR --out embeddings.parquet
    tulip search --model M --images DIR --query "a long caption ..." --top 5

``M`` is a model directory (``data/06_models/expanded_model``), an MLflow URI
(``models:/tulip-expanded/latest``: the tracking store of ``MLFLOW_TRACKING_URI``, default the
project's ``sqlite:///mlflow.db``) or the TULIP authors' ``epoch_N.pt`` (with ``--teacher`` and
``--pretrained``). The image embeddings of a folder are computed once per image tower and cached
in the folder's ``.tulip_cache/`` (:mod:`tulip_pipelines.serving.image_cache`); captions longer
than the model's context are cut as open_clip cuts them (end token kept) and counted. Runs on the
accelerator when there is one (``--device``), under bfloat16 autocast there (``--autocast``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tulip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True,
                        help="a model directory, a models:/ or runs:/ URI, or an epoch_N.pt")
    common.add_argument("--teacher", help="epoch_N.pt only: its teacher (e.g. ViT-L-14)")
    common.add_argument("--pretrained",
                        help="epoch_N.pt only: the teacher's weights (an open_clip tag or a "
                             "file; none: no weights, for a stage-2 file; default openai)")
    common.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda:1")
    common.add_argument("--autocast", default="bf16", choices=["bf16", "fp16", "none"],
                        help="autocast on an accelerator (none on the CPU)")
    common.add_argument("--batch-size", type=_positive, default=64)
    common.add_argument("--workers", type=int, default=0, help="image decoding processes")
    common.add_argument("-q", "--quiet", action="store_true", help="no log lines")

    encode = commands.add_parser("encode", parents=[common],
                                 help="embeddings of captions or of a folder of images")
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--texts", type=Path, help="a text file, one caption a line")
    source.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    encode.add_argument("--out", type=Path, required=True, help="a Parquet file to write")

    search = commands.add_parser("search", parents=[common],
                                 help="the images of a folder that best match a caption")
    search.add_argument("--images", type=Path, required=True)
    search.add_argument("--query", required=True, help="a caption, as long as you like")
    search.add_argument("--top", type=_positive, default=5)
    return parser


def _load(args):
    from tulip_pipelines.compare import DEFAULT_TRACKING_URI  # the project's store
    from tulip_pipelines.models.device import resolve_device
    from tulip_pipelines.serving.registry import MLFLOW_URI_PREFIXES, resolve_bundle

    if args.model.startswith(MLFLOW_URI_PREFIXES):
        os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    device = resolve_device(args.device)
    original = {k: v for k, v in (("teacher", args.teacher), ("pretrained", args.pretrained))
                if v is not None}
    if original.get("pretrained") == "none":
        original["pretrained"] = None
    bundle = resolve_bundle(args.model, device=str(device), **original)
    return bundle, device, None if args.autocast == "none" else args.autocast


def encode(args) -> str:
    """Write the embeddings; returns the summary line."""
    import pandas as pd

    from tulip_pipelines.serving.embed import embed_texts
    from tulip_pipelines.serving.image_cache import folder_embeddings

    bundle, device, autocast = _load(args)
    if args.texts is not None:
        texts = [line.strip() for line in args.texts.read_text(encoding="utf-8").splitlines()]
        texts = [text for text in texts if text]
        if not texts:
            raise ValueError(f"{args.texts} holds no caption (one a line)")
        features, truncated = embed_texts(bundle, texts, args.batch_size, device=device,
                                          autocast=autocast)
        frame = pd.DataFrame({"text": texts, "embedding": list(features.numpy()),
                              "truncated": truncated})
        summary = (f"{len(texts)} captions encoded; {int((truncated > 0).sum())} truncated to "
                   f"the model's {bundle.spec.context_length} tokens")
    else:
        found = folder_embeddings(bundle, args.images, args.batch_size, args.workers, device,
                                  autocast)
        frame = pd.DataFrame({"path": found.paths, "embedding": list(found.features.numpy())})
        summary = found.summary()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(args.out, index=False)
    return f"{summary}; written to {args.out}"


def search(args) -> tuple[str, str]:
    """The table of the best matches and the summary line."""
    import pandas as pd

    from tulip_pipelines.serving.embed import embed_texts
    from tulip_pipelines.serving.image_cache import folder_embeddings

    if not args.query.strip():
        raise ValueError("--query is empty or whitespace only: give a caption to search for")
    bundle, device, autocast = _load(args)
    found = folder_embeddings(bundle, args.images, args.batch_size, args.workers, device,
                              autocast)
    query, truncated = embed_texts(bundle, [args.query], device=device, autocast=autocast,
                                   show_progress=False)
    scores = (found.features @ query[0]).numpy() if found.paths else []
    order = sorted(range(len(found.paths)), key=lambda i: -scores[i])[: args.top]
    table = pd.DataFrame({"rank": range(1, len(order) + 1),
                          "score": [f"{scores[i]:.4f}" for i in order],
                          "path": [str(args.images / found.paths[i]) for i in order]})
    summary = found.summary()
    if truncated[0]:
        summary += (f"; the query was cut to the model's {bundle.spec.context_length} tokens "
                    f"({int(truncated[0])} truncated)")
    return table.to_string(index=False) if len(table) else "no images", summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tulip_pipelines").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.command == "encode":
            summary = encode(args)
        else:
            table, summary = search(args)
            sys.stdout.write(table + "\n")
    except (ValueError, FileNotFoundError, TypeError) as err:
        sys.stderr.write(f"tulip {args.command}: error: {err}\n")
        return 2
    sys.stderr.write(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
