"""The whole method on the embedded default, end to end, in a copy of the project.

One ``kedro run`` (the module fixture ``default_run``) serves every test here: each asserts one
property of its outputs. The first asserts the method's effect on the held-out long-caption demo
benchmark (Urban1k layout): a 77-token teacher can only find an image's group, the expanded TULIP
student finds the image.
"""

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from tests.conftest import copy_project

pytestmark = pytest.mark.slow

# Smaller than `make run` so that CI stays within its budget; the effect must hold anyway.
RUNTIME_PARAMS = {
    "teacher": {"train": {"max_steps": 400, "val_every": 0, "checkpoint_every": 200}},
    "distill": {"train": {"max_steps": 150, "val_every": 0, "checkpoint_every": 0}},
    "expand": {"train": {"max_steps": 150, "val_every": 0, "checkpoint_every": 0}},
    "longclip": {"authors": {"train": {"max_steps": 150, "val_every": 0,
                                       "checkpoint_every": 0}}},
}


@pytest.fixture(scope="module")
def default_run(project_root, tmp_path_factory):
    """The project directory after one ``kedro run`` of the default pipeline."""
    project = copy_project(project_root, tmp_path_factory.mktemp("e2e") / "project")
    mp = pytest.MonkeyPatch()
    mp.chdir(project)
    mp.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=RUNTIME_PARAMS) as session:
            session.run()
        yield project
    finally:
        mp.undo()


def test_default_run_shows_tulip_beating_the_teacher_on_long_captions(default_run):
    project = default_run
    metrics = pd.read_parquet(project / "data/08_reporting/retrieval_metrics.parquet")
    assert list(metrics.columns)[:6] == ["benchmark", "model", "direction", "k", "recall",
                                         "n_queries"]
    assert set(metrics["model"]) == {"teacher", "longclip_stretched", "longclip_authors",
                                     "longclip_equal_budget", "tulip_distilled", "tulip_expanded"}
    r1 = metrics[(metrics["benchmark"] == "urban1k_demo") & (metrics["k"] == 1)].set_index(
        ["model", "direction"]
    )["recall"]
    for direction in ("i2t", "t2i"):
        gain = r1["tulip_expanded", direction] - r1["teacher", direction]
        assert gain >= 25, (
            f"{direction}: expanded {r1['tulip_expanded', direction]:.1f} "
            f"vs teacher {r1['teacher', direction]:.1f}"
        )
    assert (project / "data/08_reporting/retrieval_report.png").stat().st_size > 0
    assert "urban1k_demo" in (project / "data/08_reporting/retrieval_report.md").read_text()
