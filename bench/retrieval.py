"""Time and peak memory of recall@k: chunked (the project's) vs the straightforward full argsort.

    .venv/bin/python bench/retrieval.py [--images 5000] [--captions-per-image 5] [--dim 768]

Random unit vectors, ``captions-per-image`` texts per image (5,000 x 25,000 by default). Each
method runs in its own subprocess so that its peak memory is clean: the figure is the growth of
the process's peak resident set size (``ru_maxrss``) during the call, above the process after
imports and after loading the features (which both methods share). Both methods must agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(method: str, data: Path, chunk_size: int) -> None:
    import torch

    from tulip_pipelines.evaluation.metrics import retrieval_recall, retrieval_recall_full_sort

    images = torch.from_numpy(np.load(data / "images.npy"))
    texts = torch.from_numpy(np.load(data / "texts.npy"))
    t2i = np.load(data / "t2i.npy")
    torch.set_num_threads(torch.get_num_threads())
    base = _peak_mb()
    start = time.perf_counter()
    if method == "chunked":
        out = retrieval_recall(images, texts, t2i, chunk_size=chunk_size)
    else:
        out = retrieval_recall_full_sort(images, texts, t2i)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_mb": _peak_mb() - base,
        "i2t": out["i2t"],
        "t2i": out["t2i"],
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.chunk_size)
        return

    rng = np.random.default_rng(0)
    n_texts = args.images * args.captions_per_image
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("images", args.images), ("texts", n_texts)):
            x = rng.standard_normal((n, args.dim), dtype=np.float32)
            np.save(Path(tmp) / f"{name}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
        np.save(Path(tmp) / "t2i.npy", np.repeat(np.arange(args.images), args.captions_per_image))
        print(f"{args.images} images x {n_texts} texts, d={args.dim}, chunk_size={args.chunk_size}")
        results = {}
        for method in ("chunked", "full_argsort"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--chunk-size",
                    str(args.chunk_size),
                    "--child",
                    method,
                    tmp,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[method]
            print(f"{method:>13}: {r['seconds']:8.2f} s   peak memory +{r['peak_mb']:8.1f} MB")
    chunked, full = results["chunked"], results["full_argsort"]
    same = chunked["i2t"] == full["i2t"] and chunked["t2i"] == full["t2i"]
    print(
        f"speed-up {full['seconds'] / chunked['seconds']:.1f}x; "
        f"memory {full['peak_mb'] / max(chunked['peak_mb'], 1e-9):.1f}x less; "
        f"identical recalls: {same}"
    )
    print("recall (%):", json.dumps({"i2t": chunked["i2t"], "t2i": chunked["t2i"]}))


if __name__ == "__main__":
    main()
