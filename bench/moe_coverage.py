"""Expert coverage on real routing: an imatrix of zoo:qwen2.5-coder-1.5b-moe collected with its normal routing
against one collected with every expert active (`--all-experts`), and dyn-iq1_s quantized with each.

    .venv/bin/python bench/moe_coverage.py [--chunks 8] [--eval-chunks 6] [--loop-tokens 64]

Both imatrices come from the same calibration text; each quant is judged against the F16 MoE model on the
evaluation text (KLD, top-1) and on the fixed loop prompts. Writes bench/results/qwen2.5-coder-1.5b-moe-coverage.
{md,json}: per-expert token counts (how many experts each block leaves starved) and the two quants side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import dynq
from dynq.core.importance import Imatrix
from dynq.eval.loops import generate, loop_rate
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_gguf

RESULTS = Path(__file__).parent / "results"
NAME = "qwen2.5-coder-1.5b-moe"
RECIPE = "dyn-iq1_s"
STARVED = 16  # tokens: fewer than this and an expert's importance is mostly noise


def imatrix(ref: Path, all_experts: bool, chunks: int, ctx: dynq.RunContext) -> tuple[Imatrix, float]:
    path = ctx.cache_dir / "moe-coverage" / f"{NAME}-{'all-experts' if all_experts else 'routed'}-{chunks}.imatrix.gguf"
    if path.exists():
        return read_imatrix(path), float("nan")
    started = time.perf_counter()
    imx = dynq.collect_imatrix(ref, chunks=chunks, all_experts=all_experts, ctx=ctx)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    write_imatrix_gguf(imx, path)
    return imx, seconds


def expert_counts(imx: Imatrix) -> dict[int, list[int]]:
    """Block → tokens each routed expert saw (from ffn_up_exps, which every routed token reaches)."""
    out = {}
    for name, entry in imx.entries.items():
        if name.endswith("ffn_up_exps.weight"):
            out[int(name.split(".")[1])] = [int(c) for c in entry.counts]
    return dict(sorted(out.items()))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--eval-chunks", type=int, default=6)
    ap.add_argument("--loop-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    ctx = dynq.RunContext(threads=2)
    ref = dynq.fetch(f"zoo:{NAME}", ctx=ctx)
    rows: list[dict[str, Any]] = []
    counts: dict[str, dict[int, list[int]]] = {}
    for all_experts in (False, True):
        label = "all experts" if all_experts else "routed"
        imx, imx_seconds = imatrix(ref, all_experts, args.chunks, ctx)
        counts[label] = expert_counts(imx)
        out = ctx.cache_dir / "moe-coverage" / f"{NAME}-{RECIPE}-{label.replace(' ', '-')}.gguf"
        started = time.perf_counter()
        dynq.quantize(dynq.plan(ref, RECIPE, ctx=ctx), out, imatrix=imx, ctx=ctx, overwrite=True)
        seconds = time.perf_counter() - started
        scores = dynq.evaluate(out, ref, chunks=args.eval_chunks, ctx=ctx)
        loops = loop_rate(generate(out, args.loop_tokens, ctx.threads)) if args.loop_tokens else float("nan")
        rows.append({"imatrix": label, "bytes": out.stat().st_size, "kld_mean": scores.kld_mean,
                     "kld_p99": scores.kld_p99, "top1": scores.top1, "ppl": scores.ppl, "loop_rate": loops,
                     "imatrix_seconds": imx_seconds, "quantize_seconds": seconds})  # fmt: skip
        out.unlink()
    (RESULTS / f"{NAME}-coverage.json").write_text(json.dumps({"rows": rows, "counts": counts}, indent=1) + "\n")
    (RESULTS / f"{NAME}-coverage.md").write_text(report(rows, counts, args))


def report(rows: Sequence[dict[str, Any]], counts: dict[str, dict[int, list[int]]], args: argparse.Namespace) -> str:
    routed = counts["routed"]
    tokens = args.chunks * 512
    lines = [
        f"# zoo:{NAME}: expert coverage on real routing, and what it does to {RECIPE}",
        "",
        f"Imatrix on {args.chunks} chunks of 512 tokens of calibration text ({tokens} tokens). With normal routing, "
        f"tokens per routed expert (ffn_up_exps), per block; starved: fewer than {STARVED} tokens.",
        "",
        "| block | min | median | max | experts starved | experts with no token |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for block, c in routed.items():
        a = np.array(c)
        lines.append(f"| {block} | {a.min()} | {int(np.median(a))} | {a.max()} | {(a < STARVED).sum()} | "
                     f"{(a == 0).sum()} |")  # fmt: skip
    every = sorted({c for cs in counts["all experts"].values() for c in cs})
    lines += [
        "",
        f"With `--all-experts` every expert saw {', '.join(map(str, every))} tokens.",
        "",
        f"{RECIPE} with each imatrix, judged against the F16 MoE model on {args.eval_chunks} chunks of the "
        f"evaluation text; loops on the fixed prompts, {args.loop_tokens} tokens:",
        "",
        "| imatrix | size (MiB) | PPL | KLD mean | KLD p99 | top-1 | loops |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['imatrix']} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | "
                     f"{r['kld_p99']:.4f} | {r['top1']:.1%} | {r['loop_rate']:.0%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
