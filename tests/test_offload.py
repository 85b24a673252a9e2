from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynq import api
from dynq.cli import app
from dynq.core.tensors import ModelInventory
from dynq.core.units import GIB, parse_memory
from dynq.deploy.memory import ByteModel, byte_model
from dynq.deploy.offload import (
    AUTO_KV_TYPES,
    Hardware,
    OffloadPlan,
    Settings,
    offload,
    plan_offload,
    rule_of_thumb_layers,
)
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from dynq.sources.shapes import DenseConfig, dense_tensors, shape_inventory

runner = CliRunner()


@cache
def r1_iq1s() -> ByteModel:
    return byte_model(shape_inventory("deepseek-r1"), api.plan("shapes:deepseek-r1", "dyn-iq1_s"))


@cache
def r1_plan(vram_gib: int, gpus: int) -> OffloadPlan:
    return plan_offload(r1_iq1s(), Hardware(vram_gib * GIB, gpus, ram=128 * GIB))


def test_parse_memory_uses_binary_units() -> None:
    assert parse_memory("24GB") == 24 * GIB
    assert parse_memory("80G") == 80 * GIB
    assert parse_memory("1.5TiB") == int(1.5 * 1024 * GIB)
    assert parse_memory("512m") == 512 << 20
    for bad in ("lots", "-3G", "0"):
        with pytest.raises(DynqError):
            parse_memory(bad)


def test_weights_are_the_file_tensor_bytes(tiny_gguf: Path) -> None:
    model = GGUFModel(tiny_gguf)
    inv = replace(
        model.inventory(), metadata={**model.metadata, "llama.attention.head_count": 4, "llama.embedding_length": 64}
    )
    bm = byte_model(inv)
    assert bm.file_bytes == sum(t.nbytes for t in model.tensors)
    assert sum(bm.block_bytes) == sum(t.nbytes for t in model.tensors if t.block is not None)
    assert not bm.tied_output


def test_tied_output_is_the_embedding_again() -> None:
    tensors, meta = dense_tensors(DenseConfig("llama", 2, 64, 128, 4, 2, 96, 512))
    inv = ModelInventory("tied", "llama", tuple(t for t in tensors if t.name != "output.weight"), meta)
    bm = byte_model(inv)
    embd = next(t for t in inv.tensors if t.name == "token_embd.weight").nbytes
    assert bm.tied_output and bm.output_bytes >= embd
    assert bm.file_bytes == inv.nbytes  # counted once on the CPU


def test_kv_of_a_gqa_model_with_a_sliding_window() -> None:
    tensors, meta = dense_tensors(DenseConfig("gemma3", 12, 64, 128, 4, 1, 96, 4096))
    meta = {**meta, "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
            "gemma3.attention.sliding_window": 512}  # fmt: skip
    bm = byte_model(ModelInventory("g", "gemma3", tuple(tensors), meta))
    assert bm.kv_bytes_per_token(0, "f16") == 2 * 256 * 2  # one KV head of 256, K and V, f16
    assert [b for b in range(12) if not bm.attention.sliding[b]] == [5, 11]
    assert bm.attention.cells(0, 3000, 512) == 1024  # window + ubatch, padded to 256
    assert bm.attention.cells(5, 3000, 512) == 3072  # the context, padded to 256
    assert bm.kv_bytes_per_token(0, "q8_0") == 2 * 256 // 32 * 34


def test_deepseek2_kv_legacy_and_mla() -> None:
    inv = shape_inventory("deepseek-r1")
    legacy = byte_model(inv)
    assert not legacy.attention.mla
    assert legacy.kv_bytes_per_token(10, "f16") == (128 * 192 + 128 * 128) * 2
    mla_meta = {**inv.metadata, "deepseek2.attention.key_length": 576, "deepseek2.attention.head_count_kv": 1,
                "deepseek2.attention.key_length_mla": 192, "deepseek2.attention.value_length_mla": 128}  # fmt: skip
    mla = byte_model(replace(inv, metadata=mla_meta))
    assert mla.attention.mla
    assert mla.kv_bytes_per_token(10, "f16") == 576 * 2  # the latent and the rope key, no V
    assert mla.is_moe and mla.n_expert_used == 8


def test_bad_kv_type_is_one_error() -> None:
    with pytest.raises(DynqError, match="KV cache type"):
        r1_iq1s().kv_bytes_per_token(0, "q3_k")


def test_rule_of_thumb_matches_the_published_numbers() -> None:
    bm = r1_iq1s()
    assert [rule_of_thumb_layers(bm, v * GIB) for v in (24, 80, 160)] == [7, 33, 61]


@pytest.mark.parametrize(("vram", "gpus", "rule"), [(24, 1, 7), (80, 1, 33), (80, 2, 61)])
def test_planner_fits_and_beats_the_rule_of_thumb(vram: int, gpus: int, rule: int) -> None:
    plan = r1_plan(vram, gpus)
    best = plan.best
    assert best.fits_vram
    assert all(g <= vram * GIB for g in best.gpu_bytes)
    assert best.n_gpu_layers >= rule
    assert plan.rule_of_thumb.n_gpu_layers == rule
    assert best.tokens_per_s >= max(p.tokens_per_s for p in (*plan.alternatives, plan.rule_of_thumb) if p.fits_vram)


def test_with_128gb_of_ram_every_case_fits_in_vram_and_ram() -> None:
    """The issue's three setups with --ram 128GB: the 24 GB one fits only once the KV cache is q8_0, which the
    planner picks by itself when no cache type is given."""
    for vram, gpus, rule in ((24, 1, 7), (80, 1, 33), (80, 2, 61)):
        plan = offload("shapes:deepseek-r1", Hardware(vram * GIB, gpus, ram=128 * GIB), recipe="dyn-iq1_s",
                       kv_types=AUTO_KV_TYPES)  # fmt: skip
        assert plan.best.fits and plan.best.n_gpu_layers >= rule, (vram, gpus)
    small = offload(
        "shapes:deepseek-r1", Hardware(24 * GIB, 1, ram=128 * GIB), recipe="dyn-iq1_s", kv_types=AUTO_KV_TYPES
    )
    assert small.settings.kv_type == "q8_0" and "-ctk q8_0" in small.command
    assert "nothing fits" in small.notes[0]
    strict = offload("shapes:deepseek-r1", Hardware(24 * GIB, 1, ram=128 * GIB), recipe="dyn-iq1_s")
    assert not strict.best.fits_ram and strict.settings.kv_type == "f16"


def test_one_80gb_gpu_splits_the_experts() -> None:
    plan = r1_plan(80, 1)
    best, layers_only = plan.best, plan.alternatives[0]
    assert best.n_gpu_layers == r1_iq1s().n_blocks + 1  # every block's attention on the GPU
    assert best.override_tensors and best.n_cpu_moe is not None
    assert best.tokens_per_s > 2 * layers_only.tokens_per_s
    assert "--n-cpu-moe" in plan.command and "-ngl 62" in plan.command


def test_two_gpus_hold_everything_and_split_by_layers() -> None:
    best = r1_plan(80, 2).best
    assert best.n_gpu_layers == 62 and not best.override_tensors
    assert best.tensor_split is not None and sum(best.tensor_split) == 62


def test_override_patterns_select_exactly_the_cpu_experts() -> None:
    bm, best = r1_iq1s(), r1_plan(80, 1).best
    names = [t.name for b in bm.blocks for t in b]
    chosen = {n for n in names if any(re.search(p.removesuffix("=CPU"), n) for p in best.override_tensors)}
    experts = {n for n in names if "_exps." in n}
    assert chosen <= experts
    assert len(chosen) == best.experts_on_cpu  # all blocks are offloaded, so every CPU expert is overridden
    first = f"blk.{best.n_cpu_moe - 1}." if best.n_cpu_moe else ""
    assert all(n in chosen for n in experts if n.startswith(first))


def test_more_vram_is_never_slower() -> None:
    speeds = [plan_offload(r1_iq1s(), Hardware(v * GIB, 1)).best.tokens_per_s for v in (16, 24, 48, 80, 141)]
    assert speeds == sorted(speeds)


def test_dense_model_gets_no_expert_overrides() -> None:
    tensors, meta = dense_tensors(DenseConfig("llama", 32, 4096, 14336, 32, 8, 32000, 8192))
    bm = byte_model(ModelInventory("llama-8b", "llama", tuple(tensors), meta))
    plan = plan_offload(bm, Hardware(8 * GIB), Settings(n_ctx=8192))
    assert not plan.best.override_tensors and plan.best.fits_vram
    assert 0 < plan.best.n_gpu_layers < 33  # 16 GB of BF16 weights do not fit in 8 GiB


@pytest.mark.parametrize("vram_gib", [24, 80, 141])
def test_device_shares_add_up_to_the_model(vram_gib: int) -> None:
    """What the planner puts on the GPU and what it leaves on the CPU are the file's tensors and the KV cache once
    each (the R1 output is its own tensor, so nothing is loaded twice)."""
    plan = r1_plan(vram_gib, 1)
    best, bm, s = plan.best, plan.model, plan.settings
    assert not bm.tied_output and best.experts_on_cpu > 0
    assert sum(best.gpu_weights) + best.cpu_weights == bm.file_bytes
    assert sum(best.gpu_kv) + best.cpu_kv == bm.kv_total(s.n_ctx, s.kv_type, s.n_ubatch)
    assert best.gpu_bytes[0] > sum(best.gpu_weights) + sum(best.gpu_kv)  # plus compute and the CUDA reserve


def test_placement_json_has_the_promised_keys() -> None:
    result = runner.invoke(app, ["offload", "shapes:deepseek-r1", "-r", "dyn-iq1_s", "--vram", "80GB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"n_gpu_layers", "override_tensors", "gpu_bytes", "cpu_bytes", "predicted_tokens_per_s"} <= set(data)
    assert data["n_gpu_layers"] == 62 and data["gpu_bytes"] <= 80 * GIB
    assert data["ctx"] == 4096  # Settings.n_ctx, written under the key the JSON has always had


def test_offload_on_a_synthetic_moe_file(tmp_path: Path) -> None:
    path = write_synthetic("qwen3moe", tmp_path / "moe.gguf")
    result = runner.invoke(app, ["offload", str(path), "--vram", "1M", "--ctx", "256"])
    assert result.exit_code == 0, result.output
    assert "command:" in result.output and str(path) in result.output


def test_bad_sizes_are_one_error_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "dynq.cli", "offload", "shapes:deepseek-r1", "--vram", "lots"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_byte_model_agrees_with_llama_cpp_on_a_zoo_model() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from offload_check import load_and_report

    import dynq

    path = dynq.fetch("zoo:smollm2-135m")
    bm = byte_model(GGUFModel(path).inventory())
    got = load_and_report(path, 1024, 512)
    assert bm.file_bytes / (1 << 20) == pytest.approx(got.model, rel=0.05)
    assert bm.kv_total(1024, "f16", 512) / (1 << 20) == pytest.approx(got.kv, rel=0.05)
