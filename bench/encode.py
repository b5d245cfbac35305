"""Encode rates of the forwards outside DeepSpeed, per device: the evaluation's image and text
encoders (images/s, captions/s) and the teacher text embeddings (captions/s), each on the CPU and,
where there is one, on the GPU (under its bf16 autocast), one after the other in this process.

    .venv/bin/python bench/encode.py                        # TULIP-Tiny; ViT-L-14 where a GPU is
    .venv/bin/python bench/encode.py --model ViT-L-14 --images 256 --captions 2048
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: the generated photos
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from sharegpt4v_tree import long_caption, write_photo  # noqa: E402

from tulip_pipelines.evaluation.encode import encode_images, encode_tokens, tokenize  # noqa: E402
from tulip_pipelines.models import create_teacher  # noqa: E402
from tulip_pipelines.training.teacher_embeddings import (  # noqa: E402
    TeacherTextEmbeddingsRequest,
    compute_teacher_text_embeddings,
)


def rate(count: int, run) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: ViT-L-14 on a GPU, else TULIP-Tiny")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--captions", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    model_name = args.model or ("ViT-L-14" if gpu else "TULIP-Tiny")
    torch.manual_seed(0)
    teacher = create_teacher(model_name)
    import random

    rng = random.Random(0)
    captions = [long_caption(rng, n) for n in range(args.captions)]
    devices = ["cpu", "cuda"] if gpu else ["cpu"]
    print(f"{model_name} (random weights), batch {args.batch_size}, {args.images} 640x480 JPEGs, "
          f"{args.captions} long captions; torch threads {torch.get_num_threads()}")
    print(f"{'device':<8}{'images/s':>10}{'captions/s':>12}{'embeddings/s':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for n in range(args.images):
            write_photo(Path(tmp) / f"{n}.jpg", (640, 480), n)
            paths.append(Path(tmp) / f"{n}.jpg")
        for name in devices:
            device = torch.device(name)
            images = rate(len(paths), lambda: encode_images(
                teacher, paths, args.batch_size, num_workers=min(8, os.cpu_count() or 1),
                device=device, autocast="bf16"))
            texts = rate(len(captions), lambda: encode_tokens(
                teacher, tokenize(teacher, captions), args.batch_size, device=device,
                autocast="bf16"))
            request = TeacherTextEmbeddingsRequest(teacher, {"train": captions},
                                               batch_size=args.batch_size, device=name)
            embeddings = rate(len(captions),
                              lambda: list(compute_teacher_text_embeddings(request, {})))
            print(f"{name:<8}{images:>10.1f}{texts:>12.1f}{embeddings:>14.1f}")


if __name__ == "__main__":
    main()
