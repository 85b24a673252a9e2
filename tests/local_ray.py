"""A real Ray cluster on this machine for tests and benchmarks: a head (no CPUs: it schedules) and worker nodes, each
a separate `ray start --block` process with its own raylet, stopped with SIGTERM afterwards (only these nodes: not
`ray stop`, which would end every Ray process of the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = shutil.which("ray", path=str(Path(sys.executable).parent))
_COUNT_NODES = "import ray,sys; ray.init(address=sys.argv[1]); print(sum(n['Alive'] for n in ray.nodes()))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(address: str) -> int:
    """Live nodes, asked from another process (the caller stays unconnected until it connects on purpose)."""
    probe = subprocess.run([sys.executable, "-c", _COUNT_NODES, address], capture_output=True, text=True, timeout=120)
    return int(probe.stdout.strip() or 0)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@dataclass
class LocalCluster:
    address: str
    nodes: list[subprocess.Popen[bytes]]

    def running(self, title: str) -> list[int]:
        """PIDs of this cluster's processes (descendants of its own nodes, never another run's) whose command line
        starts with `title`, as Ray names a worker running a task (`ray::encode_task`)."""
        found = []
        for node in self.nodes:
            try:
                children = psutil.Process(node.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if " ".join(child.cmdline()).startswith(title):
                        found.append(child.pid)
                except psutil.Error:  # it ended while we looked
                    continue
        return found


@contextmanager
def local_cluster(
    logs: Path, workers: int = 2, cpus_per_worker: int = 1, timeout: float = 300
) -> Iterator[LocalCluster]:
    """Start the cluster, yield it, stop it; each node's output goes to `logs`/NAME.log."""
    if RAY is None:
        raise RuntimeError("the ray command is missing from the virtualenv: make setup installs it")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}

    def node(name: str, *args: str) -> subprocess.Popen[bytes]:
        assert RAY is not None
        log = (logs / f"{name}.log").open("w")
        return subprocess.Popen([RAY, "start", *args, "--block", "--disable-usage-stats"], stdout=log,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip

    nodes = [node("head", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false")]
    try:
        deadline = time.monotonic() + timeout
        while not _answers(port):
            assert time.monotonic() < deadline and nodes[0].poll() is None, (logs / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        # one worker at a time: two raylets starting at once on a small machine can time out
        for i in range(workers):
            nodes.append(node(f"worker{i}", f"--address={address}", f"--num-cpus={cpus_per_worker}"))
            while alive(address) != i + 2:
                log = (logs / f"worker{i}.log").read_text()[-2000:]
                assert time.monotonic() < deadline and nodes[-1].poll() is None, log
                time.sleep(1)
        yield LocalCluster(address, nodes)
    finally:
        for started in reversed(nodes):
            started.send_signal(signal.SIGTERM)
        for started in nodes:
            try:
                started.wait(timeout=60)
            except subprocess.TimeoutExpired:
                started.kill()
