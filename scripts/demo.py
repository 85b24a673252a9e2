"""`make demo`: what dynq does best, on a real model. Qwen2.5-Coder-1.5B at exactly the tensor bytes of llama.cpp's own
IQ1_S mix, three ways: llama.cpp's mix, dynq's solved mix, and the largest uniform type that fits. One table (size,
KL divergence mean and p99, top-1, loops), then each file's completion of a coding prompt.

Steps: fetch the model and the texts; build the F16 reference; collect an importance matrix on llama.cpp's runtime
(8 chunks of 512 tokens of the built-in calibration text); build llama.cpp's tools (once); profile the reference on
calibration text with settings chosen for a demo (printed); then `dynq.bench` measures the three files on the
evaluation text, which neither the imatrix nor the profile saw. Everything is cached: the model, texts and tools
under ~/.cache/dynq, the profile in its cache, the rest under ~/.cache/dynq/demo (delete it to start over).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import dynq
from dynq.benchmark import kept_path
from dynq.cli.text import data, line
from dynq.llamacpp.runtime import llama

MODEL = "zoo:qwen2.5-coder-1.5b"
MIX = "IQ1_S"  # llama.cpp's mix whose exact size the three files share
PROMPT = "# Python: return the n-th Fibonacci number\ndef fibonacci(n):\n"
IMATRIX_CHUNKS = 8
PROFILE = {"rows": 64, "group_blocks": 7, "n_ctx": 256, "chunks": 1}  # a demo's: minutes, not the default's hour
EVAL_CHUNKS, LOOP_TOKENS = 4, 128
THREADS = os.cpu_count() or 1
console = Console()
costs: dict[str, float] = {}


def step(title: str) -> float:
    console.rule(Text(title, style="bold"))
    return time.perf_counter()


def done(name: str, started: float, *parts: str | Text) -> None:
    costs[name] = time.perf_counter() - started
    console.print(line(*parts, f" ({costs[name]:.0f} s)"), highlight=False, soft_wrap=True)


def complete(path: Path) -> str:
    model = llama().Llama(str(path), n_ctx=512, n_threads=THREADS, verbose=False)
    out = model.create_completion(PROMPT, max_tokens=64, temperature=0.0)
    return str(out["choices"][0]["text"]).rstrip()


# ternary types are for ternary-trained models, MXFP4 for FP4-trained experts: no fair uniform quant of this model
NOT_FOR_THIS_MODEL = ("uniform-tq1_0", "uniform-tq2_0", "uniform-mxfp4")


def largest_uniform_within(reference: Path, size: int) -> str:
    """The uniform-<type> preset whose file holds the most tensor bytes that still fit in `size`."""
    names = [r.name for r in dynq.presets() if r.name.startswith("uniform-") and r.name not in NOT_FOR_THIS_MODEL]
    sizes = {n: dynq.plan(reference, n).total_bytes for n in names}
    return max((b, n) for n, b in sizes.items() if b <= size)[1]


def main() -> None:
    ctx = dynq.RunContext(threads=THREADS)
    work = ctx.cache_dir / "demo"
    work.mkdir(parents=True, exist_ok=True)
    begun = step(f"1. fetch {MODEL} and the texts")
    source = dynq.fetch(MODEL, ctx=ctx)
    dynq.fetch(dynq.TEXTS, ctx=ctx)
    done("fetch", begun, data(source), f": {source.stat().st_size / 1e9:.2f} GB")

    t = step("2. F16 reference")
    reference = work / "qwen2.5-coder-1.5b-f16.gguf"
    if not reference.exists():
        dynq.quantize(dynq.plan(MODEL, "f16", ctx=ctx), reference, ctx=ctx)
    done("reference", t, data(reference))

    t = step("3. importance matrix on llama.cpp's runtime (calibration text)")
    calib = dynq.calibration(ctx=ctx)
    digest = hashlib.sha256(calib.provenance.encode()).hexdigest()[:8]
    imatrix = work / f"qwen2.5-coder-1.5b-{IMATRIX_CHUNKS}x512-{digest}.imatrix.gguf"
    if not imatrix.exists():
        # on the published Q4_K_M file: the reference holds exactly its weights, and it runs twice as fast
        dynq.save_imatrix(dynq.collect_imatrix(source, text=calib, n_ctx=512, chunks=IMATRIX_CHUNKS, ctx=ctx), imatrix)
    done("imatrix", t, data(imatrix))

    t = step("4. llama.cpp's tools, from the pinned source (once)")
    done("tools", t, data(dynq.build_tools(ctx=ctx)))

    t = step("5. profile: how much each tensor hurts at each type (calibration text, cached)")
    console.print(line("settings: ", data(", ".join(f"{k} {v}" for k, v in PROFILE.items()))), highlight=False)
    profile = dynq.profile(reference, imatrix=imatrix, text=calib, ctx=ctx, **PROFILE)  # type: ignore[arg-type]
    done("profile", t, f"{len(profile.tensors)} tensors, {len(profile.probes)} probes")

    t = step(f"6. three files at the tensor bytes of llama.cpp's {MIX} mix, judged on evaluation text")
    quants = work / "quants"

    def measured(r: dynq.BenchRow) -> None:
        console.print(line(data(r.name), f": {r.bytes / 2**20:.1f} MiB, KLD {r.kld_mean:.3f}, quantized in "
                           f"{r.quantize_seconds:.0f} s"), highlight=False)  # fmt: skip

    common = {
        "imatrix": imatrix,
        "profile": profile,
        "out_dir": work / "bench",
        "name": "demo",
        "n_ctx": 512,
        "chunks": EVAL_CHUNKS,
        "loop_tokens": LOOP_TOKENS,
        "resume": True,
        "keep": quants,
        "ctx": ctx,
        "on_row": measured,
    }
    first = dynq.bench(reference, llama_mixes=[MIX], **common)  # type: ignore[arg-type]
    size = next(r.bytes for r in first.rows if r.name == MIX)
    uniform = largest_uniform_within(reference, size)
    result = dynq.bench(reference, recipes=[uniform], solve_at=[f"llama:{MIX}"], **common)  # type: ignore[arg-type]
    done("bench", t, f"llama.cpp's {MIX}: {size / 2**20:.1f} MiB; the uniform type that fits: ", data(uniform))

    rows = {r.name: r for r in result.rows}
    order = [MIX, f"solved@{MIX}", uniform]
    table = Table(title=f"qwen2.5-coder-1.5b at llama.cpp's {MIX} size, {EVAL_CHUNKS}x512 evaluation tokens")
    for column in ("file", "by", "MiB", "bpw", "KLD mean", "KLD p99", "top-1", "loops"):
        table.add_column(column, justify="left" if column in ("file", "by") else "right", no_wrap=column == "file")
    for name in order:
        r = rows[name]
        table.add_row(Text(name), r.maker, f"{r.bytes / 2**20:.1f}", f"{r.bpw:.3f}", f"{r.kld_mean:.3f}",
                      f"{r.kld_p99:.2f}", f"{r.top1:.1%}", f"{r.loop_rate:.0%}")  # fmt: skip
    console.print(table)
    ratio = rows[f"solved@{MIX}"].kld_mean / rows[MIX].kld_mean
    console.print(f"dynq's solved mix: {ratio:.2f}x the KL divergence of llama.cpp's {MIX} mix, at the same bytes.")

    t = step("7. each file continues a coding prompt (greedy, stock llama.cpp)")
    for name in order:
        completion = complete(kept_path(quants, "demo", name))
        # the completion is the model's text: data, never markup
        console.print(Panel(data(PROMPT + completion), title=line(data(name)), expand=False))
    costs["completions"] = time.perf_counter() - t
    total = time.perf_counter() - begun
    console.print(line("time per step: ", data(", ".join(f"{k} {v:.0f} s" for k, v in costs.items())),
                       f"; {total / 60:.1f} min in all"), highlight=False)  # fmt: skip


if __name__ == "__main__":
    main()
