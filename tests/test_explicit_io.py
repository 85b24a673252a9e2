"""No library call touches the network or a compiler: with the caches warm, the library paths run with sockets and
child processes refused; with them cold, each says which command fetches or builds what is missing."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dynq
from dynq.deploy.shards import merge, split
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.converter import converter_dir
from dynq.llamacpp.tools import tool
from dynq.paths import cache_dir

ZOO = "zoo:smollm2-135m"


class Refused(Exception):
    pass


def refuse(*args: Any, **kwargs: Any) -> Any:
    raise Refused("a network connection or a child process was asked for")


def close_the_doors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets cannot connect or resolve names and no child process can start (pip, cmake, compilers)."""
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    dynq.fetch(ZOO)  # the caches warm, before the doors close
    dynq.fetch(dynq.TEXTS)
    close_the_doors(monkeypatch)
    yield


@pytest.mark.model  # the `offline` fixture warms the caches first
def test_the_doors_are_really_closed(offline: None) -> None:
    with pytest.raises(Refused):
        subprocess.run(["true"], timeout=10)
    with pytest.raises(Refused):
        socket.create_connection(("127.0.0.1", 9))


@pytest.mark.model
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


@pytest.mark.model
def test_a_checkpoint_opens_and_plans_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Opening a Hugging Face checkpoint loads llama.cpp's converter from the cache (`make setup` put it there) and
    reaches for neither the network nor pip."""
    from hf_checkpoints import tiny_qwen2  # torch and transformers: only here

    assert converter_dir(cache_dir()).is_dir(), "make setup fetches the converter"
    directory = tiny_qwen2(tmp_path / "hf")  # before the doors close: the tokenizer may be exported first
    close_the_doors(monkeypatch)
    assert len(dynq.open_source(str(directory)).inventory().tensors) > 0
    assert dynq.plan(str(directory), "dyn-q2_k_xl").total_bytes > 0


def test_cold_caches_name_the_command(tmp_path: Path) -> None:
    empty = dynq.RunContext(cache_dir=tmp_path / "empty")
    with pytest.raises(dynq.DynqError, match=r"run `dynq fetch zoo:gemma3-270m`"):
        dynq.plan("zoo:gemma3-270m", "dyn-iq1_s", ctx=empty)
    with pytest.raises(dynq.DynqError, match=r"run `dynq fetch texts`"):
        dynq.calibration(ctx=empty)
    with pytest.raises(dynq.DynqError, match=r"run `dynq build-tools`"):
        tool("llama-quantize", empty.cache_dir)
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(dynq.DynqError, match=r"converter is not in .*; run `\S+ -m dynq\.llamacpp\.converter`"):
        dynq.plan(str(checkpoint), "dyn-iq1_s", ctx=empty)
