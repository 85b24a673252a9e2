"""Running llama.cpp's own measuring tools on the same files and text, to check dynq against them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dynq.errors import DynqError
from dynq.llamacpp.tools import tool

_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
    "ref_ppl": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([0-9.]+)",
    "kld_median": r"Median\s+KLD:\s*([0-9.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([0-9.]+)",
    "kld_max": r"Maximum KLD:\s*([0-9.]+)",
    "top1": r"Same top p:\s*([0-9.]+)",
    "dp_rms": r"RMS Δp\s*:\s*([0-9.]+)",
}


_ATTEMPTS = 6


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise DynqError(f"{Path(cmd[0]).name} failed: {tail}")
    return done.stdout + done.stderr


def llama_imatrix(model: Path, text_file: Path, out: Path, n_ctx: int, chunks: int, threads: int, cache: Path) -> None:
    _run([str(tool("llama-imatrix", cache)), "-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(n_ctx),
          "-b", str(n_ctx), "--chunks", str(chunks), "-t", str(threads), "--no-ppl",
          "--output-format", "gguf"])  # fmt: skip


def llama_kld_base(ref: Path, text_file: Path, base: Path, n_ctx: int, chunks: int, threads: int, cache: Path) -> None:
    _run([str(tool("llama-perplexity", cache)), "-m", str(ref), "-f", str(text_file), "-c", str(n_ctx), "-b",
          str(n_ctx), "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(base)])  # fmt: skip


def llama_kld(
    quant: Path, base: Path, text_file: Path, n_ctx: int, chunks: int, threads: int, cache: Path
) -> dict[str, float]:
    """llama-perplexity --kl-divergence against a base file; its summary parsed into dynq eval's keys."""
    cmd = [str(tool("llama-perplexity", cache)), "-m", str(quant), "-f", str(text_file), "-c", str(n_ctx), "-b",
           str(n_ctx), "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(base),
           "--kl-divergence"]  # fmt: skip
    # On a loaded machine this build sometimes ends with status 0 before its last chunk or in the middle of its
    # summary (seen here about one run in three with both cores busy; once with the KLD lines but not the top-1
    # line, the summary's last); the run is deterministic, so running it again is safe.
    for _ in range(_ATTEMPTS):
        out = _run(cmd)
        result = {key: float(m.group(1)) for key, pattern in _PATTERNS.items() if (m := re.search(pattern, out))}
        if "kld_mean" in result and "top1" in result:
            break
    else:
        raise DynqError(f"llama-perplexity printed no KL divergence summary in {_ATTEMPTS} runs")
    result["top1"] /= 100.0  # printed as a percentage
    result["dp_rms"] = result.get("dp_rms", 0.0) / 100.0
    return result
