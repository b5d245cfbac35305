"""TrainParams: unknown keys and bad values named by field, YAML lists as tuples."""


import pytest

from tests.bounds import assert_bounds
from tulip_pipelines.training.job import TrainParams


def test_from_params_rejects_unknown_keys_by_name():
    params = dict(run_name="x", run_dir="o", max_steps=1, batch_size=1, lr=1e-3, lr_decay=2)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainParams.from_params(params)


def test_from_params_turns_yaml_lists_into_tuples():
    params = TrainParams.from_params(dict(run_name="x", run_dir="o", max_steps=3, batch_size=2,
                                          lr=1e-3, betas=[0.9, 0.95]))
    assert params.betas == (0.9, 0.95)


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("batch_size", -1), ("lr", 0.0),
                                         ("warmup_steps", 99), ("min_lr_ratio", 2.0),
                                         ("betas", (0.9, 1.0)), ("betas", 0.9),
                                         ("resume", "yes")])
def test_bad_values_name_the_field(field, value):
    values = dict(run_name="x", run_dir="o", max_steps=10, batch_size=2, lr=1e-3)
    values[field] = value
    with pytest.raises(ValueError, match=field):
        TrainParams(**values)


def _train(**values):
    return TrainParams(**{**dict(run_name="x", run_dir="o", max_steps=10, batch_size=2,
                                 lr=1e-3), **values})


# field -> (values at the bound, accepted; values one step past it, rejected)
BOUNDS = {
    "batch_size": ([1], [0]),
    "log_every": ([1], [0]),
    "keep_checkpoints": ([1], [0]),
    "max_steps": ([1], [0]),
    "schedule_steps": ([10], [0, 9]),  # at least 1, and not before the run's end
    "warmup_steps": ([0, 10], [-1, 11]),  # 0..the schedule's steps
    "val_every": ([0], [-1]),
    "checkpoint_every": ([0], [-1]),
    "num_workers": ([0], [-1]),
    "seed": ([0], [-1]),
    "lr": ([1e-12], [0.0, -1e-12]),  # > 0
    "eps": ([1e-12], [0.0]),  # > 0
    "weight_decay": ([0.0], [-1e-12]),  # >= 0
    "min_lr_ratio": ([0.0, 1.0], [-1e-9, 1.0 + 1e-9]),  # 0..1 both closed
    "max_bad_fraction": ([0.0, 1.0], [-1e-9, 1.0 + 1e-9]),
    "stall_minutes": ([0.0], [-1e-9]),
    "betas": ([(0.0, 0.0), (0.0, 0.999999)], [(-1e-9, 0.9), (0.9, 1.0), (1.0, 0.9)]),  # [0, 1)
}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_bound_accepts_its_edge_and_rejects_one_step_past(name):
    accepted, rejected = BOUNDS[name]
    if name == "schedule_steps":
        # the schedule may not end before the run: checked once the budget is resolved
        for value in accepted:
            assert _train(schedule_steps=value).resolved(1).schedule_steps == value
        with pytest.raises(ValueError, match="schedule_steps"):
            _train(schedule_steps=0)
        with pytest.raises(ValueError, match="ends before the run"):
            _train(schedule_steps=9).resolved(1)
        return
    assert_bounds(_train, name, accepted, rejected)


def test_epoch_budgets_are_open_at_zero():
    for name in ("epochs", "schedule_epochs"):
        values = dict(max_steps=None, epochs=1.0) if name == "schedule_epochs" else \
            dict(max_steps=None)
        assert_bounds(lambda **v: _train(**values, **v), name, [1e-9], [0.0, -1e-9])


def test_a_warmup_longer_than_a_given_schedule_is_named():
    assert_bounds(lambda **v: _train(schedule_steps=20, **v), "warmup_steps", [20], [21])


@pytest.mark.parametrize("epochs, steps_per_epoch, steps", [
    (1.0, 10, 10), (1.01, 10, 11), (1.05, 10, 11),  # rounded up, not to the nearest
    (1e-9, 10, 1), (0.1, 5, 1),  # never below one step
    (2.5, 4, 10), (30, 10_000, 300_000),
])
def test_an_epoch_budget_rounds_up_to_whole_steps_and_at_least_one(epochs, steps_per_epoch,
                                                                  steps):
    resolved = _train(max_steps=None, epochs=epochs).resolved(steps_per_epoch)
    assert resolved.max_steps == steps
    assert resolved.schedule_steps == steps  # the schedule spans the run by default


def test_a_resolved_warmup_may_reach_the_schedule_but_not_pass_it():
    assert _train(max_steps=None, epochs=1.0, warmup_steps=10).resolved(10).warmup_steps == 10
    with pytest.raises(ValueError, match="warmup_steps"):
        _train(max_steps=None, epochs=1.0, warmup_steps=11).resolved(10)


def test_the_defaults_are_open_clips_and_tulips():
    """AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.1 (open_clip's CLIP recipe, TULIP's
    scripts), no warmup and a cosine to 0 unless asked, 0.1% bad samples tolerated."""
    t = _train()
    assert (t.betas, t.eps, t.weight_decay) == ((0.9, 0.98), 1e-6, 0.1)
    assert (t.warmup_steps, t.min_lr_ratio, t.max_bad_fraction) == (0, 0.0, 0.001)
    assert (t.decay_biases_and_norms, t.resume, t.precision) == (False, True, None)
