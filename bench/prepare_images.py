"""Scale check of ``prepare_images``: wall time and peak memory of the whole process tree to
prepare 20,000 generated images with 2 writer processes.

The records point into a pool of distinct photo-like JPEGs (``bench/lib/images.py``; 45% 1500x2250
~800 KB like SAM, 55% 640x480 ~75 KB like COCO), cycled so that the disk stays small: every record
is decoded, resized and encoded (the work is real), but its file is read from the page cache. The
preparation runs in a fresh child process (the ``prepare_images`` node's core call); a thread
here samples the memory of that child and its writer processes every 0.2 s: the peak of the sum
of RSS (counts shared pages once per process, an upper bound) and of PSS (shared pages split).
The CPU time of those processes gives the rate per core on a shared machine.

    .venv/bin/python bench/prepare_images.py                      # 20,000 images, 2 processes
    .venv/bin/python bench/prepare_images.py --records 2000       # quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: timing, images
from images import write_photos  # noqa: E402

LARGE_SHARE = 0.45


def child(root: Path, out: Path, records: int, workers: int, shard_size: int,
          names: list[str]) -> None:
    """Run the preparation in this (fresh) process; print its figures as JSON."""
    import logging

    import pandas as pd

    from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    frame = pd.DataFrame({"id": [f"{i:09d}" for i in range(records)],
                          "image": [names[i % len(names)] for i in range(records)]})
    params = PrepareImagesParams(output_dir=str(out), shard_size=shard_size, num_workers=workers)
    start = time.perf_counter()
    result = prepare_images(frame.iloc[1000:], frame.iloc[:1000], root, params,
                            params.encoding("ViT-L-14"))
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, **result.source.info}))


class TreeMemory(threading.Thread):
    """Peak of the summed RSS and PSS of a process and its descendants, and the CPU time of
    each (last sample: a process's final 0.2 s may be missed)."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.cpu_s: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss = pss = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                    times = proc.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.cpu_s[proc.pid] = times.user + times.system
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(tree))
            self.stop.wait(self.interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=200, help="distinct image files")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--names", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_images_"))
    root, out = workdir / "images", workdir / "prepared"
    if args.child:
        child(root, out, args.records, args.workers, args.shard_size,
              json.loads(args.names.read_text()))
        return

    n_large = round(args.distinct * LARGE_SHARE)
    start = time.perf_counter()
    names = write_photos(root, "large", n_large) + write_photos(root, "small",
                                                                 args.distinct - n_large)
    print(f"{len(names)} distinct JPEGs under {root} ({time.perf_counter() - start:.0f} s)")
    names_file = workdir / "names.json"
    names_file.write_text(json.dumps(names))
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", "--records", str(args.records), "--workers",
         str(args.workers), "--shard-size", str(args.shard_size), "--workdir", str(workdir),
         "--names", str(names_file)], stdout=subprocess.PIPE, text=True)
    monitor = TreeMemory(proc.pid)
    monitor.start()
    stdout, _ = proc.communicate()
    monitor.stop.set()
    monitor.join()
    cpu_s = sum(monitor.cpu_s.values())
    if proc.returncode:
        raise SystemExit(f"preparation failed (exit {proc.returncode})")
    figures = json.loads(stdout.strip().splitlines()[-1])
    on_disk = sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))
    print(f"prepared {figures['n_records']:,} records -> {figures['n_samples']:,} images in "
          f"{figures['n_shards']} shards ({on_disk / 2**20:,.0f} MiB, shortest side "
          f"{figures['size']} px) with {args.workers} writer processes")
    print(f"wall time      {figures['wall_s']:8.1f} s   "
          f"({figures['n_records'] / figures['wall_s']:.1f} images/s)")
    print(f"CPU time       {cpu_s:8.1f} s   ({figures['n_records'] / cpu_s:.1f} images per "
          "CPU-second: the rate per core, whatever else the machine runs)")
    print(f"peak RSS, sum  {monitor.peak_rss / 2**20:8.0f} MiB over {monitor.peak_processes} "
          "processes (upper bound)")
    print(f"peak PSS, sum  {monitor.peak_pss / 2**20:8.0f} MiB")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
