"""Two CPU processes (gloo on 127.0.0.1) training with ZeRO-2 through the launchers."""

from pathlib import Path

import pytest
import torch

from tests.training.toy_tasks import RegressionTask
from tulip_pipelines.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from tulip_pipelines.training.launch import job_from_plan, launcher_command, run_distributed


def _plan(run_dir: Path) -> dict:
    return {
        "builder": "tests.training.toy_tasks:build_job",
        "n": 256,
        "train": dict(run_name="zero2", run_dir=str(run_dir), max_steps=6, batch_size=8,
                      lr=0.05, log_every=2, checkpoint_every=3),
        "ds_config": {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
    }


@pytest.mark.slow
def test_two_process_zero2_run_writes_a_loadable_checkpoint(tmp_path, project_root, monkeypatch):
    """Trained through DeepSpeed's launcher; rerun through torchrun, which resumes from it."""
    monkeypatch.setenv("PYTHONPATH", str(project_root))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    logged = []
    task = RegressionTask()
    initial = task.head.weight.detach().clone()
    result = run_distributed(_plan(tmp_path / "run"), nproc=2, launcher="deepspeed", module=task,
                             log_fn=lambda metrics, step: logged.append(step), timeout_s=300)

    assert result.final_step == 6
    assert result.history["step"].tolist() == [2, 4, 6] == logged
    assert not torch.equal(task.head.weight, initial)
    ckpt = Path(result.last_checkpoint)
    assert (ckpt / COMPLETE_MARKER).is_file()
    assert [s for s, _, _ in complete_checkpoints(ckpt.parent)] == [3, 6]
    # ZeRO-2 sharded the optimizer state over both ranks
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    assert state["dp_world_size"] == 2 and state["global_steps"] == 6
    for name, value in task.state_dict().items():  # 0-dim parameters are saved as shape [1]
        assert torch.equal(state["module"][name].reshape(value.shape), value), name

    # DeepSpeed itself loads the sharded checkpoint on a rerun (here started by torchrun)
    again = RegressionTask()
    rerun = run_distributed(_plan(tmp_path / "run"), nproc=2, launcher="torchrun", module=again,
                            timeout_s=300)
    assert rerun.resumed_from == 6 and rerun.final_step == 6
    assert rerun.history.equals(result.history)
    for name, value in task.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_launcher_commands_run_this_module(tmp_path):
    for launcher, flag in [("deepspeed", "--num_gpus"), ("torchrun", "--nproc_per_node")]:
        cmd = launcher_command(launcher, 3, tmp_path / "s.json", tmp_path / "r", 29500)
        assert cmd[cmd.index(flag) + 1] == "3"
        assert "tulip_pipelines.training.launch" in cmd and "127.0.0.1" in cmd
    with pytest.raises(ValueError, match="launcher"):
        launcher_command("mpirun", 2, tmp_path / "s.json", tmp_path / "r", 29500)


def test_job_from_plan_names_a_bad_builder():
    with pytest.raises(ValueError, match="builder"):
        job_from_plan({"builder": "no_colon_here"})
    with pytest.raises(ValueError, match="nothing_here"):
        job_from_plan({"builder": "tests.training.toy_tasks:nothing_here"})
