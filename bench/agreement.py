"""dynq's imatrix and eval against llama.cpp's own tools on zoo:qwen2.5-coder-1.5b, same files and text.

Writes bench/results/agreement.md: per-tensor imatrix differences against llama-imatrix, dynq eval against
llama-perplexity --kl-divergence, the size of the compact reference cache against llama.cpp's base-logit file, and
the error the compaction adds to the KL divergence (top-k plus rest bucket against the full vocabulary).

    .venv/bin/python bench/agreement.py [--chunks 6] [--imatrix-chunks 8] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import dynq
from dynq.eval.evaluate import TAIL_SAMPLES, TOP_K, reference_predictions, scored_positions
from dynq.eval.metrics import kld_estimate, kld_full
from dynq.eval.reference import CompactReference, log_softmax
from dynq.gguf_io.imatrix import read_imatrix
from dynq.llamacpp.compare import llama_imatrix, llama_kld, llama_kld_base
from dynq.llamacpp.runtime import LlamaRuntime, token_chunks

THREADS = os.cpu_count() or 1
RESULTS = Path(__file__).parent / "results"


def imatrix_agreement(model: Path, work: Path, chunks: int, ctx: dynq.RunContext) -> list[str]:
    calib = dynq.calibration(ctx=ctx)
    text_file = work / "calib.txt"
    text_file.write_text(calib.text)
    t = time.perf_counter()
    llama_imatrix(model, text_file, work / "llama.imatrix.gguf", 512, chunks, ctx.threads, ctx.cache_dir)
    t_llama = time.perf_counter() - t
    t = time.perf_counter()
    ours = dynq.collect_imatrix(model, text=calib, n_ctx=512, chunks=chunks, ctx=ctx)
    t_ours = time.perf_counter() - t
    theirs = read_imatrix(work / "llama.imatrix.gguf")
    diffs = []
    for name, e in ours.entries.items():
        a, b = e.importance(), theirs.entries[name].importance()
        diffs.append(float(np.abs(a - b).sum() / np.abs(b).sum()))
    d = np.array(diffs)
    same_counts = all(np.array_equal(e.counts, theirs.entries[n].counts) for n, e in ours.entries.items())
    return [
        "## imatrix: dynq imatrix against llama-imatrix",
        "",
        f"{model.name}, {chunks} chunks of 512 tokens of the built-in calibration text, {ctx.threads} threads.",
        "Per tensor: relative L1 difference of the per-column importance (mean of x²).",
        "",
        "| tensors | same token counts | median | p90 | max | llama-imatrix time | dynq time |",
        "|---|---|---|---|---|---|---|",
        f"| {len(d)} (llama: {len(theirs.entries)}) | {same_counts} | {np.median(d):.2e} | "
        f"{np.percentile(d, 90):.2e} | {d.max():.2e} | {t_llama:.0f} s | {t_ours:.0f} s |",
        "",
    ]


def eval_agreement(ref: Path, quant: Path, work: Path, chunks: int, ctx: dynq.RunContext) -> list[str]:
    text = dynq.evaluation(ctx=ctx)
    text_file = work / "eval.txt"
    text_file.write_text(text.text)
    base = work / "base.kld"
    llama_kld_base(ref, text_file, base, 512, chunks, ctx.threads, ctx.cache_dir)
    theirs = llama_kld(quant, base, text_file, 512, chunks, ctx.threads, ctx.cache_dir)
    ours = dynq.evaluate(quant, ref, text=text, n_ctx=512, chunks=chunks, ctx=ctx).to_dict()
    compact = reference_predictions(ref, text.text, text.provenance, 512, chunks, ctx)  # cached by the evaluation
    references = (ctx.cache_dir / "references").glob(f"{ref.stem}-*.npz")
    cache = sorted(references, key=lambda p: p.stat().st_mtime)[-1]
    exact, approx = exact_vs_compact(ref, quant, text.text, chunks, ctx.threads)
    base_size, cache_size = base.stat().st_size, cache.stat().st_size
    lines = [
        "## eval: dynq eval against llama-perplexity --kl-divergence",
        "",
        f"Reference {ref.name}, quant {quant.name}, {chunks} chunks of 512 tokens of the built-in evaluation text"
        f" ({ours['tokens']} scored tokens).",
        "",
        "| metric | llama-perplexity | dynq eval | difference |",
        "|---|---|---|---|",
    ]
    for key in ("ppl", "ref_ppl", "kld_mean", "kld_median", "kld_p99", "kld_max", "top1", "dp_rms"):
        if key in theirs:
            diff = (ours[key] - theirs[key]) / theirs[key] if theirs[key] else 0.0
            lines.append(f"| {key} | {theirs[key]:.6f} | {ours[key]:.6f} | {100 * diff:+.2f}% |")
    lines += [
        "",
        "## the compact reference cache",
        "",
        f"| llama.cpp base-logit file | dynq cache (top-{TOP_K} + {TAIL_SAMPLES} tail samples) | ratio |",
        "|---|---|---|",
        f"| {base_size:,} B | {cache_size:,} B | {base_size / cache_size:.0f}x |",
        "",
        f"Mean KLD over the full vocabulary {exact:.6f}, from the compact cache {approx:.6f}: "
        f"the compaction changes mean KLD by {100 * (approx - exact) / exact:+.3f}%.",
        f"({compact.top_ids.shape[0]} positions cached.)",
        "",
    ]
    return lines


def exact_vs_compact(ref: Path, quant: Path, text: str, chunks: int, threads: int) -> tuple[float, float]:
    exact, approx = [], []
    with LlamaRuntime(ref, 512, threads, logits=True) as r, LlamaRuntime(quant, 512, threads, logits=True) as q:
        for i, chunk in enumerate(token_chunks(r.tokenize(text), 512, chunks, "the evaluation text")):
            rows = scored_positions(512)
            ref_logits, q_logits = r.evaluate_chunk(chunk), q.evaluate_chunk(chunk)
            assert ref_logits is not None and q_logits is not None
            nxt = np.asarray(chunk[rows.start + 1 : rows.stop + 1], dtype=np.int32)
            q_logp = log_softmax(q_logits[rows])
            exact.append(kld_full(ref_logits[rows], q_logp))
            compact = CompactReference.from_logits(ref_logits[rows], nxt, TOP_K, TAIL_SAMPLES, seed=i)
            approx.append(kld_estimate(compact, slice(0, len(nxt)), q_logp))
    return float(np.concatenate(exact).mean()), float(np.concatenate(approx).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--imatrix-chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    ctx = dynq.RunContext(threads=args.threads)
    # the one step that uses the network or a compiler: the model, the texts and llama.cpp's tools (skipped if there)
    source = dynq.fetch("zoo:qwen2.5-coder-1.5b", ctx=ctx)
    dynq.fetch(dynq.TEXTS, ctx=ctx)
    dynq.build_tools(ctx=ctx)
    work_cache = ctx.cache_dir / "demo"
    work_cache.mkdir(parents=True, exist_ok=True)
    ref = work_cache / "qwen2.5-coder-1.5b-f16.gguf"
    if not ref.exists():
        dynq.quantize(dynq.plan(source, "f16", ctx=ctx), ref, ctx=ctx)
    quant = work_cache / "qwen2.5-coder-1.5b-uniform-q4_k.gguf"
    if not quant.exists():
        dynq.quantize(dynq.plan(ref, "uniform-q4_k", ctx=ctx), quant, ctx=ctx)
    with tempfile.TemporaryDirectory(prefix="dynq-agree-") as tmp:
        work = Path(tmp)
        lines = ["# dynq against llama.cpp's tools (zoo:qwen2.5-coder-1.5b)", ""]
        lines += imatrix_agreement(source, work, args.imatrix_chunks, ctx)
        lines += eval_agreement(ref, quant, work, args.chunks, ctx)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agreement.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
