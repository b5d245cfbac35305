"""The nodes of a multi-node stage in a ``kedro run`` (:mod:`tulip_pipelines.training.multinode`
has the protocol): node 0 opens every multi-node stage's session when the run starts
(:func:`open_sessions`, from the project hook) and publishes each stage's launch plan when it
reaches it (:func:`node_zero`, from :func:`~.run.run_stage`); node R > 0 answers and lends its
processes to each stage in turn (:func:`follow_stages`), writing nothing else."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tulip_pipelines.training.multinode import (
    Cluster,
    NodeError,
    NodeZero,
    OtherNode,
    fingerprint,
)
from tulip_pipelines.training.processes import run_distributed
from tulip_pipelines.training.stages.base import StageParams

logger = logging.getLogger(__name__)

def node_fingerprint(stage: str, params: StageParams, ds_config: Mapping[str, Any]) -> str:
    """What every node of a multi-node stage must agree on: the stage's parameters (but the
    node's own rank) and the DeepSpeed config."""
    values = {k: v for k, v in params.to_dict().items() if k != "node_rank"}
    return fingerprint({"stage": stage, "params": values, "deepspeed": dict(ds_config)})


@contextlib.contextmanager
def node_zero(stage: str, params: StageParams, ds_config: Mapping[str, Any], cluster: Cluster):
    """Node 0's session of a multi-node stage (None for one node): the one the project hook
    opened for the whole ``kedro run`` (:func:`open_sessions`), else one for this stage."""
    if not cluster.several:
        yield None
        return
    session = OPEN_SESSIONS.get(Path(params.stage_run_dir).resolve())
    if session is not None:
        yield session
        return
    session = NodeZero(params.stage_run_dir, cluster, params.node_timeout_s).open()
    try:
        session.gather(node_fingerprint(stage, params, ds_config))
        yield session
    except BaseException as err:
        session.close(ended=f"{type(err).__name__}: {err}")
        raise
    else:
        session.close()


OPEN_SESSIONS: dict[Path, NodeZero] = {}


def multinode_stages(stage_params: Mapping[str, StageParams]) -> dict[str, Cluster]:
    """The stages (of those given, in their order) that span several nodes, with this node's
    place in each; every one must give this node the same rank."""
    found = {name: p.cluster() for name, p in stage_params.items()}
    found = {name: c for name, c in found.items() if c.several}
    ranks = {c.node_rank for c in found.values()}
    if len(ranks) > 1:
        raise NodeError(f"the multi-node stages {sorted(found)} give this node different "
                        f"node_rank values {sorted(ranks)}")
    return found


def open_sessions(stage_params: Mapping[str, StageParams],
                  ds_config: Mapping[str, Any]) -> None:
    """Node 0, at the start of a ``kedro run``: open every multi-node stage's session and wait
    (bounded) for every node's answer, so that a missing node, a run dir that is not shared or
    other parameters stop the run before any work."""
    try:
        for name, cluster in multinode_stages(stage_params).items():
            params = stage_params[name]
            session = NodeZero(params.stage_run_dir, cluster, params.node_timeout_s).open()
            OPEN_SESSIONS[Path(params.stage_run_dir).resolve()] = session
            session.gather(node_fingerprint(name, params, ds_config))
    except BaseException as err:
        close_sessions(f"{type(err).__name__}: {err}")
        raise


def close_sessions(ended: str = "done") -> None:
    while OPEN_SESSIONS:
        OPEN_SESSIONS.popitem()[1].close(ended)


def follow_stages(stage_params: Mapping[str, StageParams],
                  ds_config: Mapping[str, Any]) -> list[str]:
    """Node R > 0 of a ``kedro run``: answer node 0's sessions of the multi-node stages, then
    lend this node's processes to each stage in turn when node 0 reaches it. Writes nothing
    but the launch files and this node's launch log. Returns the stages followed."""
    clusters = multinode_stages(stage_params)
    nodes = {}
    for name, cluster in clusters.items():
        params = stage_params[name]
        nodes[name] = OtherNode(params.stage_run_dir, cluster, params.node_timeout_s)
        nodes[name].join(node_fingerprint(name, params, ds_config))
    remaining = dict(clusters)
    while remaining:  # in the order node 0 reaches them (Kedro's, not necessarily this one)
        ready = {name: plan for name in remaining if (plan := nodes[name].poll_plan())}
        if not ready:
            time.sleep(0.5)
            continue
        name, plan = next(iter(ready.items()))
        cluster, params = remaining.pop(name), stage_params[name]
        logger.info("node %d: node 0 reached %s; starting %d processes", cluster.node_rank,
                    name, params.num_processes)
        run_distributed(plan, params.num_processes, params.launcher,
                        run_dir=params.stage_run_dir, run_name=name, cluster=cluster)
    return list(clusters)
