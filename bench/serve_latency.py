"""Latency of the served model (``mlflow models serve --env-manager local`` on 127.0.0.1): p50
and p95 over N requests of one caption, and of a batch of 64 captions, after a warm-up.

    .venv/bin/python bench/serve_latency.py                      # a TULIP-Tiny student (248)
    .venv/bin/python bench/serve_latency.py --model data/06_models/expanded_model --requests 200
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))  # the helpers: long captions
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sharegpt4v_tree import long_caption  # noqa: E402

from tulip_pipelines.models import build_student, create_teacher, save_model  # noqa: E402
from tulip_pipelines.serving.pyfunc import log_embedding_model  # noqa: E402
from tulip_pipelines.serving.server import invoke, scoring_server  # noqa: E402


def percentiles(run, requests: int) -> tuple[float, float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50)) * 1000, float(np.percentile(times, 95)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory (default: TULIP-Tiny "
                                                      "student, context 248, random weights)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    captions = [long_caption(rng, i, sentences=14) for i in range(args.batch)]  # ~220 tokens
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp) / "model"
        if not args.model:
            torch.manual_seed(0)
            save_model(build_student(create_teacher("TULIP-Tiny"), context_length=248), model)
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("bench", artifact_location=str(Path(tmp) / "a"))
        with mlflow.start_run(experiment_id=experiment):
            log_embedding_model(model, registered_model_name="bench")
        started = time.perf_counter()
        with scoring_server("models:/bench/latest", uri) as url:
            print(f"server up in {time.perf_counter() - started:.1f} s ({model})")

            def ask(texts):
                status, answer = invoke(f"{url}/invocations", {"dataframe_split": {
                    "columns": ["text"], "data": [[t] for t in texts]}})
                assert status == 200, answer

            for _ in range(5):
                ask(captions)  # warm-up
            print(f"{'request':<16} {'p50 ms':>8} {'p95 ms':>8}   ({args.requests} requests)")
            for name, texts in (("1 caption", captions[:1]),
                                (f"{args.batch} captions", captions)):
                p50, p95 = percentiles(lambda: ask(texts), args.requests)
                print(f"{name:<16} {p50:>8.1f} {p95:>8.1f}")


if __name__ == "__main__":
    main()
