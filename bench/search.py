"""``tulip search`` over a folder of photos (640x480 JPEGs): the first call (every image
encoded, with the model load and imports) and a second call (every embedding from the folder's
cache), each as a user runs it, a separate process.

    .venv/bin/python bench/search.py                             # 1,000 photos, TULIP-Tiny student
    .venv/bin/python bench/search.py --model data/06_models/expanded_model --images 1000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: the generated photos
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from images import write_photos  # noqa: E402

from tulip_pipelines.models import (  # noqa: E402
    build_student,
    create_teacher,
    load_bundle,
    save_model,
)
from tulip_pipelines.serving.embed import embed_texts  # noqa: E402
from tulip_pipelines.serving.image_cache import CACHE_DIR, folder_embeddings  # noqa: E402

QUERY = " ".join(f"A photograph whose part {i} shows a smooth colour field with soft edges."
                 for i in range(12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or URI (default: "
                                                      "TULIP-Tiny student, random weights)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(Path(tmp) / "model")
        if not args.model:
            torch.manual_seed(0)
            save_model(build_student(create_teacher("TULIP-Tiny"), context_length=248), model)
        started = time.perf_counter()
        write_photos(Path(tmp), "small", args.images)
        folder = Path(tmp) / "small"
        print(f"{args.images} photos written in {time.perf_counter() - started:.1f} s")
        command = [sys.executable, "-m", "tulip_pipelines.commands", "search", "--model", model,
                   "--images", str(folder), "--query", QUERY, "--top", "5", "-q",
                   "--workers", str(args.workers)]
        for call in ("first call", "cached call"):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            print(f"{call:<12} {time.perf_counter() - started:7.1f} s   "
                  f"{done.stderr.strip().splitlines()[-1]}")
        print(done.stdout.strip())
        # the same two calls inside one process: the work without Python's start and imports
        shutil.rmtree(folder / CACHE_DIR)
        bundle = load_bundle(model)
        for call in ("first call", "cached call"):
            started = time.perf_counter()
            found = folder_embeddings(bundle, folder, num_workers=args.workers)
            query, _ = embed_texts(bundle, [QUERY], show_progress=False)
            (found.features @ query[0]).topk(5)
            print(f"{call:<12} {time.perf_counter() - started:7.2f} s   in-process (no imports, "
                  f"model loaded)")


if __name__ == "__main__":
    main()
