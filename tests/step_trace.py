"""The project files whose code runs on the way from the expand node to the first AdamW
``optimizer.step()`` (``torch.optim.Adam.step``, which AdamW inherits), at the embedded
default's settings (conf/base), in this process, with tracking on (an MLflow store under the
scratch folder): what ``docs/architecture.md`` traces. Module-level code (imports) does not
count; the calls do."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import torch
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "src" / "tulip_pipelines"


class _StopAtStep(Exception):
    pass


def expand_inputs(tmp: Path):
    """Inputs of the expand node: the default conf's ``params:expand`` and ``params:deepspeed``
    (one step, the run dir under ``tmp``), a tiny teacher and its student, a few images."""
    from tests.image_helpers import write_images
    from tulip_pipelines.data.prepare import PrepareImagesParams, prepare_images
    from tulip_pipelines.data.shards import Encoding
    from tulip_pipelines.models import build_student, create_teacher

    conf = PROJECT / "conf" / "base"
    params = yaml.safe_load((conf / "parameters_expand.yml").read_text())["expand"]
    params["run_dir"] = str(tmp / "run")
    params["registered_model_name"] = None
    params["train"].update(max_steps=2, warmup_steps=1, batch_size=8, val_every=0,
                           checkpoint_every=0)
    ds_config = yaml.safe_load((conf / "parameters_deepspeed.yml").read_text())["deepspeed"]
    captions = write_images(tmp / "images", 16)  # the default run reads prepared shards
    train, val = captions.iloc[4:].reset_index(drop=True), captions.iloc[:4]
    images = prepare_images(train, val, tmp / "images",
                            PrepareImagesParams(output_dir=str(tmp / "prepared"), shard_size=8,
                                                num_workers=0),
                            Encoding(48, 95, "4:4:4")).source
    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    student = build_student(teacher, 248)
    return student, teacher, train, val, params, copy.deepcopy(ds_config), images


def files_to_first_step(tmp: Path) -> list[str]:
    """Project files (relative to ``src/tulip_pipelines``) whose functions ran from the expand
    node's call until torch's AdamW ``step`` was first called."""
    import os

    from tests.conftest import mlflow_store
    from tulip_pipelines.pipelines.expand.nodes import expand

    # the stage opens its MLflow run (tracking on, as in `kedro run`)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_store(tmp / "mlflow.db")

    inputs = expand_inputs(tmp)
    seen: set[str] = set()
    package = str(PACKAGE)
    here = sys._getframe()

    def importing(frame) -> bool:
        """Whether ``frame`` runs as part of a module's import (its code, a class body or a
        call made at import time), below this function's frame."""
        while frame is not None and frame is not here:
            if frame.f_code.co_name == "<module>":
                return True
            frame = frame.f_back
        return False

    def tracer(frame, event, arg):
        code = frame.f_code
        if event != "call":
            return None
        if code.co_name == "step" and code.co_filename.endswith(("optim/adam.py",
                                                                 "optim/adamw.py")):
            raise _StopAtStep
        if code.co_filename.startswith(package) and not importing(frame):
            seen.add(str(Path(code.co_filename).relative_to(PACKAGE)))
        return None

    sys.settrace(tracer)
    threading.settrace(tracer)
    try:
        expand(*inputs)
    except _StopAtStep:
        pass
    finally:
        sys.settrace(None)
        threading.settrace(None)
        del os.environ["MLFLOW_TRACKING_URI"]
    return sorted(seen)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        files = files_to_first_step(Path(d))
    sys.stdout.write(f"{len(files)} files\n" + "".join(f"{f}\n" for f in files))
