"""Images/s per core of the training data path, in one run: the original files as training read
them before ``prepare_images`` (``Image.open`` + ``convert`` + preprocess), the original files
with JPEG draft decoding (``FolderImages``, what a run without the preparation reads now), and
the prepared shards (``PreparedImages`` via wids, in a shuffled order as training reads them).

Generated photo-like JPEGs (``bench/lib/images.py``): 1500x2250 (~800 KB, like ShareGPT4V's SAM
images) and 640x480 (~75 KB, like COCO), quality 90. Preprocess: open_clip's eval transform at
224 (ViT-B-16's: bicubic shortest-side resize, centre crop, OpenAI mean/std). One process, one
torch thread, timed in CPU seconds: the figures are per core. Files are read from the page cache
(warm), so the figures are decode + preprocess cost, not disk.

    DS_ACCELERATOR=cpu .venv/bin/python bench/data_path.py [--images 100 --workdir /tmp/x]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: timing, images
from images import write_photos  # noqa: E402

from tulip_pipelines.data.images import FolderImages  # noqa: E402
from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images  # noqa: E402
from tulip_pipelines.data.shards import Encoding  # noqa: E402

SIZE = 224


def rate(read, items, preprocess, repeat: int = 1) -> float:
    """Images per CPU-second of ``preprocess(read(item))`` over ``items`` (after one warm-up
    read). CPU time of this process, not wall time: the rate per core even on a busy machine."""
    preprocess(read(items[0]))
    start = time.process_time()
    for _ in range(repeat):
        for item in items:
            preprocess(read(item))
    return repeat * len(items) / (time.process_time() - start)


def original(root: Path):
    def read(name: str) -> Image.Image:
        with Image.open(root / name) as image:
            return image.convert("RGB")
    return read


def measure(n_images: int, workdir: Path) -> tuple[pd.DataFrame, float]:
    """Images/s per core of each path on ``n_images`` large and small JPEGs written under
    ``workdir``, and the preparation's own images per CPU-second."""
    torch.set_num_threads(1)
    root = workdir / "images"
    start = time.perf_counter()
    names = {kind: write_photos(root, kind, n_images) for kind in ("large", "small")}
    print(f"generated {2 * n_images} JPEGs under {root} in {time.perf_counter() - start:.0f} s")
    preprocess = image_transform_v2(PreprocessCfg(size=SIZE), is_train=False)

    frame = pd.DataFrame({"image": names["large"] + names["small"]})
    frame["id"] = frame["image"]
    params = PrepareImagesParams(output_dir=str(workdir / "prepared"), shard_size=50,
                                 num_workers=0)
    start = time.process_time()
    source = prepare_images(frame, frame.iloc[:0], root, params,
                            Encoding(SIZE, params.quality, params.subsampling)).source
    prepare_rate = len(frame) / (time.process_time() - start)
    handles = dict(zip(frame["id"], source.locate(frame["id"].tolist(), frame["image"].tolist())))
    folder = FolderImages(root)

    rows = []
    for kind in ("large", "small"):
        items = list(names[kind])
        random.Random(0).shuffle(items)  # training reads in a shuffled order
        prepared = [handles[name] for name in items]
        rows.append({
            "images": f"{kind} {'x'.join(map(str, Image.open(root / items[0]).size))}",
            "original": rate(original(root), items, preprocess),
            "original + draft": rate(lambda n: folder.open(n, SIZE), items, preprocess),
            "prepared shards": rate(lambda h: source.open(h, SIZE), prepared, preprocess,
                                    repeat=3),
        })
    return pd.DataFrame(rows).set_index("images"), prepare_rate


def print_table(table: pd.DataFrame, prepare_rate: float) -> None:
    print(f"\nimages/s per core (images per CPU-second, one thread; preprocess at {SIZE}):")
    print(table.round(1).to_string())
    print("\nspeed-up over the original files:")
    print((table.div(table["original"], axis=0)).round(1).to_string())
    print(f"\npreparation: {prepare_rate:.1f} images per CPU-second in one process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images per size")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_path_"))
    print_table(*measure(args.images, workdir))
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
