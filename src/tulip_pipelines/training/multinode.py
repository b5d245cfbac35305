"""Several nodes running the same ``kedro run``: where each node stands (:class:`Cluster`), and
how the nodes agree on what to train before DeepSpeed's launcher joins their processes
(:class:`NodeZero`, :class:`OtherNode`).

Every node runs ``kedro run --env ... --pipelines <name>`` with the stage's ``num_nodes``,
``node_rank``, ``master_addr`` (and ``master_port``) as parameters, or with the values a
scheduler sets (SLURM's ``SLURM_NNODES``/``SLURM_NODEID``, ``MASTER_ADDR``/``MASTER_PORT``).
Node 0 runs the pipeline; the other nodes only lend their processes to its multi-node stages and
write nothing (no catalog output, no MLflow).

The nodes meet in the stage's run dir, which must be on a filesystem they all share (rank 0
marks a checkpoint complete only after every rank wrote its shards there). In
``<run_dir>/launch/``:

- ``node0.json``: node 0's session id and a counter it advances every second while it lives;
- ``node<R>.json``: node R's answer to that session, with the fingerprint of its parameters;
- ``verdict.json``: node 0's decision once every node answered (go, or the cause to stop);
- ``plan.json``: the launch plan of the stage, published when node 0 reaches it.

Each wait is bounded (``node_timeout_s``): a node that never answers, a node 0 that is never
seen (not started, or the run dir is not shared), a node 0 that stops advancing its counter,
or parameters that differ between nodes stop every node with a message naming the node and the
cause. DeepSpeed's rendezvous itself is bounded by the same timeout (see :mod:`.launch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LAUNCH_DIR = "launch"
DEFAULT_PORT = 29500
BEAT_S = 1.0


class NodeError(RuntimeError):
    """A multi-node stage cannot start or go on: names the node and the cause."""


@dataclass(frozen=True)
class Cluster:
    """Where this node stands in a stage's job. ``hostfile``: DeepSpeed's own multi-node mode
    instead (node 0 starts every node over ssh; the other nodes run nothing)."""

    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    hostfile: str | None = None

    @classmethod
    def resolve(cls, num_nodes: int | None = None, node_rank: int | None = None,
                master_addr: str | None = None, master_port: int | None = None,
                hostfile: str | None = None, *, where: str = "stage",
                environ: Mapping[str, str] | None = None) -> Cluster:
        """Parameters first, then the scheduler's environment (``SLURM_NNODES``,
        ``SLURM_NODEID``, ``MASTER_ADDR``, ``MASTER_PORT``), then one node on 127.0.0.1.
        ``where`` names the parameters in errors (e.g. ``distill``)."""
        env = os.environ if environ is None else environ

        def pick(value, key: str, default, kind=int):
            if value is not None:
                return value
            raw = env.get(key)
            if raw in (None, ""):
                return default
            try:
                return kind(raw)
            except ValueError:
                raise NodeError(f"{where}: environment variable {key}={raw!r} is not "
                                f"{'a number' if kind is int else 'valid'}") from None

        nodes = pick(num_nodes, "SLURM_NNODES", 1)
        rank = pick(node_rank, "SLURM_NODEID", 0)
        addr = pick(master_addr, "MASTER_ADDR", None, str)
        port = pick(master_port, "MASTER_PORT", DEFAULT_PORT)
        if not isinstance(nodes, int) or nodes < 1:
            raise NodeError(f"{where}.num_nodes must be an integer >= 1, got {nodes!r}")
        if not isinstance(rank, int) or not 0 <= rank < nodes:
            raise NodeError(f"node {rank}: {where}.node_rank={rank!r} is out of range for "
                            f"num_nodes={nodes} (0 to {nodes - 1})")
        if nodes > 1 and not addr:
            raise NodeError(f"node {rank}: {where}.master_addr is not set (nor MASTER_ADDR): "
                            f"{nodes} nodes need node 0's address")
        if hostfile and nodes > 1:
            raise NodeError(f"{where}: give either hostfile (node 0 starts every node over ssh) "
                            f"or num_nodes > 1 (every node runs kedro), not both")
        return cls(nodes, rank, addr or "127.0.0.1", int(port), hostfile)

    @property
    def several(self) -> bool:
        return self.num_nodes > 1


def launch_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LAUNCH_DIR


def fingerprint(values: Mapping[str, Any]) -> str:
    """Short hash of a stage's parameters as every node must have them."""
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write(path: Path, record: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class NodeZero:
    """Node 0's side of a multi-node stage: ``open()`` a session, wait for every node's answer
    and check their fingerprints (``gather``), ``publish`` the launch plan, ``close``."""

    def __init__(self, run_dir: str | Path, cluster: Cluster, timeout_s: float):
        self.dir, self.cluster, self.timeout_s = launch_dir(run_dir), cluster, timeout_s
        self.session = uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beating, daemon=True, name="node0-beat")

    def open(self) -> NodeZero:
        if self.dir.exists():  # a previous session's files: never read by the new one
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._write_beat(0)
        self._beat.start()
        logger.info("node 0: session %s in %s, waiting for %d other node(s)", self.session,
                    self.dir, self.cluster.num_nodes - 1)
        return self

    def _write_beat(self, count: int, ended: str | None = None) -> None:
        _write(self.dir / "node0.json", {"session": self.session, "count": count,
                                        "host": socket.gethostname(), "ended": ended})

    def _beating(self) -> None:
        count = 0
        while not self._stop.wait(BEAT_S):
            count += 1
            self._write_beat(count)

    def gather(self, expected: str) -> None:
        """Wait for every other node's answer to this session and compare its fingerprint with
        ``expected``; write the verdict (every node reads it). Raises :class:`NodeError`."""
        deadline = time.monotonic() + self.timeout_s
        answers: dict[int, dict[str, Any]] = {}
        others = range(1, self.cluster.num_nodes)
        while len(answers) < len(others):
            for rank in others:
                record = _read(self.dir / f"node{rank}.json")
                if record and record.get("session") == self.session:
                    answers[rank] = record
            if len(answers) == len(others):
                break
            if time.monotonic() > deadline:
                missing = [r for r in others if r not in answers]
                self._fail(f"node(s) {missing} did not answer within {self.timeout_s:.0f} s: "
                           f"not started, or {self.dir.parent} is not on a filesystem that "
                           f"they share with node 0")
            time.sleep(0.2)
        for rank, record in sorted(answers.items()):
            if record.get("fingerprint") != expected:
                self._fail(f"node {rank} ({record.get('host')}) runs other parameters than "
                           f"node 0 (fingerprint {record.get('fingerprint')} vs {expected}): "
                           f"every node must run the same command with the same configuration")
        _write(self.dir / "verdict.json", {"session": self.session, "go": True})
        logger.info("node 0: all %d nodes answered with the same parameters",
                    self.cluster.num_nodes)

    def publish(self, plan: Mapping[str, Any]) -> None:
        _write(self.dir / "plan.json", {"session": self.session, "plan": dict(plan)})

    def _fail(self, cause: str) -> None:
        _write(self.dir / "verdict.json", {"session": self.session, "go": False,
                                           "cause": cause})
        self.close(ended=cause)
        raise NodeError(f"node 0: {cause}")

    def close(self, ended: str = "done") -> None:
        if self._beat.is_alive():
            self._stop.set()
            self._beat.join()
            self._write_beat(-1, ended)


class OtherNode:
    """Node R > 0's side: find node 0's live session (``join``), wait for its verdict and the
    launch plan (``wait_plan``)."""

    def __init__(self, run_dir: str | Path, cluster: Cluster, timeout_s: float):
        self.dir, self.cluster, self.timeout_s = launch_dir(run_dir), cluster, timeout_s
        self.me = f"node {cluster.node_rank}"
        self.session: str | None = None
        self._last_count: Any = None  # node 0's counter as last read, and when it last moved
        self._last_change = time.monotonic()

    def join(self, mine: str) -> None:
        """Answer node 0's live session with fingerprint ``mine``; wait for the verdict."""
        deadline = time.monotonic() + self.timeout_s
        first = None
        while self.session is None:  # a session whose counter advances: node 0 lives now
            beat = _read(self.dir / "node0.json")
            if beat and beat.get("ended") is None:
                if first is None or first["session"] != beat["session"]:
                    first = beat
                elif beat["count"] != first["count"]:
                    self.session = beat["session"]
                    break
            if time.monotonic() > deadline:
                raise NodeError(f"{self.me}: no live node 0 in {self.dir} within "
                                f"{self.timeout_s:.0f} s: node 0 did not start, or the run dir "
                                f"is not on a filesystem this node shares with node 0")
            time.sleep(0.2)
        _write(self.dir / f"node{self.cluster.node_rank}.json",
               {"session": self.session, "fingerprint": mine, "host": socket.gethostname()})
        verdict = self._wait_for("verdict.json", "its verdict")
        if not verdict.get("go"):
            raise NodeError(f"{self.me}: node 0 stopped the job: {verdict.get('cause')}")
        logger.info("%s: joined node 0's session %s", self.me, self.session)

    def poll_plan(self) -> dict[str, Any] | None:
        """Node 0's launch plan if it has reached the stage, else None (as long as node 0
        lives: :class:`NodeError` when it ended its session or stopped advancing its counter)."""
        record = _read(self.dir / "plan.json")
        if record and record.get("session") == self.session:
            return record["plan"]
        self._check_node0("the launch plan")
        return None

    def _wait_for(self, name: str, what: str) -> dict[str, Any]:
        """``name`` of this session, within the timeout, as long as node 0 lives."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            record = _read(self.dir / name)
            if record and record.get("session") == self.session:
                return record
            self._check_node0(what)
            if time.monotonic() > deadline:
                raise NodeError(f"{self.me}: no {what} from node 0 within {self.timeout_s:.0f} s")
            time.sleep(0.2)

    def _check_node0(self, what: str) -> None:
        """Node 0 must keep its session open and its counter advancing."""
        beat = _read(self.dir / "node0.json") or {}
        if beat.get("session") != self.session or beat.get("ended"):
            raise NodeError(f"{self.me}: node 0 ended its session before {what}: "
                            f"{beat.get('ended') or 'a new session started'}")
        now = time.monotonic()
        if beat.get("count") != self._last_count:
            self._last_count, self._last_change = beat.get("count"), now
        elif now - self._last_change > self.timeout_s:
            raise NodeError(f"{self.me}: node 0 stopped answering (its counter in "
                            f"{self.dir / 'node0.json'} did not advance for "
                            f"{self.timeout_s:.0f} s) while waiting for {what}")
