"""The CUDA paths of docs/gpu.md, run on this machine's accelerator (``bench/gpu_check.py``): what
the CPU tests can only reproduce by patching, checked where it really happens.

1. One ``precision: amp_bf16`` expand step of the engine (TULIP-Tiny, 2 micro batches, so that the
   cache pass runs too) with ``tf32: true``: the dtypes of the towers' Linear outputs in the
   gradient pass (inside DeepSpeed's ``engine(batch)``, whose ``autocast_if_enabled`` switches an
   outer autocast off on a GPU) and in the cache pass, and the TF32 flags afterwards.
2. A run checkpointed with every GPU of the machine visible, resumed from its step-2 checkpoint
   with one visible (``CUDA_VISIBLE_DEVICES=0``); with a single GPU, from a checkpoint whose RNG
   file lists 8 devices' generators (as checkpoints written before only the local one was kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

RESUME_CHILD = r"""
import json, os, sys
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
import torch
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.job import TrainParams

class Data(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=gen)
        self.y = self.x.sum(1)
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

class Task(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(8, 1)
        self.dropout = torch.nn.Dropout(0.1)  # draws from the device's generator
    def forward(self, batch):
        err = self.head(self.dropout(batch["x"])).squeeze(-1) - batch["y"]
        return {"loss": (err ** 2).mean()}

params = TrainParams(run_name="resume", run_dir=sys.argv[1], max_steps=int(sys.argv[2]),
                     batch_size=8, lr=0.01, log_every=1, checkpoint_every=2)
result = train(Task(), Data(), params, {"zero_optimization": {"stage": 0}})
print(json.dumps({"resumed_from": result.resumed_from, "final_step": result.final_step,
                  "visible": torch.cuda.device_count()}))
"""


def amp_bf16_step(work: Path) -> dict:
    """Check 1 (see the module docstring), in this process."""
    from tulip_pipelines.models import create_teacher
    from tulip_pipelines.training.engine import train
    from tulip_pipelines.training.job import TrainParams
    from tulip_pipelines.training.tasks import ContrastiveTask

    torch.manual_seed(0)
    teacher = create_teacher("TULIP-Tiny")
    task = ContrastiveTask(teacher.model, 0.8, 0.2)
    dtypes: dict[bool, list[torch.dtype]] = {True: [], False: []}
    for module in task.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(
                lambda m, i, out: dtypes[torch.is_grad_enabled()].append(out.dtype))
    n = 8
    gen = torch.Generator().manual_seed(0)
    tokens = teacher.tokenizer(["a red square on a blue background. a small striped circle"] * n)
    data = [{"image": torch.randn(3, 48, 48, generator=gen), "long": tokens[i], "short": tokens[i]}
            for i in range(n)]
    params = TrainParams(run_name="amp_bf16", run_dir=str(work / "amp_bf16"), max_steps=1,
                         batch_size=4, lr=1e-4, log_every=1, precision="amp_bf16", tf32=True)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    train(task, data, params, {"zero_optimization": {"stage": 0},
                               "gradient_accumulation_steps": 2})
    after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    def count(values):
        return {str(d).replace("torch.", ""): values.count(d) for d in sorted(set(values), key=str)}

    return {"gradient_pass": count(dtypes[True]), "cache_pass": count(dtypes[False]),
            "tf32_matmul": after[0], "tf32_cudnn": after[1],
            "ok": bool(dtypes[True]) and set(dtypes[True]) == {torch.bfloat16}
            and set(dtypes[False]) == {torch.bfloat16}}


def resume_with_fewer_devices(work: Path) -> dict:
    """Check 2 (see the module docstring), in two child processes."""
    run_dir = work / "resume"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}

    def child(steps: int, visible: str | None) -> dict:
        child_env = dict(env)
        if visible is not None:
            child_env["CUDA_VISIBLE_DEVICES"] = visible
        if not torch.cuda.is_available():
            child_env.setdefault("DS_ACCELERATOR", "cpu")
        done = subprocess.run([sys.executable, "-c", RESUME_CHILD, str(run_dir), str(steps)],
                              env=child_env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"resume check: the run with {visible or 'every'} visible "
                               f"device(s) failed:\n{(done.stdout + done.stderr)[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = child(4, None)  # checkpoints at steps 2 and 4; step 4 as if killed while written:
    (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    how = ("every device visible, then CUDA_VISIBLE_DEVICES=0" if torch.cuda.is_available()
           else "CPU: no CUDA generator to carry over")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        # one GPU: the checkpoint's RNG file as written with 8 visible devices before
        rng = run_dir / "checkpoints" / "step_00000002" / "rng_rank0.json"
        state = json.loads(rng.read_text())
        local = state.pop("cuda_device")
        state["cuda"] = [local] * 8
        rng.write_text(json.dumps(state))
        how = "one GPU: an RNG file listing 8 devices' generators"
    second = child(4, "0" if torch.cuda.is_available() else None)
    return {"saved_with": first["visible"], "resumed_with": second["visible"],
            "resumed_from": second["resumed_from"], "final_step": second["final_step"],
            "how": how, "ok": second["resumed_from"] == 2 and second["final_step"] == 4}
