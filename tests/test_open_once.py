"""One command opens its source once: gguf-py parses a GGUF header once, the content fingerprint is computed once
(and not at all when the cache remembers it), and a checkpoint's cached F16 conversion is found without the converter.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest
from typer.testing import CliRunner

import dynq
from dynq.cli import app
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from dynq.paths import cache_dir
from dynq.sources import checkpoint


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """What the code under test does, counted: `parse:NAME` per gguf-py header parse of a file, `fingerprint` per
    GGUF fingerprint computed, `checkpoint` per HFCheckpoint built, `digest` per checkpoint fingerprint computed."""
    seen: Counter[str] = Counter()

    def counting(key: Callable[..., str], func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[key(*args, **kwargs)] += 1
            return func(*args, **kwargs)

        return wrapper

    parse = counting(lambda _, path, *a, **k: f"parse:{Path(path).name}", gguf.GGUFReader.__init__)
    monkeypatch.setattr(gguf.GGUFReader, "__init__", parse)
    fingerprint = functools.cached_property(counting(lambda _: "fingerprint", GGUFModel._fingerprint.func))
    fingerprint.__set_name__(GGUFModel, "_fingerprint")
    monkeypatch.setattr(GGUFModel, "_fingerprint", fingerprint)
    monkeypatch.setattr(checkpoint.HFCheckpoint, "__init__",
                        counting(lambda *a, **k: "checkpoint", checkpoint.HFCheckpoint.__init__))  # fmt: skip
    monkeypatch.setattr(checkpoint, "_digest", counting(lambda _: "digest", checkpoint._digest))
    yield seen


def _quantize(*args: str) -> None:
    done = CliRunner().invoke(app, ["quantize", *args, "--threads", "2"])
    assert done.exit_code == 0, done.output


def test_a_gguf_is_parsed_and_fingerprinted_once(
    counts: Counter[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNQ_CACHE_DIR", str(tmp_path / "cache"))  # a cold cache: nothing remembered yet
    source = write_synthetic("llama", tmp_path / "tiny.gguf")
    counts.clear()
    _quantize(str(source), "-r", "q8_0", "-o", str(tmp_path / "cold.gguf"), "--reuse-encoded")
    assert counts["parse:tiny.gguf"] == 1 and counts["fingerprint"] == 1, counts

    counts.clear()  # the description and fingerprint are remembered: only reading the weights parses the header
    _quantize(str(source), "-r", "dyn-q2_k_xl", "-o", str(tmp_path / "warm.gguf"), "--reuse-encoded")
    assert counts["parse:tiny.gguf"] == 1 and counts["fingerprint"] == 0, counts

    counts.clear()  # a plan alone needs no parse at all
    dynq.plan(str(source), "bf16", ctx=dynq.RunContext(cache_dir=tmp_path / "cache"))
    assert counts["parse:tiny.gguf"] == 0 and counts["fingerprint"] == 0, counts


@pytest.mark.model
def test_a_checkpoint_is_built_and_fingerprinted_once(counts: Counter[str], tmp_path: Path) -> None:
    from hf_checkpoints import tiny_qwen2

    cache = tmp_path / "cache"  # its own memo, with llama.cpp's converter from the shared cache
    cache.mkdir()
    for converter in cache_dir().glob("llama.cpp-*"):
        (cache / converter.name).symlink_to(converter)
    directory = tiny_qwen2(tmp_path / "hf")
    ctx = dynq.RunContext(threads=2, cache_dir=cache)

    counts.clear()
    opened = dynq.open_source(str(directory), ctx=ctx)
    dynq.quantize(dynq.plan(opened, "q8_0", ctx=ctx), tmp_path / "q8_0.gguf", ctx=ctx, source=opened,
                  reuse_encoded=True)  # fmt: skip
    # quantize checks each tensor by its own digest (sources/content.py): the sampled fingerprint is not needed
    assert counts["checkpoint"] == 1 and counts["digest"] == 0, counts

    counts.clear()  # reopened from the plan's spec, as a script hands a plan on: the fingerprint is remembered
    dynq.quantize(dynq.plan(str(directory), "q8_0", ctx=ctx), tmp_path / "again.gguf", ctx=ctx)
    assert counts["digest"] == 0, counts

    f16 = dynq.f16_conversion(str(directory), ctx=ctx)
    counts.clear()  # the conversion is cached: finding it builds no model and reads no shard
    assert dynq.f16_conversion(str(directory), ctx=ctx) == f16
    assert counts["checkpoint"] == 0 and counts["digest"] == 0, counts

    shard = next(directory.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))  # as if rewritten
    counts.clear()
    assert dynq.f16_conversion(str(directory), ctx=ctx) == f16  # fingerprinted again: the same bytes, the same name
    assert counts["digest"] == 1 and counts["checkpoint"] == 0, counts
