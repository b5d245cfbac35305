"""The learning-rate schedule: linear warmup, cosine decay to a floor."""

import io
import math

import pytest
import torch

from tulip_pipelines.training.deepspeed_setup import lr_lambda, warmup_cosine


def test_warmup_is_linear_and_reaches_one():
    values = [lr_lambda(s, warmup=4, total=20) for s in range(4)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_lambda(4, warmup=4, total=20) == pytest.approx(1.0)


def test_cosine_half_way_and_floor():
    warmup, total, floor = 10, 110, 0.1
    assert lr_lambda(warmup + 50, warmup, total, floor) == pytest.approx(floor + (1 - floor) / 2)
    quarter = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_lambda(warmup + 25, warmup, total, floor) == pytest.approx(quarter)
    assert lr_lambda(total, warmup, total, floor) == pytest.approx(floor)
    assert lr_lambda(total + 50, warmup, total, floor) == pytest.approx(floor)


def test_decay_is_monotone_after_warmup():
    values = [lr_lambda(s, 5, 60, 0.0) for s in range(5, 61)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_starts_at_full_rate():
    assert lr_lambda(0, warmup=0, total=10) == pytest.approx(1.0)


@pytest.mark.parametrize("args", [(-1, 0, 10, 0.0), (0, 0, 0, 0.0), (0, -1, 10, 0.0),
                                  (0, 0, 10, 1.5)])
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        lr_lambda(*args)


def test_scheduler_follows_lambda_and_state_is_weights_only_safe():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=0.5)
    scheduler = warmup_cosine(optimizer, warmup=3, total=12, min_ratio=0.2)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * lr_lambda(s, 3, 12, 0.2) for s in range(12)])

    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = warmup_cosine(torch.optim.AdamW([param], lr=0.5), warmup=3, total=12, min_ratio=0.2)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_each_argument_bound_accepts_its_edge_and_rejects_one_step_past():
    for ok in [(0, 0, 1, 0.0), (0, 0, 1, 1.0), (0, 1, 1, 0.5)]:
        lr_lambda(*ok)
    for bad in [(-1, 0, 1, 0.0), (0, 0, 0, 0.0), (0, -1, 1, 0.0), (0, 0, 1, -1e-9),
                (0, 0, 1, 1.0 + 1e-9)]:
        with pytest.raises(ValueError):
            lr_lambda(*bad)


def test_the_floor_holds_from_the_last_step_on_and_a_floor_of_one_is_constant():
    # min_ratio 1: no decay at all; the cosine's last step is the floor, not below it
    assert [lr_lambda(s, 2, 10, 1.0) for s in range(2, 15)] == [1.0] * 13
    assert lr_lambda(9, 0, 10, 0.25) == pytest.approx(
        0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert lr_lambda(9, 0, 10, 0.25) > 0.25
    assert lr_lambda(10, 0, 10, 0.25) == pytest.approx(0.25)
    # the first warmup step is 1 / warmup of the rate, the last one the full rate
    assert lr_lambda(0, 3, 10) == pytest.approx(1 / 3) and lr_lambda(2, 3, 10) == 1.0
