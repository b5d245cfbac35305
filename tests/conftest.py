"""Shared test setup: no telemetry, no network, DeepSpeed on the CPU."""

import copy
import functools
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, so that neither spins on the
    # other's core (torch reads this when it is imported, after this file)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


# What no test may leave in the project root (a tracking store, its artifacts, pipeline outputs)
ROOT_OUTPUTS = ("mlruns", "mlflow.db", "mlartifacts", "data")


def root_outputs(root: Path = PROJECT_ROOT) -> set[str]:
    """The files under :data:`ROOT_OUTPUTS` of ``root`` (the tracked ``.gitkeep`` files of
    data/ left out), relative to it."""
    found = set()
    for name in ROOT_OUTPUTS:
        path = root / name
        if path.is_file():
            found.add(name)
        elif path.is_dir():
            found.update(str(p.relative_to(root)) for p in path.rglob("*")
                         if p.is_file() and p.name != ".gitkeep")
    return found


def pytest_sessionstart(session):
    session.config._root_outputs_before = root_outputs()


def pytest_sessionfinish(session, exitstatus):
    """The suite fails when a test wrote into the project root (it must use tmp_path): the
    files it left are named. Checked once, by the process that started the session."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    before = getattr(session.config, "_root_outputs_before", set())
    new = sorted(root_outputs() - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"tests wrote {len(new)} file(s) into the project root {PROJECT_ROOT}: "
                   f"{', '.join(new[:10])}{' ...' if len(new) > 10 else ''}")
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _outside_the_project(tmp_path_factory):
    """Every test runs in a scratch working directory, never the project root: a tracking store
    created without an artifact location puts its artifacts under ``./mlruns`` (MLflow's
    default), and relative conf paths resolve against the working directory."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_mlflow():
    """Each test starts without an active MLflow run, tracking URI or experiment left by another
    (kedro-mlflow and the stage runs set these process-wide)."""
    yield
    import mlflow
    import mlflow.tracking.fluent as fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)


# DeepSpeed config of the tests: one CPU process, fp32, no ZeRO (what the embedded default uses)
DS_FP32 = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False},
           "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 10**9}


@functools.cache
def _empty_store() -> Path:
    """An empty sqlite MLflow store made by MLflow, once per process."""
    import tempfile

    import mlflow

    template = Path(tempfile.mkdtemp(prefix="tulip-mlflow-store-")) / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()  # schema, Default exp.
    return template


def mlflow_store(path: Path) -> str:
    """A new, empty sqlite MLflow store at ``path`` (its URI): a copy of :func:`_empty_store`,
    since making one runs MLflow's schema migrations (seconds of CPU each time, on every store of
    the suite). Its Default experiment keeps its artifacts beside the store (``<path's
    folder>/mlruns/0``, where ``kedro run`` in that folder would put them), never under the
    caller's working directory: ``python -m tests.step_trace`` from the project root wrote a
    ``mlruns/`` there."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_store(), path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(path.parent.resolve() / "mlruns" / "0"),))
    db.close()
    return f"sqlite:///{path}"


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store under ``tmp_path`` (:func:`mlflow_store`), the process's
    tracking URI for the test (environment and mlflow both); active runs ended afterwards."""
    import mlflow

    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def kept_memory_dataset():
    """An in-memory catalog entry that keeps its data after the run (Kedro's runner releases
    intermediate MemoryDatasets once their last reader has run): for tests that read a
    pipeline's intermediate results."""
    from kedro.io import MemoryDataset

    class Kept(MemoryDataset):
        def _release(self) -> None:
            pass

    return Kept(copy_mode="assign")


def small_train_params(tmp_path: Path, **overrides):
    """A small TrainParams for the engine's toy tasks (8 steps of 16, warmup 2, a log row every
    2 steps), its run dir under ``tmp_path``; ``overrides`` replace any field."""
    from tulip_pipelines.training.job import TrainParams

    values = dict(run_name="toy", run_dir=str(tmp_path / "run"), max_steps=8, batch_size=16,
                  lr=0.05, warmup_steps=2, log_every=2, min_lr_ratio=0.1)
    values.update(overrides)
    return TrainParams(**values)


@pytest.fixture
def ds_fp32() -> dict:
    return copy.deepcopy(DS_FP32)


def copy_project(project_root: Path, dest: Path) -> Path:
    """A runnable copy of the project at ``dest``: its conf (without conf/local) and
    pyproject.toml, and the empty tracking store that its first ``kedro run`` would make
    (``mlflow.db``, :func:`mlflow_store`); the package itself is installed. Returns ``dest``."""
    dest.mkdir(parents=True)
    shutil.copytree(project_root / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir()
    (dest / "src").mkdir()  # Kedro requires the source dir
    shutil.copy(project_root / "pyproject.toml", dest)
    mlflow_store(dest / "mlflow.db")
    return dest


@pytest.fixture
def project_copy(project_root, tmp_path, monkeypatch) -> Path:
    """A bootstrapped copy of the project, the working directory of the test (relative paths in
    conf resolve there), without a tracking URI from the environment."""
    from kedro.framework.startup import bootstrap_project

    project = copy_project(project_root, tmp_path / "project")
    monkeypatch.chdir(project)
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bootstrap_project(project)
    return project


# the modules that take longest (minutes each), longest first
LONGEST_MODULES = ("tests/test_end_to_end.py", "tests/test_slurm.py", "tests/test_bench.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first (:data:`LONGEST_MODULES`), then the other modules with slow
    (multi-process) tests, then the rest: with two xdist workers (``make test``, whole modules
    to a worker, in this order), one worker spends the run on the end-to-end module while the
    other takes the next long ones, and both fill the end with short ones."""
    slow_modules = {item.nodeid.split("::")[0] for item in items
                    if item.get_closest_marker("slow")}

    def order(item) -> int:
        module = item.nodeid.split("::")[0]
        if module in LONGEST_MODULES:
            return LONGEST_MODULES.index(module)
        return len(LONGEST_MODULES) + (0 if module in slow_modules else 1)

    items.sort(key=order)


@pytest.fixture(scope="session")
def slurm() -> str:
    """A running SLURM on this machine (``.ci/slurm-up`` installs and starts one, as CI does
    before ``make test``): the name of its idle node; else the test is skipped, saying why."""
    import subprocess

    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (sbatch not found): run .ci/slurm-up as root to install and "
                    "start a one-node SLURM")
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                               text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM's controller does not answer (sinfo timed out): run .ci/slurm-up")
    idle = [line.split()[0] for line in nodes.stdout.splitlines()
            if line.split()[1:] and line.split()[1] in ("idle", "mix")]
    if nodes.returncode != 0 or not idle:
        pytest.skip(f"SLURM has no idle node (sinfo: {(nodes.stderr or nodes.stdout).strip()!r}):"
                    f" run .ci/slurm-up")
    return idle[0]
