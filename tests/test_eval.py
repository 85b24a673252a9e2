from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import dynq
from dynq.eval.metrics import Scores, kld_estimate, kld_full
from dynq.eval.reference import CompactReference, log_softmax
from dynq.lab.synthetic import write_synthetic
from runs import quantize_to

REF = np.array([[2.0, 1.0, 0.0, -1.0, -3.0], [0.5, 0.0, 0.0, 0.0, 0.0]], np.float32)
QUANT = np.array([[1.5, 1.4, 0.0, -1.0, -2.0], [0.0, 1.0, 0.0, 0.0, -1.0]], np.float32)
NEXT = np.array([1, 0], np.int32)


def hand_kld(p_logits: list[float], q_logits: list[float]) -> float:
    zp = sum(math.exp(x) for x in p_logits)
    zq = sum(math.exp(x) for x in q_logits)
    return sum(
        math.exp(a) / zp * (a - math.log(zp) - (b - math.log(zq))) for a, b in zip(p_logits, q_logits, strict=True)
    )


def test_kld_against_a_hand_computation() -> None:
    ref = CompactReference.from_logits(REF, NEXT, k=5)  # k = vocab: exact
    q_logp = log_softmax(QUANT)
    got = kld_estimate(ref, slice(0, 2), q_logp)
    for i in range(2):
        assert got[i] == pytest.approx(hand_kld(REF[i].tolist(), QUANT[i].tolist()), rel=1e-5)
    np.testing.assert_allclose(kld_full(REF, q_logp), got, rtol=1e-5)


def test_top_k_plus_tail_samples_estimates_the_full_kld() -> None:
    rng = np.random.default_rng(0)
    ref_logits = (rng.standard_normal((400, 2000)) * 2).astype(np.float32)
    quant_logits = ref_logits + rng.standard_normal((400, 2000)).astype(np.float32) * 0.2
    nxt = rng.integers(0, 2000, 400).astype(np.int32)
    q_logp = log_softmax(quant_logits)
    exact = kld_full(ref_logits, q_logp).mean()
    truncated = kld_estimate(CompactReference.from_logits(ref_logits, nxt, 64), slice(0, 400), q_logp).mean()
    sampled = kld_estimate(CompactReference.from_logits(ref_logits, nxt, 64, 256, seed=1), slice(0, 400), q_logp)
    assert truncated < 0.7 * exact  # the head alone misses what the tail holds
    assert sampled.mean() == pytest.approx(exact, rel=0.03)  # unbiased; this flat synthetic tail is noisy


def test_scores_summary() -> None:
    ref = CompactReference.from_logits(REF, NEXT, k=5)
    s = Scores()
    s.add(ref, slice(0, 2), QUANT)
    out = s.summary()
    ref_logp, q_logp = log_softmax(REF), log_softmax(QUANT)
    assert out["ppl"] == pytest.approx(math.exp(-(q_logp[0, 1] + q_logp[1, 0]) / 2))
    assert out["ref_ppl"] == pytest.approx(math.exp(-(ref_logp[0, 1] + ref_logp[1, 0]) / 2))
    assert out["top1"] == 0.5  # row 0: both pick token 0; row 1: the reference 0, the quant 1
    dp = [math.exp(q_logp[0, 1]) - math.exp(ref_logp[0, 1]), math.exp(q_logp[1, 0]) - math.exp(ref_logp[1, 0])]
    assert out["dp_rms"] == pytest.approx(math.sqrt((dp[0] ** 2 + dp[1] ** 2) / 2))
    assert out["kld_max"] == pytest.approx(
        max(hand_kld(REF[i].tolist(), QUANT[i].tolist()) for i in range(2)), rel=1e-5
    )


def test_reference_cache_round_trip(tmp_path: Path) -> None:
    ref = CompactReference.from_logits(REF, NEXT, k=3)
    ref.n_ctx, ref.text_provenance = 8, "test"
    ref.save(tmp_path / "r.npz")
    back = CompactReference.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.top_ids, ref.top_ids)
    assert (back.n_ctx, back.n_vocab, back.text_provenance) == (8, 5, "test")


def test_evaluate_a_tiny_model(tmp_path: Path) -> None:
    ctx = dynq.RunContext(threads=2, cache_dir=tmp_path / "cache")
    src = write_synthetic("llama", tmp_path / "tiny.gguf")
    q8 = tmp_path / "q8.gguf"
    q4 = tmp_path / "q4.gguf"
    quantize_to(src, "q8_0", q8, ctx=ctx)
    quantize_to(src, "uniform-q4_0", q4, ctx=ctx)
    text = dynq.Text(" ".join(f"the {c} of {c}{c} and to in def return" for c in "abcdefghijklmnopqrstuvwxyz" * 8), "t")
    same = dynq.evaluate(src, src, text=text, n_ctx=64, chunks=3, ctx=ctx)
    assert same.kld_mean < 1e-4 and same.top1 == 1.0 and same.ppl == pytest.approx(same.ref_ppl)
    a = dynq.evaluate(q8, src, text=text, n_ctx=64, chunks=3, ctx=ctx)
    b = dynq.evaluate(q4, src, text=text, n_ctx=64, chunks=3, ctx=ctx)
    assert a.tokens == 3 * 31 and a.to_dict()["tokens"] == 3 * 31
    assert 0 < a.kld_mean < b.kld_mean
    # the tail: p99 <= p99.9 <= max, and the share of tokens above 1 nat
    assert b.kld_p99 <= b.kld_p999 <= b.kld_max and 0 <= a.kld_over_1 <= b.kld_over_1 <= 1
    assert (b.kld_over_1 > 0) == (b.kld_max > 1)
    assert a.top1 >= b.top1
    assert len(list((tmp_path / "cache" / "references").glob("*.npz"))) == 1  # the reference ran once


def test_a_reference_made_by_other_code_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached reference is keyed by the code that made it: a new REFERENCE_VERSION, or another llama.cpp, makes
    it again rather than reading an older one."""
    from dynq.eval import evaluate as evaluate_module

    ctx = dynq.RunContext(threads=2, cache_dir=tmp_path / "cache")
    src = write_synthetic("llama", tmp_path / "tiny.gguf")
    text = dynq.Text(" ".join(f"the {c} of {c}{c} and to in" for c in "abcdefghijklmnopqrstuvwxyz" * 4), "t")
    kept = lambda: len(list((tmp_path / "cache" / "references").glob("*.npz")))  # noqa: E731
    dynq.evaluate(src, src, text=text, n_ctx=32, chunks=2, ctx=ctx)
    dynq.evaluate(src, src, text=text, n_ctx=32, chunks=2, ctx=ctx)
    assert kept() == 1
    monkeypatch.setattr(evaluate_module, "REFERENCE_VERSION", evaluate_module.REFERENCE_VERSION + 1)
    dynq.evaluate(src, src, text=text, n_ctx=32, chunks=2, ctx=ctx)
    assert kept() == 2
    monkeypatch.setattr(evaluate_module.metadata, "version", lambda package: "0.0.1")
    dynq.evaluate(src, src, text=text, n_ctx=32, chunks=2, ctx=ctx)
    assert kept() == 3


@pytest.mark.parametrize("recipe", ["f16", "uniform-q4_0"])
def test_logits_of_some_positions_are_those_of_all_positions(tmp_path: Path, recipe: str) -> None:
    """Evaluations ask llama.cpp for the scored half of each chunk only; those rows must be bit-identical to the
    same rows of a chunk evaluated with every position's logits."""
    from dynq.llamacpp.runtime import LlamaRuntime

    model = tmp_path / "m.gguf"
    quantize_to(write_synthetic("llama", tmp_path / "tiny.gguf"), recipe, model, ctx=dynq.RunContext(threads=2))
    tokens = [(7 * i + 3) % 200 for i in range(64)]
    with LlamaRuntime(model, 64, 2, logits=True) as rt:
        every = rt.evaluate_chunk(tokens)
        some = rt.evaluate_chunk(tokens, slice(32, 63))
    assert every is not None and some is not None and some.shape == (31, rt.n_vocab)
    assert np.array_equal(every[32:63], some)


def test_a_runtime_reads_its_load_log_without_taking_it_from_an_enclosing_capture(tmp_path: Path) -> None:
    from dynq.llamacpp.runtime import LlamaRuntime, llama_log

    model = write_synthetic("llama", tmp_path / "tiny.gguf")
    with llama_log() as outer, LlamaRuntime(model, 64, 1, mapped=True) as rt:
        assert rt.weights_mapped
    assert any("CPU_Mapped model buffer size" in line for line in outer)
