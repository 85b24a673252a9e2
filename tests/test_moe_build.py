"""A two-block slice of the real qwen2.5-coder-1.5b re-laid as qwen2moe: exact split, the dense function with every
expert active, the same bytes twice, and the MoE paths (per-expert imatrix, expert offload) on real weights."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

import dynq
from dynq.calib.collector import collect_imatrix
from dynq.calib.text import calibration_text
from dynq.deploy.memory import byte_model
from dynq.eval.reference import log_softmax
from dynq.gguf_io.reader import GGUFModel
from dynq.llamacpp.runtime import LlamaRuntime
from dynq.moe.build import MoeReport, MoeSettings, build_moe
from dynq.moe.convert import write_relaid

pytestmark = pytest.mark.model

SETTINGS = MoeSettings(n_ctx=128, chunks=4, fit_chunks=3, curve_chunks=1, experts_per_token=(2, 8, 32))
CTX = dynq.RunContext(threads=2)
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 4


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe") / "dense2.gguf"
    write_relaid(GGUFModel(dynq.fetch("zoo:qwen2.5-coder-1.5b")), path, blocks=2, experts=None, metadata={})
    return path


def _build(dense: Path, name: str) -> tuple[Path, MoeReport]:
    dynq.fetch(dynq.TEXTS)
    out = dense.parent / name
    return out, build_moe(dense, out, calibration_text(CTX.cache_dir), SETTINGS, ctx=CTX)


@pytest.fixture(scope="module")
def moe(dense: Path) -> tuple[Path, MoeReport]:
    return _build(dense, "moe2.gguf")


def _logits(path: Path, experts_used: int | None = None) -> np.ndarray:
    with LlamaRuntime(path, 64, 2, logits=True, experts_used=experts_used) as rt:
        logits = rt.evaluate_chunk(rt.tokenize(PROMPT)[:64])
    assert logits is not None
    return logits


def test_experts_are_the_dense_neurons_split_exactly(dense: Path, moe: tuple[Path, MoeReport]) -> None:
    d, m = GGUFModel(dense), GGUFModel(moe[0])
    assert m.arch == "qwen2moe" and m.field("qwen2moe.block_count") == 2
    assert (m.field("qwen2moe.expert_count"), m.field("qwen2moe.expert_feed_forward_length")) == (32, 256)
    assert m.field("qwen2moe.expert_shared_feed_forward_length") == 768
    for b in range(2):
        p = f"blk.{b}."
        assert m.tensors[[t.name for t in m.tensors].index(p + "ffn_gate_exps.weight")].shape == (1536, 256, 32)
        gate, up = (
            np.concatenate([m.load(f"{p}ffn_{w}_exps.weight").reshape(-1, 1536), m.load(f"{p}ffn_{w}_shexp.weight")])
            for w in ("gate", "up")
        )
        down_exps = m.load(p + "ffn_down_exps.weight") / 32  # [32, 1536, 256]
        down = np.concatenate([*down_exps, m.load(p + "ffn_down_shexp.weight") / 2], axis=1)
        dense_gate = d.load(p + "ffn_gate.weight")
        row_of = {row.tobytes(): i for i, row in enumerate(dense_gate)}
        order = np.array([row_of[row.tobytes()] for row in gate])
        assert np.array_equal(np.sort(order), np.arange(8960))  # every neuron exactly once
        assert np.array_equal(up, d.load(p + "ffn_up.weight")[order])
        assert np.array_equal(down, d.load(p + "ffn_down.weight")[:, order])


def test_every_expert_active_computes_the_dense_model(dense: Path, moe: tuple[Path, MoeReport]) -> None:
    ref, got = _logits(dense), _logits(moe[0], experts_used=32)
    p, q = log_softmax(ref), log_softmax(got)
    kld = (np.exp(p) * (p - q)).sum(axis=1)
    assert np.abs(ref - got).max() < 0.02 * np.abs(ref).max()
    assert kld.mean() < 1e-5
    report = moe[1]
    assert report.ppl[32] == pytest.approx(report.dense_ppl, rel=1e-3)


def test_fewer_experts_change_the_output_and_the_report_says_why_k(moe: tuple[Path, MoeReport]) -> None:
    path, report = moe
    assert np.abs(_logits(path, 2) - _logits(path, 32)).max() > 0.01
    assert report.experts_used in SETTINGS.experts_per_token
    assert report.ppl[report.experts_used] <= SETTINGS.max_ppl_ratio * report.dense_ppl
    assert GGUFModel(path).field("qwen2moe.expert_used_count") == report.experts_used
    assert all(0.0 <= r <= 1.0 for b in report.blocks for r in b.recall.values())
    assert 0.0 < report.expert_share < 1.0


@pytest.mark.slow  # a second build of the whole model: the long lane
def test_the_same_bytes_twice(dense: Path, moe: tuple[Path, MoeReport]) -> None:
    again, _ = _build(dense, "moe2-again.gguf")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (moe[0], again)]
    assert digest[0] == digest[1]


def test_per_expert_importance_on_real_routing(moe: tuple[Path, MoeReport]) -> None:
    text = calibration_text(CTX.cache_dir).text
    routed = collect_imatrix(moe[0], text, ["calib"], n_ctx=128, n_chunks=2, ctx=CTX)
    every = collect_imatrix(moe[0], text, ["calib"], n_ctx=128, n_chunks=2, ctx=CTX, all_experts=True)
    k = moe[1].experts_used
    for name in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
        counts = routed.entries[name].counts
        assert counts.shape == (32,) and counts.sum() == 2 * 128 * k
        assert (every.entries[name].counts == 2 * 128).all()
    shared = routed.entries["blk.0.ffn_up_shexp.weight"].counts
    assert shared.sum() == 2 * 128


def test_expert_offload_bytes_on_real_weights(moe: tuple[Path, MoeReport]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from offload_check import load_and_report

    path = moe[0]
    bm = byte_model(GGUFModel(path).inventory())
    got = load_and_report(path, 512, 256)
    assert bm.file_bytes / (1 << 20) == pytest.approx(got.model, rel=0.001)
    assert bm.kv_total(512, "f16", 256) / (1 << 20) == pytest.approx(got.kv, rel=0.001)
    # too little VRAM for the experts of both blocks: the plan keeps routed experts on the CPU, and only them
    plan = dynq.offload(path, dynq.Hardware(vram=int(0.5 * (1 << 30)) + (bm.file_bytes * 3) // 4)).best
    assert plan.fits_vram and plan.experts_on_cpu > 0
    assert all("exps" in pattern for pattern in plan.override_tensors)
