"""Where work runs: local worker processes are capped by the CPUs this process may use, and the cap is said."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import dynq
from dynq import executors
from dynq.executors import LocalProcesses


def test_more_processes_than_cpus_are_capped_and_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Probe N15: `--processes 10000` started a worker per task in flight (22, 5.5 GB for a 2.7 MB model)."""
    monkeypatch.setattr(executors, "usable_cpus", lambda: 3)
    with caplog.at_level(logging.WARNING, logger="dynq.executors"):
        pool = dynq.executor(processes=10_000)
    try:
        assert isinstance(pool, LocalProcesses)
        assert (pool.workers, pool.task_threads, pool.name) == (3, 1, "3 local processes")
    finally:
        pool.close()
    assert [r.getMessage() for r in caplog.records] == [
        "10,000 worker processes asked for, and this machine gives dynq 3 CPUs: using 3"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dynq.executors"):
        pool = LocalProcesses(2)  # within the CPUs: as asked, nothing said
    pool.close()
    assert pool.workers == 2 and not caplog.records


def test_the_cli_says_when_it_caps_the_processes(tmp_path: Path) -> None:
    model = dynq.write_synthetic("llama", tmp_path / "m.gguf")
    out = tmp_path / "q.gguf"
    done = subprocess.run([sys.executable, "-m", "dynq.cli", "quantize", str(model), "-r", "uniform-q4_k", "-o",
                           str(out), "--processes", "10000"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    cpus = executors.usable_cpus()
    said = " ".join(done.stderr.split())
    assert f"10,000 worker processes asked for, and this machine gives dynq {cpus} CPUs: using {cpus}" in said
    assert f"encoding on {cpus} local processes" in said and out.exists()
