"""A real multi-node Ray cluster on loopback, for the tests and benchmarks/scale_out.py.

    cluster = LocalRayCluster(workers=1).start()     # `ray start --head` + one `ray start --address=...`
    cfg --set orchestration.task_runner=ray --set orchestration.ray_address=<cluster.address>
    cluster.stop()                                    # by pid

Each node is its own raylet (its own worker processes), so killing a worker process, or a whole node, is what it
is on a real cluster. Everything is private to this cluster: a fresh `--temp-dir` (Ray's default /tmp/ray is
shared by every Ray user of the machine, and `ray.init()` would join whatever cluster it names) and free ports
for the GCS and the services that otherwise default to fixed ones. `stop()` ends this cluster's processes by
pid (found by its temp dir and GCS address on their command lines), never with `ray stop`, which stops every
Ray process of the machine by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.procs import LOOPBACK, free_port


class RayClusterError(RuntimeError):
    """`ray start` failed (the message carries the tail of its output)."""


def ray_bin() -> str:
    """The `ray` CLI next to this Python (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / "ray"
    if cand.is_file():
        return str(cand)
    found = shutil.which("ray")
    if not found:
        raise RayClusterError("the `ray` CLI is not installed (pip install 'ray[default]')")
    return found


@dataclass
class LocalRayCluster:
    """A head node plus `workers` worker nodes on 127.0.0.1, `cpus_per_node` CPUs each (`gpus_per_node`
    declares GPUs Ray schedules by, for testing GPU placement without one). `env` reaches every node's
    processes (node-level credentials, as on a real cluster)."""

    workers: int = 1
    cpus_per_node: int = 1
    gpus_per_node: int = 0
    env: dict[str, str] = field(default_factory=dict)
    head_cpus: int | None = None  # None: cpus_per_node
    temp_dir: str = ""
    port: int = 0
    client_port: int = 0  # the Ray client server (`ray://127.0.0.1:<client_port>`)
    startup_s: dict[str, float] = field(default_factory=dict)
    nodes: int = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _run(self, args: list[str], timeout: float = 300) -> None:
        # RAY_AUTH_MODE unset + a token in ~/.ray/auth_token (any earlier local `ray.init()` makes one) puts
        # the head into token mode, but `ray start --address` nodes do not send it: say it explicitly. This is
        # a loopback cluster; a real one should use token auth (`ray get-auth-token --generate`, all nodes).
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **self.env, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        res = subprocess.run([ray_bin(), *args], env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode:
            raise RayClusterError(f"ray {' '.join(args[:2])} failed: {(res.stdout + res.stderr)[-1500:]}")

    def _common(self, cpus: int) -> list[str]:
        used = {self.port}
        ports = [free_port(avoid=used) for _ in range(3)]
        return [
            f"--num-cpus={cpus}",
            f"--num-gpus={self.gpus_per_node}",
            f"--node-ip-address={LOOPBACK}",
            f"--dashboard-agent-listen-port={ports[0]}",
            f"--metrics-export-port={ports[1]}",
            f"--runtime-env-agent-port={ports[2]}",
            "--disable-usage-stats",
        ]

    def start(self) -> LocalRayCluster:
        # short: Ray puts unix sockets under it (107-byte limit)
        self.temp_dir = self.temp_dir or tempfile.mkdtemp(prefix="ifray-", dir="/tmp")
        self.port = self.port or free_port()
        self.client_port = self.client_port or free_port(avoid={self.port})
        t0 = time.perf_counter()
        try:
            self._run(
                [
                    "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                    f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}",
                    *self._common(self.cpus_per_node if self.head_cpus is None else self.head_cpus),
                ]
            )  # fmt: skip
            self.nodes = 1
            self.startup_s["head"] = round(time.perf_counter() - t0, 1)
            for _ in range(self.workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self) -> None:
        """One more worker node (its own raylet) joined to the head."""
        t0 = time.perf_counter()
        self._run(["start", f"--address={self.address}", *self._common(self.cpus_per_node)])
        self.nodes += 1
        self.startup_s[f"node{self.nodes - 1}"] = round(time.perf_counter() - t0, 1)

    def _processes(self) -> dict[int, tuple[int, str]]:
        """This cluster's processes {pid: (ppid, args)}: those whose command line names its temp dir or GCS
        address, and all their descendants (Ray renames its task workers `ray::<task>`)."""
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        table: dict[int, tuple[int, str]] = {}
        for line in out.splitlines():
            parts = line.strip().split(None, 2)
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                table[int(parts[0])] = (int(parts[1]), parts[2])
        keys = [k for k in (self.temp_dir, f"{LOOPBACK}:{self.port}" if self.port else "") if k]
        me = os.getpid()
        mine = {
            p
            for p, (_, args) in table.items()
            if p != me and "ps -eo" not in args and any(k in args for k in keys)
        }
        grew = True
        while grew:
            kids = {p for p, (pp, _) in table.items() if pp in mine and p not in mine and p != me}
            grew = bool(kids)
            mine |= kids
        return {p: table[p] for p in mine}

    def pids(self) -> list[int]:
        """pids of this cluster's processes (raylets, GCS, agents, task workers)."""
        return sorted(self._processes())

    def worker_pids(self) -> list[int]:
        """pids of this cluster's Ray worker processes (the ones that run tasks)."""
        return sorted(
            p
            for p, (_, args) in self._processes().items()
            if args.startswith("ray::") and not args.endswith("Agent")  # not ray::DashboardAgent & co
        )

    def stop(self, timeout: float = 10.0) -> float:
        """Stop this cluster's processes by pid (SIGTERM, then SIGKILL) and remove its temp dir."""
        t0 = time.perf_counter()
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            while time.monotonic() < end and self.pids():
                time.sleep(0.3)
        if self.temp_dir and not self.pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return round(time.perf_counter() - t0, 1)
