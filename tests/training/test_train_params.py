"""TrainParams: unknown keys and bad values named by field, YAML lists as tuples."""


import pytest

from tulip_pipelines.training.train_params import TrainParams


def test_from_params_rejects_unknown_keys_by_name():
    params = dict(run_name="x", run_dir="o", max_steps=1, batch_size=1, lr=1e-3, lr_decay=2)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainParams.from_params(params)


def test_from_params_turns_yaml_lists_into_tuples():
    cfg = TrainParams.from_params(dict(run_name="x", run_dir="o", max_steps=3, batch_size=2,
                                       lr=1e-3, betas=[0.9, 0.95]))
    assert cfg.betas == (0.9, 0.95)


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("batch_size", -1), ("lr", 0.0),
                                         ("warmup_steps", 99), ("min_lr_ratio", 2.0),
                                         ("betas", (0.9, 1.0)), ("betas", 0.9),
                                         ("resume", "yes")])
def test_bad_values_name_the_field(field, value):
    values = dict(run_name="x", run_dir="o", max_steps=10, batch_size=2, lr=1e-3)
    values[field] = value
    with pytest.raises(ValueError, match=field):
        TrainParams(**values)
