"""No library call touches the network or a compiler: with the caches warm, the library paths run with sockets and
child processes refused; with them cold, each says which command fetches or builds what is missing."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dynq
from dynq.deploy.shards import merge, split
from dynq.llamacpp_tools import tool
from dynq.sources.synthetic import write_synthetic

ZOO = "zoo:smollm2-135m"


class Refused(Exception):
    pass


def refuse(*args: Any, **kwargs: Any) -> Any:
    raise Refused("a network connection or a child process was asked for")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Sockets cannot connect or resolve names and no child process can start (pip, cmake, compilers)."""
    dynq.fetch(ZOO)  # the caches warm, before the doors close
    dynq.fetch(dynq.TEXTS)
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


def test_the_doors_are_really_closed(offline: None) -> None:
    with pytest.raises(Refused):
        subprocess.run(["true"])
    with pytest.raises(Refused):
        socket.create_connection(("127.0.0.1", 9))


def test_library_paths_run_offline(offline: None, tmp_path: Path) -> None:
    ctx = dynq.RunContext(threads=2)
    assert dynq.inspect(ZOO).n_tensors > 0
    assert dynq.plan(ZOO, "dyn-q2_k_xl").total_bytes > 0
    assert dynq.offload(ZOO, dynq.Hardware(vram=4 << 30)).best.fits
    tiny = write_synthetic("llama", tmp_path / "tiny.gguf")
    imatrix = dynq.collect_imatrix(tiny, text=dynq.calibration(), n_ctx=64, chunks=1, ctx=ctx)
    out = tmp_path / "q.gguf"
    result = dynq.quantize(dynq.plan(tiny, "uniform-iq2_xxs"), out, imatrix=imatrix, ctx=ctx, reuse_encoded=True)
    assert result.files == [out]
    scores = dynq.evaluate(out, tiny, text=dynq.evaluation(), n_ctx=64, chunks=1, ctx=ctx)
    assert scores.kld_mean > 0
    parts = split(out, tmp_path / "s.gguf", n_shards=2).files
    assert merge(parts[0], tmp_path / "m.gguf").files[0].read_bytes() == out.read_bytes()
    with pytest.raises(Refused):  # and the explicit entry points are the ones that reach out
        dynq.fetch("zoo:gemma3-270m", ctx=dynq.RunContext(cache_dir=tmp_path / "empty"))


def test_cold_caches_name_the_command(tmp_path: Path) -> None:
    empty = dynq.RunContext(cache_dir=tmp_path / "empty")
    with pytest.raises(dynq.DynqError, match=r"run `dynq fetch zoo:gemma3-270m`"):
        dynq.plan("zoo:gemma3-270m", "dyn-iq1_s", ctx=empty)
    with pytest.raises(dynq.DynqError, match=r"run `dynq fetch texts`"):
        dynq.calibration(ctx=empty)
    with pytest.raises(dynq.DynqError, match=r"run `dynq build-tools`"):
        tool("llama-quantize", empty.cache_dir)
