"""Check dynq's byte model against the buffers llama.cpp reports when it loads a model.

Loads each model CPU-only (n_gpu_layers=0, repacking off so every weight sits in the one mapped buffer) through
llama-cpp-python's C API with llama.cpp's log captured, parses the model, KV and compute buffer sizes it reports,
and compares them with `dynq.deploy.memory`. Writes bench/results/offload-check.md.

    .venv/bin/python bench/offload_check.py [--ctx 1024] [--ubatch 512] [extra.gguf ...]

Models: the zoo models as shipped, their uniform-q4_k requantizations (made once with llama.cpp's encoders and
cached under ~/.cache/dynq/offload-check), and tiny synthetic deepseek2 and qwen3moe files (MoE and deepseek2
attention paths).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dynq
from dynq.core.units import MIB
from dynq.deploy.memory import byte_model
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.runtime import llama_log

_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute) buffer size =\s+([0-9.]+) MiB")
ZOO = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


@dataclass
class Reported:
    model: float = 0.0
    kv: float = 0.0
    compute: float = 0.0


def load_and_report(path: Path, ctx: int, ubatch: int) -> Reported:
    import llama_cpp as L

    with llama_log() as lines:
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False  # no CPU_REPACK copies: weights stay in the mapped buffer the byte model predicts
        model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise RuntimeError(f"{path}: llama.cpp could not load it")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = ctx, ubatch, ubatch, 1
        cp.n_threads = cp.n_threads_batch = 1
        ctx_handle = L.llama_init_from_model(model, cp)
        if not ctx_handle:
            raise RuntimeError(f"{path}: llama.cpp could not create a context")
        L.llama_free(ctx_handle)
        L.llama_model_free(model)
    r = Reported()
    for m in _BUFFER.finditer("".join(lines)):
        kind, mib = m.group(2), float(m.group(3))
        setattr(r, kind.lower(), getattr(r, kind.lower()) + mib)
    return r


def requantized(name: str, ctx: dynq.RunContext) -> Path:
    """The zoo model (fetched before) requantized to uniform-q4_k by dynq (the second quant of each model), cached."""
    path = ctx.cache_dir / "offload-check" / f"{name}-q4_k.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        dynq.quantize(dynq.plan(f"zoo:{name}", "uniform-q4_k", ctx=ctx), path, ctx=ctx, backend="ggml")
    return path


def models(extra: list[Path], tmp: Path, ctx: dynq.RunContext) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for name in ZOO:
        out.append((f"zoo:{name} (as shipped)", dynq.fetch(f"zoo:{name}", ctx=ctx)))
        out.append((f"zoo:{name} uniform-q4_k", requantized(name, ctx)))
    for kind in ("deepseek2", "qwen3moe"):
        out.append((f"synthetic {kind}", write_synthetic(kind, tmp / f"{kind}.gguf")))
    out += [(p.name, p) for p in extra]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/offload-check.md"))
    ap.add_argument("extra", nargs="*", type=Path)
    args = ap.parse_args()
    ctx = dynq.RunContext(threads=os.cpu_count() or 1)
    rows = []
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in models(args.extra, Path(tmp), ctx):
            bm = byte_model(dynq.open_source(path, ctx=ctx).inventory())
            predicted = (
                bm.file_bytes / MIB,
                bm.kv_total(args.ctx, "f16", args.ubatch) / MIB,
                bm.compute_bytes(args.ctx, args.ubatch, with_output=True) / MIB,
            )
            got = load_and_report(path, args.ctx, args.ubatch)
            reported = (got.model, got.kv, got.compute)
            errs = [(p - r) / r * 100 if r else float("nan") for p, r in zip(predicted, reported, strict=True)]
            worst = max(worst, abs(errs[0]), abs(errs[1]))
            rows.append(
                f"| {label} | {bm.arch} | {predicted[0]:.2f} | {got.model:.2f} | {errs[0]:+.2f}% "
                f"| {predicted[1]:.2f} | {got.kv:.2f} | {errs[1]:+.2f}% "
                f"| {predicted[2]:.2f} | {got.compute:.2f} | {errs[2]:+.1f}% |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# Byte model against llama.cpp's reported buffers",
            "",
            f"CPU-only loads (n_gpu_layers=0, no repacking) through llama-cpp-python, n_ctx {args.ctx}, "
            f"ubatch {args.ubatch}, f16 KV cache, flash attention auto. Sizes in MiB; error = (dynq - llama.cpp) / "
            "llama.cpp. Model and KV are the byte model proper (exact tensor bytes; cells x per-token K/V bytes); "
            "compute is the planner's allowance, not a prediction of the allocator.",
            "",
            "| model | arch | model dynq | model llama.cpp | err | KV dynq | KV llama.cpp | err "
            "| compute dynq | compute llama.cpp | err |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Largest model/KV disagreement: {worst:.2f}% (the target is 5%).",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
