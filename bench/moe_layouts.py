"""How well can a dense FFN of zoo:qwen2.5-coder-1.5b be cut into experts? Layouts and routers side by side.

    .venv/bin/python bench/moe_layouts.py [--blocks 3 14 25] [--chunks 6] [--fit-chunks 4]

For a few blocks, on calibration text (FFN inputs captured from llama.cpp): the relative error of the block's FFN
output, ‖y - y_k‖ / ‖y‖ averaged over held-out tokens, when only the shared expert and k routed experts run (each
at weight 1), for
- layouts: co-activation clusters (dynq's) against contiguous index runs, and 768 shared + 32 routed against
  4864 shared + 16 routed (both exact in F16: routed counts are powers of two);
- selection: the fitted linear router against the oracle (the k experts with the largest outputs for that token).
The oracle bounds what any router can reach with that layout. Writes bench/results/qwen2.5-coder-1.5b-moe-layouts.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import dynq
from dynq.calib.text import calibration_text
from dynq.gguf_io.reader import GGUFModel
from dynq.moe import layout as lay
from dynq.moe.activations import ffn_inputs
from dynq.moe.convert import block_ffn

RESULTS = Path(__file__).parent / "results"
SPLITS = ((768, 32), (4864, 16))


def output_errors(ffn: lay.FFN, x: lay.F32, hidden: lay.F32, layout: lay.ExpertLayout, router: lay.F32,
                  ks: Sequence[int]) -> dict[tuple[str, int], float]:  # fmt: skip
    y = hidden @ ffn.down.T
    shared = hidden[:, layout.shared] @ ffn.down[:, layout.shared].T
    outs = np.stack([hidden[:, idx] @ ffn.down[:, idx].T for idx in layout.experts], axis=1)  # [tokens, experts, d]
    norms = np.linalg.norm(outs, axis=2)
    errors = {}
    for k in ks:
        for how, scores in (("oracle", norms), ("router", x @ router.T)):
            chosen = lay.top_k(scores, k)
            y_k = shared + np.take_along_axis(outs, chosen[:, :, None], axis=1).sum(axis=1)
            errors[(how, k)] = float(np.mean(np.linalg.norm(y - y_k, axis=1) / np.linalg.norm(y, axis=1)))
    return errors


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 14, 25])
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--fit-chunks", type=int, default=4)
    args = ap.parse_args(argv)
    ctx = dynq.RunContext(threads=2)
    path = dynq.fetch("zoo:qwen2.5-coder-1.5b", ctx=ctx)
    dynq.fetch(dynq.TEXTS, ctx=ctx)
    model = GGUFModel(path)
    acts = ffn_inputs(path, calibration_text(ctx.cache_dir).text, n_ctx=512, chunks=args.chunks, ctx=ctx)
    fit, held = slice(0, args.fit_chunks * 512), slice(args.fit_chunks * 512, None)
    lines = [
        "# zoo:qwen2.5-coder-1.5b: cutting a dense FFN into experts",
        "",
        "Relative error of the block's FFN output when only the shared expert and k of the n routed experts run, "
        f"mean over {(args.chunks - args.fit_chunks) * 512} held-out calibration tokens (layouts and router "
        f"fitted on the first {args.fit_chunks * 512}). FFN inputs from llama.cpp running the shipped Q4_K_M "
        "model; weights dequantized. Oracle: the k experts whose outputs are largest for that token, the best any "
        "router can do.",
        "",
        "| block | shared + routed | layout | "
        + " | ".join(f"{how} k={part}" for part in ("n/8", "n/4", "n/2") for how in ("oracle", "router"))
        + " |",
        "|---:|---|---|" + "---:|" * 6,
    ]
    for block in args.blocks:
        ffn, x = block_ffn(model, block), acts[block]
        hidden = ffn.hidden(x)
        contrib = lay.contributions(ffn, hidden[fit])
        for n_shared, n_expert in SPLITS:
            shared = lay.shared_neurons(contrib, n_shared)
            rest = np.setdiff1d(np.arange(hidden.shape[1]), shared)
            for name, experts in (("co-activation", lay.coactivation_experts(contrib, rest, n_expert)),
                                  ("contiguous", lay.contiguous_experts(rest, n_expert))):  # fmt: skip
                layout = lay.ExpertLayout(shared, experts)
                router = lay.fit_router(x[fit], lay.expert_outputs(ffn, hidden[fit], experts))
                ks = [n_expert * q // 8 for q in (1, 2, 4)]
                err = output_errors(ffn, x[held], hidden[held], layout, router, ks)
                cells = " | ".join(f"{err[(h, k)]:.3f}" for k in ks for h in ("oracle", "router"))
                lines.append(f"| {block} | {n_shared} + {n_expert}x{rest.size // n_expert} | {name} | {cells} |")
                print(lines[-1], flush=True)
    (RESULTS / "qwen2.5-coder-1.5b-moe-layouts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
