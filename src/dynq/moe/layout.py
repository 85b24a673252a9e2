"""How one dense SwiGLU FFN becomes a shared expert plus routed experts, and the router that picks among them.

Measured on calibration activations of the block (its FFN input `x`, one row per token):
- a neuron's contribution to a token is |silu(g·x)·(u·x)| · ‖its down column‖, the size of what it adds to the
  block's output;
- the shared expert takes the neurons with the largest mean share of each token's total contribution (the ones
  every token uses);
- the rest are cut into equal experts by co-activation: balanced spherical k-means on each neuron's contribution
  profile over the tokens, so that neurons which fire together land in the same expert;
- the router is a linear map fitted (ridge regression) from `x` to the log of each expert's contribution norm, so
  that its top-k approximates the oracle top-k: the experts whose outputs are largest for that token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

KMEANS_ROUNDS = 20
RIDGE = 1e-3  # relative to the mean diagonal of xᵀx
LOG_FLOOR = 1e-6  # relative to a token's largest expert contribution


@dataclass(frozen=True)
class FFN:
    """A dense SwiGLU FFN as float32 numpy matrices: gate, up [n_ff, n_embd], down [n_embd, n_ff]."""

    gate: F32
    up: F32
    down: F32

    def hidden(self, x: F32) -> F32:
        """silu(x·gateᵀ) ⊙ (x·upᵀ): [tokens, n_ff]."""
        g = x @ self.gate.T
        return np.asarray(g / (1.0 + np.exp(-g)) * (x @ self.up.T), dtype=np.float32)


@dataclass(frozen=True)
class ExpertLayout:
    """Neuron indices of the shared expert and of each routed expert (rows: experts, in router order)."""

    shared: I64
    experts: I64  # [n_expert, n_ff_exp]

    def check(self, n_ff: int) -> None:
        every = np.concatenate([self.shared, self.experts.reshape(-1)])
        if not np.array_equal(np.sort(every), np.arange(n_ff)):
            raise ValueError("an expert layout must use every neuron exactly once")


def contributions(ffn: FFN, hidden: F32) -> F32:
    """|h| · ‖down column‖ per token and neuron, from the FFN's `hidden` activations: [tokens, n_ff]."""
    return np.asarray(np.abs(hidden) * np.linalg.norm(ffn.down, axis=0)[None, :], dtype=np.float32)


def shared_neurons(contrib: F32, n_shared: int) -> I64:
    """The `n_shared` neurons with the largest mean share of a token's total contribution (ties: lower index)."""
    share = (contrib / contrib.sum(axis=1, keepdims=True)).mean(axis=0)
    return np.sort(np.argsort(-share, kind="stable")[:n_shared]).astype(np.int64)


def _balanced_assign(score: npt.NDArray[np.float64], capacity: int) -> I64:
    """Each row to one column, every column taking exactly `capacity` rows, greedily by score: each round every
    unplaced row asks its best open column and each column keeps its best askers."""
    n_rows, n_cols = score.shape
    owner = np.full(n_rows, -1, np.int64)
    load = np.zeros(n_cols, np.int64)
    while (free := np.flatnonzero(owner < 0)).size:
        open_cols = load < capacity
        s = np.where(open_cols[None, :], score[free], -np.inf)
        choice = np.argmax(s, axis=1)
        for col in np.unique(choice):
            askers = free[choice == col]
            best = askers[np.argsort(-score[askers, col], kind="stable")][: capacity - load[col]]
            owner[best] = col
            load[col] += best.size
    return owner


def coactivation_experts(contrib: F32, neurons: I64, n_expert: int, seed: int = 0) -> I64:
    """`neurons` cut into `n_expert` equal groups of co-active neurons: [n_expert, len(neurons) // n_expert],
    experts ordered by their lowest neuron, neurons ascending inside each."""
    if neurons.size % n_expert:
        raise ValueError(f"{neurons.size} neurons do not split into {n_expert} equal experts")
    size = neurons.size // n_expert
    profile = contrib[:, neurons].T.astype(np.float64)  # [neurons, tokens]
    profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-30)
    rng = np.random.default_rng(seed)
    centers = profile[rng.choice(neurons.size, n_expert, replace=False)]
    owner = np.zeros(neurons.size, np.int64)
    for _ in range(KMEANS_ROUNDS):
        owner = _balanced_assign(profile @ centers.T, size)
        sums = np.zeros_like(centers)
        np.add.at(sums, owner, profile)
        centers = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-30)
    groups = [np.sort(neurons[owner == e]) for e in range(n_expert)]
    groups.sort(key=lambda g: int(g[0]))
    return np.stack(groups).astype(np.int64)


def contiguous_experts(neurons: I64, n_expert: int) -> I64:
    """The baseline layout: `neurons` in index order, cut into equal runs."""
    return np.sort(neurons).reshape(n_expert, -1).astype(np.int64)


def expert_outputs(ffn: FFN, hidden: F32, experts: I64) -> F32:
    """‖what each expert adds to the output‖ per token, from the FFN's `hidden` activations: [tokens, n_expert]."""
    out = np.empty((hidden.shape[0], experts.shape[0]), np.float32)
    for e, idx in enumerate(experts):
        out[:, e] = np.linalg.norm(hidden[:, idx] @ ffn.down[:, idx].T, axis=1)
    return out


def fit_router(x: F32, outputs: F32) -> F32:
    """Ridge regression of log expert-output norms (centred per token: softmax ignores a shift) on x: the router
    weight [n_expert, n_embd] whose logits rank experts as their outputs do."""
    floor = LOG_FLOOR * outputs.max(axis=1, keepdims=True) + 1e-30
    target = np.log(np.maximum(outputs, floor)).astype(np.float64)
    target -= target.mean(axis=1, keepdims=True)
    xs = x.astype(np.float64)
    gram = xs.T @ xs
    gram += RIDGE * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
    return np.linalg.solve(gram, xs.T @ target).T.astype(np.float32)


def top_k(scores: F32, k: int) -> I64:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def recall(router: F32, x: F32, outputs: F32, k: int) -> float:
    """Mean share of the oracle's top-k experts (largest outputs) that the router's top-k also picks."""
    picked, oracle = top_k(x @ router.T, k), top_k(outputs, k)
    hits = sum(int(np.intersect1d(p, o).size) for p, o in zip(picked, oracle, strict=True))
    return hits / (k * int(x.shape[0]))


def logit_scale(router: F32, x: F32, spread: float) -> float:
    """A power of two that shrinks the router's logits until no token's logits stray more than `spread` from their
    mean, so that n·softmax(logits), the weight an expert's output gets, stays within e^±spread of 1."""
    z = x @ router.T
    widest = float(np.abs(z - z.mean(axis=1, keepdims=True)).max())
    return float(2.0 ** np.floor(np.log2(spread / widest))) if widest > 0 else 1.0


def shared_gate(x: F32, spread: float) -> F32:
    """The shared expert's gate vector w: sigmoid(w·x) weighs the shared expert. Along the tokens' mean direction,
    so that w·x keeps one sign (llama.cpp computes the sigmoid as silu(z)/z: z = 0 would give NaN), scaled so that
    2·sigmoid(w·x) = 1 + w·x/2 + ... stays within about e^±spread of 1 on these tokens."""
    mean = x.astype(np.float64).mean(axis=0)
    z = x @ mean
    return np.asarray(mean * (2 * spread / float(np.abs(z).max())), dtype=np.float32)
