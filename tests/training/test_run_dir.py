"""Where each rank is (training/run_dir.py): the records the engine writes, and the warning
when a run makes no step for ``stall_minutes``."""

import logging
import time

import pytest

from tests.conftest import DS_FP32, small_train_params
from tests.training.toy_tasks import RegressionData, RegressionTask
from tulip_pipelines.training.engine import train
from tulip_pipelines.training.run_dir import Heartbeat, StallWatch, read_heartbeats


def test_the_engine_records_each_ranks_last_step_and_phase(tmp_path):
    params = small_train_params(tmp_path, max_steps=4, checkpoint_every=2)
    train(RegressionTask(), RegressionData(256), params, DS_FP32)
    [record] = read_heartbeats(params.run_dir)
    assert (record["rank"], record["step"], record["phase"]) == (0, 4, "done")


def test_a_stall_is_reported_with_the_last_step_and_every_rank(tmp_path, caplog):
    ranks = [Heartbeat(tmp_path, rank, min_interval_s=0) for rank in range(2)]
    ranks[0].beat(7, "checkpoint")
    ranks[1].beat(7, "train")
    with caplog.at_level(logging.WARNING), \
            StallWatch(tmp_path, "distill", stall_minutes=0.5 / 60, poll_s=0.05) as watch:
        time.sleep(1.2)
    assert watch.warnings, "no warning after 1.2 s without a step (stall: 0.5 s)"
    message = watch.warnings[0]
    assert "distill: no optimizer step for" in message and "last finished step: 7" in message
    assert "rank 0 (" in message and "step 7, checkpoint for" in message
    assert "rank 1 (" in message and "step 7, train for" in message
    assert message in caplog.text


def test_steps_keep_the_watch_quiet(tmp_path):
    beat = Heartbeat(tmp_path, 0, min_interval_s=0)
    with StallWatch(tmp_path, "expand", stall_minutes=0.5 / 60, poll_s=0.05) as watch:
        for step in range(12):
            beat.beat(step)
            time.sleep(0.1)
    assert watch.warnings == []


@pytest.mark.parametrize("stall_minutes, poll_s", [
    (1 / 60, 0.2), (2 / 60, 0.2), (3 / 60, 0.3),  # a tenth of the stall, at least 0.2 s ...
    (299 / 60, 29.9), (5.0, 30.0), (301 / 60, 30.0), (30.0, 30.0),  # ... and at most 30 s
])
def test_the_watch_polls_a_tenth_of_the_stall_between_its_bounds(tmp_path, stall_minutes,
                                                                 poll_s):
    watch = StallWatch(tmp_path, "x", stall_minutes=stall_minutes)
    assert watch.poll_s == pytest.approx(poll_s)
    assert StallWatch(tmp_path, "x", stall_minutes, poll_s=0.01).poll_s == 0.01  # as given
