"""The parts of re-laying a dense FFN as experts that run no model: layouts, the router fit, the gate scales."""

from __future__ import annotations

import numpy as np
import pytest

from dynq.moe import layout as lay


def _ffn(rng: np.random.Generator, n_ff: int = 96, n_embd: int = 16) -> lay.FFN:
    f = rng.standard_normal
    return lay.FFN(f((n_ff, n_embd)).astype(np.float32), f((n_ff, n_embd)).astype(np.float32),
                   f((n_embd, n_ff)).astype(np.float32))  # fmt: skip


def test_balanced_assignment_fills_every_expert_exactly() -> None:
    rng = np.random.default_rng(0)
    contrib = np.abs(rng.standard_normal((200, 64))).astype(np.float32)
    experts = lay.coactivation_experts(contrib, np.arange(64), 8)
    assert experts.shape == (8, 8)
    assert np.array_equal(np.sort(experts.reshape(-1)), np.arange(64))
    assert [int(e[0]) for e in experts] == sorted(int(e[0]) for e in experts)


def test_coactivation_groups_neurons_that_fire_together() -> None:
    # four planted groups of 8 neurons, each group active on its own quarter of the tokens
    rng = np.random.default_rng(1)
    perm = rng.permutation(32)
    contrib = np.full((400, 32), 0.01, np.float32)
    for g in range(4):
        contrib[g * 100 : (g + 1) * 100, perm[g * 8 : (g + 1) * 8]] = 1.0 + rng.random((100, 8))
    experts = lay.coactivation_experts(contrib, np.arange(32), 4)
    planted = {frozenset(int(n) for n in perm[g * 8 : (g + 1) * 8]) for g in range(4)}
    assert {frozenset(int(n) for n in e) for e in experts} == planted
    contiguous = lay.contiguous_experts(np.arange(32), 4)
    assert {frozenset(int(n) for n in e) for e in contiguous} != planted


def test_shared_neurons_are_the_ones_every_token_uses() -> None:
    rng = np.random.default_rng(2)
    contrib = rng.random((300, 40)).astype(np.float32) * 0.1
    contrib[:, [3, 17, 31]] += 5.0
    assert lay.shared_neurons(contrib, 3).tolist() == [3, 17, 31]


def test_layout_check_rejects_a_neuron_used_twice() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        lay.ExpertLayout(np.array([0, 1]), np.array([[1, 2], [3, 4]])).check(5)


def test_router_recalls_a_linear_oracle() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    true = rng.standard_normal((8, 16)).astype(np.float32)
    outputs = np.exp(x @ true.T).astype(np.float32)  # log outputs are linear in x: a linear router can be exact
    router = lay.fit_router(x[:1500], outputs[:1500])
    assert lay.recall(router, x[1500:], outputs[1500:], 2) > 0.98
    assert lay.recall(-router, x[1500:], outputs[1500:], 2) < 0.05


def test_expert_outputs_add_up_to_the_dense_ffn() -> None:
    rng = np.random.default_rng(4)
    ffn, x = _ffn(rng), rng.standard_normal((10, 16)).astype(np.float32)
    h = ffn.hidden(x)
    experts = lay.contiguous_experts(np.arange(96), 6)
    total = sum(h[:, idx] @ ffn.down[:, idx].T for idx in experts)
    assert np.allclose(total, h @ ffn.down.T, atol=1e-4)
    norms = lay.expert_outputs(ffn, h, experts)
    assert norms.shape == (10, 6)
    assert np.allclose(norms[:, 0], np.linalg.norm(h[:, :16] @ ffn.down[:, :16].T, axis=1), rtol=1e-5)


def test_gate_scales_keep_expert_weights_near_one() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((500, 16)) + 3.0).astype(np.float32)
    router = rng.standard_normal((32, 16)).astype(np.float32)
    spread = 2.0**-12
    scale = lay.logit_scale(router, x, spread)
    assert np.log2(scale) == np.round(np.log2(scale))
    z = x @ (router * scale).T
    weights = 32 * np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.abs(np.log(weights)).max() <= 2 * spread
    gate = lay.shared_gate(x, spread)
    zs = x @ gate
    assert (zs > 0).all() or (zs < 0).all()  # one sign: never the 0 that llama.cpp's silu(z)/z turns into NaN
    assert np.abs(2 / (1 + np.exp(-zs)) - 1).max() <= spread * 1.01
