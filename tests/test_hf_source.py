"""A Hugging Face checkpoint directory as a source: what dynq writes from it equals what llama.cpp's converter
writes, tensor for tensor and key for key, and quantizing the directory equals quantizing that conversion."""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import dynq
from dynq.core.tensors import TensorClass
from dynq.eval.loops import generate
from dynq.llamacpp.converter import convert
from dynq.paths import cache_dir
from dynq.sources import checkpoint as checkpoint_module
from dynq.sources.checkpoint import HFCheckpoint
from hf_checkpoints import tiny_deepseek_v3_fp8, tiny_qwen2, tiny_qwen2_moe
from runs import TWO_THREADS, quantize_to

pytestmark = pytest.mark.model

MAKERS: dict[str, Callable[[Path], Path]] = {
    "qwen2": tiny_qwen2,
    "qwen2moe": tiny_qwen2_moe,
    "deepseek-v3-fp8": tiny_deepseek_v3_fp8,
}
# Keys only dynq writes: its own provenance (recipe, version).
OWN_PREFIXES = ("dynq.",)


# MoE, FP8 and MLA in one checkpoint run in `make test`; the dense and the Qwen2-MoE ones in the long lane
@pytest.fixture(scope="module", params=[p if p == "deepseek-v3-fp8" else pytest.param(p, marks=pytest.mark.slow)
                                        for p in sorted(MAKERS)])  # fmt: skip
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny checkpoint and llama.cpp's own F16 conversion of it."""
    folder = tmp_path_factory.mktemp(request.param)
    directory = MAKERS[request.param](folder / "hf")
    converted = folder / "llama.cpp-f16.gguf"
    convert(directory, converted, cache_dir())
    return directory, converted


def _fields(path: Path) -> dict[str, object]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    return [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data.tobytes())
            for t in GGUFReader(path).tensors]  # fmt: skip


def test_f16_equals_the_converters_output(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    directory, converted = checkpoint
    ours = tmp_path / "a.gguf"
    quantize_to(directory, "f16", ours)
    assert _tensors(ours) == _tensors(converted)
    mine, theirs = _fields(ours), _fields(converted)
    assert {k: v for k, v in mine.items() if not k.startswith(OWN_PREFIXES)} == theirs


def headers_only(directory: Path, into: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the checkpoint whose weight bytes are all 0xFF (NaN in every float type), with every route dynq has
    to weight values (lazy evaluation, the sampled fingerprint) refused: what reads a weight fails or differs."""
    shutil.copytree(directory, into)
    for shard in into.glob("*.safetensors"):
        with shard.open("r+b") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
            f.seek(0, 2)
            size = f.tell()
            f.seek(start)
            f.write(b"\xff" * (size - start))

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight was read")

    for route in ("_evaluate", "_digest"):
        monkeypatch.setattr(checkpoint_module, route, refused)
    return into


def test_the_plan_comes_from_headers_alone(checkpoint: tuple[Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    directory, converted = checkpoint
    planned = dynq.plan(str(headers_only(directory, tmp_path / "hf", monkeypatch)), "dyn-iq2_xxs")
    reference = dynq.plan(str(converted), "dyn-iq2_xxs")
    assert [(p.info.name, p.info.shape, p.qtype.name) for p in planned.tensors] == [
        (p.info.name, p.info.shape, p.qtype.name) for p in reference.tensors
    ]


def test_a_quant_equals_quantizing_the_conversion(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    directory, converted = checkpoint
    imatrix = dynq.save_imatrix(dynq.collect_imatrix(converted, chunks=1, n_ctx=128, ctx=TWO_THREADS),
                                tmp_path / "imatrix.gguf")  # fmt: skip
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_to(directory, "dyn-iq2_xxs", ours, imatrix=imatrix)
    quantize_to(converted, "dyn-iq2_xxs", theirs, imatrix=imatrix)
    assert _tensors(ours) == _tensors(theirs)


def test_one_expert_is_computed_from_that_experts_weights(
    checkpoint: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    directory, _ = checkpoint
    caplog.set_level(logging.DEBUG, logger="dynq.sources.checkpoint")
    source = HFCheckpoint(directory, cache_dir())
    stacked = [t for t in source.inventory().tensors if len(t.shape) == 3]
    experts = [t for t in stacked if t.tensor_class is TensorClass.ROUTED_EXPERTS]
    assert bool(experts) == ("moe" in directory.parent.name or "deepseek" in directory.parent.name)
    for t in stacked:
        whole = source.load(t.name)
        for e in (0, t.shape[2] - 1):
            np.testing.assert_array_equal(source.load_expert(t.name, e), whole[e])
        source.release(t.name)
    computed_whole = {r.args[1] for r in caplog.records if "not a stack of experts" in r.getMessage()}
    assert computed_whole.isdisjoint(t.name for t in experts)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("sharded") / "hf", shards=2)


def _broken(original: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(original, copy)
    damage(copy)
    return copy


def _drop_config(d: Path) -> None:
    (d / "config.json").unlink()


def _unknown_architecture(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["Frobnicator9000ForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))


def _drop_a_shard(d: Path) -> None:
    sorted(d.glob("model-*.safetensors"))[-1].unlink()


def _truncate_a_shard(d: Path) -> None:
    shard = sorted(d.glob("model-*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 1000)


def _contradict_the_config(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["num_attention_heads"] *= 2
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"] * 2
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_drop_config, "no config.json"),
        (_unknown_architecture, "does not know the architecture Frobnicator9000ForCausalLM"),
        (_drop_a_shard, "is missing"),
        (_truncate_a_shard, "truncated"),
        (_contradict_the_config, "does not belong|do not belong"),
    ],
)
def test_a_broken_checkpoint_is_one_line_and_no_output(
    two_shards: Path, tmp_path: Path, damage: Callable[[Path], None], says: str
) -> None:
    broken = _broken(two_shards, tmp_path, damage)
    out = tmp_path / "out.gguf"
    done = subprocess.run([sys.executable, "-m", "dynq.cli", "quantize", str(broken), "-r", "f16", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(says, lines[0]), done.stderr
    assert str(broken) in lines[0]
    assert list(tmp_path.glob("out*")) == [] and not list(tmp_path.glob(".out*"))


def test_an_fp8_checkpoint_quantizes_to_1_bit_and_runs(tmp_path: Path) -> None:
    directory = tiny_deepseek_v3_fp8(tmp_path / "hf")
    imatrix = dynq.save_imatrix(dynq.collect_imatrix(str(directory), chunks=1, n_ctx=128, ctx=TWO_THREADS),
                                tmp_path / "imatrix.gguf")  # fmt: skip
    out = tmp_path / "iq1_s.gguf"
    result = quantize_to(directory, "dyn-iq1_s", out, imatrix=imatrix)
    # R1's own rules: early down projections at IQ2_XXS; 64-wide rows fall back to IQ4_NL
    routed = {p.qtype.name for p in result.plan.tensors if p.info.tensor_class is TensorClass.ROUTED_EXPERTS}
    assert routed == {"IQ2_XXS", "IQ4_NL"}
    completions = generate(out, n_tokens=8, threads=2)
    assert completions and all(c.n_tokens > 0 for c in completions)


def test_offload_plans_a_checkpoint_without_reading_weights(checkpoint: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    directory, converted = checkpoint
    budget = dynq.Hardware(vram=48 * 2**20)
    ours = dynq.offload(str(headers_only(directory, tmp_path / "hf", monkeypatch)), budget, recipe="dyn-iq1_s")
    theirs = dynq.offload(str(converted), budget, recipe="dyn-iq1_s")
    assert ours.best == theirs.best and ours.command == theirs.command


def test_a_checkpoint_is_profiled_and_solved_as_its_conversion(tmp_path: Path) -> None:
    directory = tiny_qwen2(tmp_path / "hf")
    settings = {"n_ctx": 64, "chunks": 1, "rows": 32, "group_blocks": 2}
    made = dynq.profile(str(directory), ctx=TWO_THREADS, **settings)  # type: ignore[arg-type]
    converted = dynq.f16_conversion(str(directory), ctx=TWO_THREADS)
    assert made.model.fingerprint == dynq.open_source(converted).fingerprint()
    ours = dynq.solve(str(directory), made, "30MiB", has_imatrix=False, ctx=TWO_THREADS).plan
    theirs = dynq.solve(str(converted), made, "30MiB", has_imatrix=False, ctx=TWO_THREADS).plan
    assert [(p.info.name, p.qtype.name) for p in ours.tensors] == [(p.info.name, p.qtype.name) for p in theirs.tensors]
