"""Build a Mixture-of-Experts reference from a dense qwen2 model's real weights, measured on calibration text.

1. The dense model (its first `blocks` blocks) is written in F16: the reference the MoE model must reproduce.
2. llama.cpp runs it over the calibration text; every block's FFN input is captured (moe/activations.py).
3. Per block: shared expert, co-activation experts and a fitted router (moe/layout.py); the router's top-k recall
   against the oracle (the experts with the largest outputs) is measured on calibration chunks it was not fitted on.
4. The qwen2moe model is written (moe/convert.py); its perplexity on calibration text is measured for a range of
   experts per token, and the smallest count within `max_ppl_ratio` of the dense model becomes the file's default.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from dynq.calib.text import Text
from dynq.core.atomic import check_output_folder
from dynq.core.context import RunContext, context
from dynq.errors import DynqError
from dynq.eval.evaluate import perplexity
from dynq.gguf_io.reader import GGUFModel
from dynq.moe import layout as lay
from dynq.moe.activations import ffn_inputs
from dynq.moe.convert import MOE_ARCH, SOURCE_ARCH, BlockExperts, block_ffn, check_source, write_relaid

log = logging.getLogger(__name__)

LAYOUTS = ("coactivation", "contiguous")


@dataclass(frozen=True)
class MoeSettings:
    n_expert: int = 32
    n_shared: int = 768
    n_ctx: int = 512
    chunks: int = 8  # calibration chunks captured
    fit_chunks: int = 6  # the router is fitted on these; recall is measured on the rest
    curve_chunks: int = 4  # calibration chunks each point of the experts-per-token curve is judged on
    experts_per_token: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
    max_ppl_ratio: float = 1.25
    spread: float = 2.0**-12  # the largest |logit - mean logit| of the router on calibration tokens
    layout: str = "coactivation"
    seed: int = 0


@dataclass
class BlockReport:
    block: int
    shared_share: float  # mean share of a token's FFN contribution that the shared expert carries
    recall: dict[int, float]  # experts per token -> router recall of the oracle's choice (held-out chunks)
    logit_scale: float


@dataclass
class MoeReport:
    settings: MoeSettings
    source: str
    text: str
    blocks: list[BlockReport] = field(default_factory=list)
    dense_ppl: float = 0.0
    ppl: dict[int, float] = field(default_factory=dict)  # experts per token -> perplexity on calibration text
    experts_used: int = 0
    expert_share: float = 0.0  # routed-expert weights / all weights
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _block_experts(model: GGUFModel, block: int, x: lay.F32, s: MoeSettings, fit_tokens: int) -> tuple[
    BlockExperts, BlockReport
]:  # fmt: skip
    ffn = block_ffn(model, block)
    n_ff = ffn.gate.shape[0]
    if (n_ff - s.n_shared) % s.n_expert or s.n_shared >= n_ff:
        raise DynqError(f"{n_ff} neurons leave no equal split into {s.n_expert} experts after {s.n_shared} shared")
    hidden = ffn.hidden(x)
    fit, held = slice(0, fit_tokens), slice(fit_tokens, None)
    contrib = lay.contributions(ffn, hidden[fit])
    shared = lay.shared_neurons(contrib, s.n_shared)
    rest = np.setdiff1d(np.arange(n_ff), shared)
    if s.layout == "coactivation":
        experts = lay.coactivation_experts(contrib, rest, s.n_expert, s.seed)
    else:
        experts = lay.contiguous_experts(rest, s.n_expert)
    layout = lay.ExpertLayout(shared, experts)
    layout.check(n_ff)
    outputs = lay.expert_outputs(ffn, hidden, experts)
    router = lay.fit_router(x[fit], outputs[fit])
    recall = {k: lay.recall(router, x[held], outputs[held], k) for k in s.experts_per_token if k < s.n_expert}
    scale = lay.logit_scale(router, x, s.spread)
    share = float((contrib[:, shared].sum(axis=1) / contrib.sum(axis=1)).mean())
    gate = lay.shared_gate(x, s.spread)
    return BlockExperts(layout, (router * scale).astype(np.float32), gate), BlockReport(block, share, recall, scale)


def _set_experts_used(path: Path, count: int) -> None:
    """Rewrite the expert_used_count value in place (a fixed-width integer: no byte moves)."""
    reader = GGUFReader(path, "r+")
    f = reader.fields[f"{MOE_ARCH}.expert_used_count"]
    f.parts[f.data[0]][0] = count
    reader.data.flush()


def build_moe(
    source_path: str | os.PathLike[str],
    output: Path,
    text: Text,
    settings: MoeSettings = MoeSettings(),
    *,
    blocks: int | None = None,
    ctx: RunContext | None = None,
) -> MoeReport:
    """Write the qwen2moe re-laying of the dense model at `source_path` (its first `blocks` blocks) to `output`."""
    ctx = context(ctx)
    s = settings
    if s.layout not in LAYOUTS:
        raise DynqError(f"unknown expert layout '{s.layout}'; one of {', '.join(LAYOUTS)}")
    check_output_folder(output)
    source = GGUFModel(Path(source_path))
    check_source(source)
    n_blocks = int(source.field(f"{SOURCE_ARCH}.block_count"))
    blocks = n_blocks if blocks is None else blocks
    if not 1 <= blocks <= n_blocks:
        raise DynqError(f"{source_path}: has {n_blocks} blocks; cannot keep {blocks}")
    report = MoeReport(s, str(source_path), text.provenance)
    work = output.parent / f".{output.name}.dynq-moe-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        started = time.perf_counter()
        dense_path = work / "dense.gguf"
        write_relaid(source, dense_path, blocks=blocks, experts=None, metadata={})
        dense = GGUFModel(dense_path)
        report.seconds["dense"] = time.perf_counter() - started

        started = time.perf_counter()
        acts = ffn_inputs(dense_path, text.text, n_ctx=s.n_ctx, chunks=s.chunks, ctx=ctx)
        fit_tokens = s.fit_chunks * s.n_ctx
        if any(x.shape[0] <= fit_tokens for x in acts.values()):
            raise DynqError(f"the calibration text gives fewer than {s.chunks} chunks of {s.n_ctx} tokens")
        experts: dict[int, BlockExperts] = {}
        for b in range(blocks):
            experts[b], block_report = _block_experts(dense, b, acts.pop(b), s, fit_tokens)
            report.blocks.append(block_report)
            ctx.report("experts", b + 1, blocks, "blocks")
        report.seconds["layout"] = time.perf_counter() - started

        started = time.perf_counter()
        moe_path = work / output.name
        n_ff_exp = int(next(iter(experts.values())).layout.experts.shape[1])
        meta: dict[str, object] = {
            "general.name": f"{source.field('general.name') or source.path.stem} (re-laid as experts by dynq)",
            f"{MOE_ARCH}.expert_count": s.n_expert,
            f"{MOE_ARCH}.expert_used_count": s.n_expert,
            f"{MOE_ARCH}.expert_feed_forward_length": n_ff_exp,
            f"{MOE_ARCH}.expert_shared_feed_forward_length": s.n_shared,
            "dynq.moe.layout": s.layout,
            "dynq.moe.calibration": text.provenance,
        }
        write_relaid(dense, moe_path, blocks=blocks, experts=experts, metadata=meta)
        report.seconds["write"] = time.perf_counter() - started

        started = time.perf_counter()
        report.dense_ppl = perplexity(dense_path, text.text, s.n_ctx, s.curve_chunks, ctx.threads)
        for i, k in enumerate(s.experts_per_token):
            report.ppl[k] = perplexity(moe_path, text.text, s.n_ctx, s.curve_chunks, ctx.threads, experts_used=k)
            ctx.report("experts-per-token", i + 1, len(s.experts_per_token), "counts")
        within = [k for k, ppl in sorted(report.ppl.items()) if ppl <= s.max_ppl_ratio * report.dense_ppl]
        report.experts_used = within[0] if within else s.n_expert
        _set_experts_used(moe_path, report.experts_used)
        report.seconds["curve"] = time.perf_counter() - started

        moe = GGUFModel(moe_path)
        routed = sum(t.n_elements for t in moe.tensors if "_exps." in t.name)
        report.expert_share = routed / sum(t.n_elements for t in moe.tensors)
        moe_path.replace(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
