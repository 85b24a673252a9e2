"""quantize and profile on a real Ray cluster: a head and two worker nodes started as separate `ray start` processes
(one CPU each for the workers, none for the head), torn down afterwards. Outputs equal serial runs byte for byte,
also when a worker process is killed mid-task; a task that fails by itself fails the run once, with its name."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dynq
from dynq.errors import DynqError
from dynq.executors import LocalProcesses, RayCluster
from dynq.lab.synthetic import TINY_LLAMA, write_random
from dynq.sources.shapes import dense_tensors
from local_ray import LocalCluster, free_port, local_cluster
from runs import measurements
from tiny_models import llama_tensors, write_gguf

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("ray"), workers=2) as started:
        yield started


@pytest.fixture
def cluster(ray_cluster: LocalCluster) -> str:
    return ray_cluster.address


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic llama of 40M parameters in float (profile needs a float reference): tasks long enough to be seen
    running on a worker, a model quick to quantize several times."""
    config = dataclasses.replace(TINY_LLAMA, n_layer=6, n_embd=768, n_ff=2048)
    return write_random(tmp_path_factory.mktemp("cluster") / "llama-40m.gguf", "llama", *dense_tensors(config))


def quantize_cli(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynq.cli", "quantize", str(source), "-r", "uniform-q4_k", "-o",
                           str(out), *extra], capture_output=True, text=True, timeout=900)  # fmt: skip


def test_quantize_on_the_cluster_equals_serial(cluster: str, reference: Path, tmp_path: Path) -> None:
    serial, remote = tmp_path / "serial.gguf", tmp_path / "ray.gguf"
    assert quantize_cli(reference, serial, "--threads", "2").returncode == 0
    done = quantize_cli(reference, remote, "--ray", cluster)
    assert done.returncode == 0, done.stderr
    assert "3 nodes, 2 CPUs" in done.stderr
    assert remote.read_bytes() == serial.read_bytes()


@pytest.mark.slow  # fault injection on the cluster: the long lane
def test_a_worker_killed_mid_task_is_retried(ray_cluster: LocalCluster, reference: Path, tmp_path: Path) -> None:
    serial, remote = tmp_path / "serial.gguf", tmp_path / "ray.gguf"
    assert quantize_cli(reference, serial, "--threads", "2").returncode == 0
    killed: list[int] = []
    finished = threading.Event()

    def kill_a_busy_worker() -> None:  # a worker of this test's own cluster, found among its nodes' descendants
        while not killed and not finished.is_set():
            found = ray_cluster.running("ray::encode_task")
            if found:
                os.kill(found[0], signal.SIGKILL)
                killed.append(found[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    try:
        done = quantize_cli(reference, remote, "--ray", ray_cluster.address)
    finally:
        finished.set()
        killer.join()
    assert killed, "no worker was seen running a task"
    assert done.returncode == 0, done.stderr
    assert remote.read_bytes() == serial.read_bytes()


@pytest.mark.slow
def test_a_task_that_fails_by_itself_fails_the_run_once(cluster: str, tmp_path: Path) -> None:
    tensors = [(n, v.copy(), t) for n, v, t in llama_tensors()]
    name, values, _ = tensors[5]
    values[0, 0] = np.nan
    source = tmp_path / "nan.gguf"
    write_gguf(source, tensors)
    done = quantize_cli(source, tmp_path / "out.gguf", "--ray", cluster)  # retried forever, it would time out
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0] and "NaN" in errors[0], done.stderr
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two profiles, one of them through Ray
def test_profile_on_the_cluster_equals_serial(cluster: str, reference: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    common = ["profile", str(reference), "--text", str(text), "--ctx", "64", "--chunks", "1", "--rows", "32",
              "--group-blocks", "30"]  # fmt: skip
    outputs = {}
    for label, extra in (("serial", ["--threads", "2"]), ("ray", ["--ray", cluster])):
        # a cache each: the second run must measure, not read the first one's profile
        env = os.environ | {"DYNQ_CACHE_DIR": str(tmp_path / f"cache-{label}")}
        out = tmp_path / f"{label}.json"
        done = subprocess.run([sys.executable, "-m", "dynq.cli", *common, *extra, "-o", str(out)],
                              capture_output=True, text=True, timeout=1800, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs[label] = measurements(tmp_path / f"{label}.json")
    assert outputs["ray"] == outputs["serial"]


def test_local_processes_equal_serial(reference: Path, tmp_path: Path) -> None:
    plan = dynq.plan(reference, "uniform-iq4_nl")
    ctx = dynq.RunContext(threads=2)
    serial = dynq.quantize(plan, tmp_path / "serial.gguf", ctx=ctx).files[0]
    pool = LocalProcesses(2)
    try:
        local = dynq.quantize(plan, tmp_path / "local.gguf", ctx=ctx, executor=pool).files[0]
    finally:
        pool.close()
    assert local.read_bytes() == serial.read_bytes()


def test_no_cluster_there_is_one_line(reference: Path, tmp_path: Path) -> None:
    # about as quick as a run refused for a source that does not exist (the same start and imports, measured beside
    # it, so a busy machine slows both): no wait for Ray's own connect timeouts
    started = time.perf_counter()
    assert quantize_cli(tmp_path / "missing.gguf", tmp_path / "out.gguf").returncode == 1
    baseline = time.perf_counter() - started
    started = time.perf_counter()
    done = quantize_cli(reference, tmp_path / "out.gguf", "--ray", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "no Ray cluster answers there" in done.stderr and "Traceback" not in done.stderr
    assert time.perf_counter() - started < 2 * baseline + 10
    with pytest.raises(DynqError, match="no Ray cluster"):
        RayCluster(f"127.0.0.1:{free_port()}")
