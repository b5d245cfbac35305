"""The per-rank entry point (training/launch.py): the launch plan's builder, every line prefixed
with its rank, rank 0's metrics logger."""

import io

import pytest

from tulip_pipelines.training.launch import _Prefixed, job_from_plan, rank_tracker


def test_job_from_plan_names_a_bad_builder():
    with pytest.raises(ValueError, match="builder"):
        job_from_plan({"builder": "no_colon_here"})
    with pytest.raises(ValueError, match="nothing_here"):
        job_from_plan({"builder": "tests.training.toy_tasks:nothing_here"})


def test_every_whole_line_is_prefixed_with_the_rank():
    out = io.StringIO()
    stream = _Prefixed(out, "[rank 3] ")
    stream.write("first line\nsecond ")
    assert out.getvalue() == "[rank 3] first line\n"  # a partial line waits for its end
    stream.write("half\n\nTraceback (most recent call last):\n")
    assert out.getvalue().splitlines() == ["[rank 3] first line", "[rank 3] second half",
                                           "[rank 3] ", "[rank 3] Traceback (most recent call "
                                           "last):"]


def test_only_rank_0_of_a_tracked_plan_logs_metrics():
    plan = {"mlflow": {"tracking_uri": "sqlite:///unused.db", "run_id": "abc"}}
    assert rank_tracker(plan, 1) is None
    assert rank_tracker({"mlflow": None}, 0) is None
    assert rank_tracker(plan, 0).run_id == "abc"
