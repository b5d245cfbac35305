"""Every environment's parameters, loaded through the project's real config loader, pass the same
checks the fail-fast hook runs; overlays are deltas that merge into base."""

from pathlib import Path

import pytest
import yaml
from kedro.config import OmegaConfigLoader

from tulip_pipelines import settings
from tulip_pipelines.params_checks import check_parameters, params_classes
from tulip_pipelines.pipeline_registry import DEFAULT_ORDER

ENVIRONMENTS = ["base", "sharegpt4v"]


def _parameters(project_root: Path, env: str) -> dict:
    loader = OmegaConfigLoader(conf_source=str(project_root / "conf"), env=env,
                               **{k: v for k, v in settings.CONFIG_LOADER_ARGS.items()
                                  if k != "default_run_env"})
    return loader["parameters"]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_environment_passes_the_parameter_checks(project_root, env):
    params = _parameters(project_root, env)
    assert set(DEFAULT_ORDER) - {"demo_data"} <= set(params_classes())
    assert check_parameters(params, DEFAULT_ORDER,
                            shared={"image_root", "teacher_model_name"}) == []


def test_overlays_merge_into_base_and_restate_nothing(project_root):
    base = _parameters(project_root, "base")
    real = _parameters(project_root, "sharegpt4v")
    # a key that only base sets reaches the real-scale environment
    assert real["distill"]["loss_type"] == base["distill"]["loss_type"]
    assert real["distill"]["train"]["lr"] == base["distill"]["train"]["lr"]
    assert real["distill"]["train"]["batch_size"] == 20  # and the overlay's own value wins
    # null removes base's demo benchmarks
    assert not {"urban1k_demo", "flickr30k_demo", "sharegpt4v_val"} & set(
        name for name, entry in real["evaluate"]["benchmarks"].items() if entry is not None)

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    base_leaves = dict(leaves(base))
    for path in sorted((project_root / "conf" / "sharegpt4v").glob("parameters*.yml")):
        overlay = yaml.safe_load(path.read_text()) or {}
        restated = [k for k, v in leaves(overlay) if k in base_leaves and base_leaves[k] == v]
        assert not restated, f"{path.name} restates base values: {restated}"


def test_a_mistake_is_named_with_its_file(project_root):
    params = _parameters(project_root, "base")
    params["distill"]["loss_type"] = "kl"
    params["expand"]["train"]["lr"] = -1
    problems = check_parameters(params, ["distill", "expand"], shared={"image_root"})
    assert len(problems) == 2
    assert "parameters_distill.yml" in problems[0] and "loss_type" in problems[0]
    assert "parameters_expand.yml" in problems[1] and "lr" in problems[1]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_stage_budget_resolves_to_steps(project_root, env):
    """Each training stage's budget (steps, or epochs of a longer schedule) becomes a valid step
    budget, as the engine resolves it at the start of training (and each rank rebuilds it)."""
    import dataclasses

    from tulip_pipelines.training.job import TrainParams
    from tulip_pipelines.training.stages.longclip import RECIPES, LongclipParams

    params = _parameters(project_root, env)
    stages = [params_classes()[name].from_all(params) for name in ("teacher", "distill", "expand")]
    longclip = LongclipParams.from_params(params["longclip"])
    stages += [longclip.recipe(name, params["expand"]) for name in RECIPES]
    for stage in stages:
        train = stage.train_params()
        resolved = train.resolved(steps_per_epoch=10_000)
        assert resolved.max_steps >= 1 and resolved.schedule_steps >= resolved.max_steps
        assert TrainParams.from_params(dataclasses.asdict(resolved)) == resolved, stage.section


def test_the_real_scale_stages_run_as_the_papers_recipes(project_root):
    """conf/sharegpt4v: TULIP's stage 1 stops at epoch 5 of a 30-epoch schedule and stage 2 at
    epoch 1 of 30 (learning rate still ~99.7% of its peak when it ends), both in open_clip's
    amp_bf16; stage 2 with open_clip's train transform, Long-CLIP's authors without one."""
    import math

    from tulip_pipelines.training.deepspeed_setup import lr_lambda
    from tulip_pipelines.training.stages.longclip import LongclipParams

    params = _parameters(project_root, "sharegpt4v")
    classes = params_classes()
    distill, expand = (classes[name].from_all(params) for name in ("distill", "expand"))
    authors = LongclipParams.from_params(params["longclip"]).recipe("authors")
    for stage, epochs in ((distill, 5), (expand, 1)):
        resolved = stage.train_params().resolved(steps_per_epoch=10_000)
        assert (resolved.max_steps, resolved.schedule_steps) == (epochs * 10_000, 300_000)
        assert resolved.precision == "amp_bf16"
    end = lr_lambda(10_000, expand.train_params().warmup_steps, 300_000)
    assert end == pytest.approx(0.997, abs=1e-3) and not math.isclose(end, 1.0)
    assert expand.train_augment == "random_resized_crop" and authors.train_augment == "none"
    assert authors.train_params().precision == "amp_bf16"
    assert "bf16" not in params["deepspeed"]  # the precision is each stage's


def test_the_shared_checks_hold_at_both_ends_of_a_range():
    """``Problems``: a closed bound accepts its value and rejects the next one, an open one
    rejects its value; integers are not booleans or floats."""
    from tulip_pipelines.params import Problems

    def problems(check, *args, **kw):
        p = Problems("s")
        getattr(p, check)("f", *args, **kw)
        return p.items

    assert problems("number_in", 0.0, 0, 1) == [] and problems("number_in", 1.0, 0, 1) == []
    assert problems("number_in", -1e-12, 0, 1) and problems("number_in", 1 + 1e-12, 0, 1)
    assert problems("number_in", 0.0, 0, low_open=True) and problems("number_in", 1e-12, 0,
                                                                     low_open=True) == []
    assert problems("number_in", None, 0, optional=True) == [] and problems("number_in", None, 0)
    assert problems("number_in", True, 0) and problems("number_in", "1", 0)
    assert problems("int_at_least", 3, 3) == [] and problems("int_at_least", 2, 3)
    assert problems("int_at_least", True, 0) and problems("int_at_least", 3.0, 3)
    assert problems("int_at_least", None, 1, optional=True) == [] and problems("int_at_least",
                                                                               None, 1)
    assert problems("number_in", 2.0, 0, 1) == ["s.f must be a number >= 0 and <= 1, got 2.0"]
