"""Start and stop a private multi-node Ray cluster on 127.0.0.1 for integration tests.

Every node is started with ``ray start`` from this venv, under one private ``--temp-dir``
(so ``ray.init()`` elsewhere on the machine never discovers it through
``/tmp/ray/ray_current_cluster``). Teardown kills only the processes this cluster started
(found by that temp dir and by the raylets' process trees), never a global ``ray stop``.
Processes are read from ``/proc`` (Linux), so no extra dependency is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "WorkerNode", "free_port"]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

# The GCS probes each raylet every second and declares a node dead after 5 failed probes in a
# row. A SIGKILLed raylet refuses the probe at once, so a lost node is noticed in ~5 s instead
# of ~15 s; a raylet that is merely slow still gets the default 10 s per probe.
HEAD_SYSTEM_CONFIG = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``ray`` commands: this venv first on PATH, no auth, no global address."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # despite its name: allow multi-node
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra or {})
    return env


def cmdline(pid: int) -> list[str]:
    """The process's argv ([] when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def pids() -> list[int]:
    """Every PID on the machine."""
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parent = {p: _ppid(p) for p in pids()}
    out, frontier = [pid], [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return [p for p in out if cmdline(p) or p == pid]


def alive(pid: int) -> bool:
    """Whether the process exists (and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_pids(targets: list[int], sig: int = signal.SIGKILL, wait: float = 10) -> None:
    """Send ``sig`` to each PID and wait until they are gone."""
    for p in targets:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            continue
    deadline = time.time() + wait
    while time.time() < deadline and any(alive(p) for p in targets):
        time.sleep(0.1)


def node_port_flags(node_manager_port: int) -> list[str]:
    """Fresh ports for one node's agents (the defaults, e.g. 52365, clash between nodes here)."""
    return [
        f"--node-manager-port={node_manager_port}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


@dataclass
class WorkerNode:
    """A non-head node: its raylet's node-manager port identifies its processes."""

    node_manager_port: int
    resources: dict[str, float]
    started: list[int] = field(default_factory=list)

    def raylet(self) -> int | None:
        """The PID of the node's raylet (None once it is gone)."""
        flag = f"--node_manager_port={self.node_manager_port}"
        for p in pids():
            cmd = cmdline(p)
            if cmd and cmd[0].endswith("raylet") and flag in cmd:
                return p
        return None

    def processes(self) -> list[int]:
        """PIDs of the raylet and everything it spawned (agents, workers, actors)."""
        r = self.raylet()
        return tree(r) if r else []

    def kill(self) -> list[int]:
        """SIGKILL the node's processes (a machine failure); return the PIDs killed.

        That is what its ``ray start`` spawned plus everything its raylet spawned since.
        """
        targets = sorted(set(self.processes()) | {p for p in self.started if alive(p)})
        kill_pids(targets)
        return targets


@dataclass
class LocalCluster:
    """A head node plus worker nodes on 127.0.0.1, all on one private temp dir.

    Parameters
    ----------
    head_cpus
        Logical CPUs of the head node.
    object_store_memory
        Bytes of object store per node.
    """

    head_cpus: float = 1
    object_store_memory: int = 300 * 1024 * 1024
    temp_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="rpc-", dir="/tmp"))
    )
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    workers: list[WorkerNode] = field(default_factory=list)
    _client: Any = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """GCS address (``ray start --address`` / ``ray.init``)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """Dashboard URL (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment for commands that talk to this cluster."""
        return cluster_env({"RAY_ADDRESS": self.dashboard})

    def _ray(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
        res = subprocess.run(
            [RAY, *args],
            env=cluster_env(env),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def start(self) -> LocalCluster:
        """Start the head node (with the dashboard and job server)."""
        self._ray(
            "start",
            "--head",
            f"--port={self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *node_port_flags(free_port()),
            env=HEAD_SYSTEM_CONFIG,
        )
        self.wait_for_dashboard()
        return self

    def add_worker(
        self, num_cpus: float = 1, resources: dict[str, float] | None = None
    ) -> WorkerNode:
        """Start a worker node joined to the head; return its handle."""
        node = WorkerNode(free_port(), dict(resources or {}))
        args = [
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
            *node_port_flags(node.node_manager_port),
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if node.resources:
            args.append(f"--resources={json.dumps(node.resources)}")
        before = set(self.processes())
        self._ray(*args)
        self.workers.append(node)
        deadline = time.time() + 60
        while node.raylet() is None:
            if time.time() > deadline:
                raise RuntimeError(f"worker raylet on port {node.node_manager_port} did not start")
            time.sleep(0.1)
        node.started = sorted(set(self.processes()) - before)
        return node

    def wait_for_dashboard(self, timeout: float = 90) -> None:
        """Block until the job server answers."""
        import urllib.request

        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"dashboard {self.dashboard} did not come up")
            time.sleep(0.25)

    def processes(self) -> list[int]:
        """PIDs of this cluster: any process naming its temp dir, plus their descendants."""
        tag = str(self.temp_dir)
        found: set[int] = set()
        for p in pids():
            if any(tag in a for a in cmdline(p)):
                found.update(tree(p))
        for w in self.workers:
            found.update(w.processes())
        found.discard(os.getpid())
        return sorted(found)

    def stop(self) -> None:
        """Kill every process this cluster started and remove its temp dir."""
        targets = self.processes()
        kill_pids(targets, signal.SIGTERM, wait=3)  # nothing to flush: then SIGKILL the rest
        kill_pids([p for p in targets if alive(p)])
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def job(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``ray job <args>`` against this cluster's dashboard."""
        return subprocess.run(
            [RAY, "job", *args],
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def client(self) -> Any:
        """A ``JobSubmissionClient`` for this cluster's dashboard (made once)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard)
        return self._client

    def submit_job(
        self,
        job_id: str,
        entrypoint: list[str],
        timeout: float = 120,
        env_vars: dict[str, str] | None = None,
    ) -> None:
        """Submit ``entrypoint`` with this repo as working dir through the SDK (no CLI start-up).

        Same request as ``ray job submit --no-wait --working-dir .`` (plus ``env_vars`` in the
        runtime env, e.g. a test S3 endpoint); retried while the head's job agent is still
        starting.
        """
        import shlex

        deadline = time.time() + timeout
        while True:
            try:
                self.client().submit_job(
                    entrypoint=shlex.join(entrypoint),
                    submission_id=job_id,
                    runtime_env={"working_dir": str(ROOT), "env_vars": dict(env_vars or {})},
                )
                return
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
            time.sleep(1)

    def submit(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ray job submit <args>``, retried while the head's job agent is still starting."""
        deadline = time.time() + timeout
        while True:
            res = self.job("submit", *args)
            if res.returncode == 0 or "No available agent" not in res.stdout + res.stderr:
                return res
            if time.time() > deadline:
                return res
            time.sleep(2)

    def job_status(self, job_id: str) -> str:
        """The job's status word (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        return str(self.client().get_job_status(job_id).value)

    def wait_job(self, job_id: str, timeout: float = 240) -> str:
        """Poll until the job ends; return its final status."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
                return status
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still running after {timeout} s")

    def job_logs(self, job_id: str) -> str:
        """The driver's log."""
        return str(self.client().get_job_logs(job_id))
