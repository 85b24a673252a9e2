"""Check the offload planner's split placements against the buffers llama.cpp reports on each device.

No GPU is needed: llama.cpp's RPC backend serves a local ggml-rpc-server (CPU backend) as a GPU-type device, so
llama.cpp places layers with `-ngl` and tensors with `-ot` / `--n-cpu-moe` exactly as it would on a CUDA card and
logs each device's model, KV and compute buffers. For each model and VRAM budget, `dynq.offload` plans the
placement; its own command line (llama-perplexity instead of llama-cli) is run against the RPC device without
mmap and without repacking, so every CPU weight lands in one counted buffer; the load stops once the compute
buffers are logged. Predicted and reported bytes are compared per device.

    .venv/bin/python bench/offload_split.py [--ctx 1024] [--ubatch 512] [MODEL.gguf=VRAM ...]

Cases: the MoE reference zoo:qwen2.5-coder-1.5b-moe (F16) at 1.5 and 2.5 GiB, where routed experts go to the CPU,
and the dense zoo:qwen2.5-coder-1.5b at 1.5 GiB (a layer split), then any files given (e.g. a quant of the MoE model
whose blocks mix types). The RPC tools are built once from the pinned sdist (~5 min) under
~/.cache/dynq/llama.cpp-rpc-<version>. Writes bench/results/offload-split.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import dynq
from dynq.calib.text import evaluation_text
from dynq.core.units import MIB, parse_memory
from dynq.deploy.offload import GPU_RESERVE, Hardware, Placement, Settings, expert_args, llama_command
from dynq.llamacpp.tools import RPC, build_tools, tool

_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute) buffer size =\s+([0-9.]+) MiB")
_READY = "calculating perplexity"  # logged after every buffer is allocated
CASES = (
    ("zoo:qwen2.5-coder-1.5b-moe", "1.5GB"),
    ("zoo:qwen2.5-coder-1.5b-moe", "2.5GB"),
    ("zoo:qwen2.5-coder-1.5b", "1.5GB"),
)


@dataclass
class Row:
    model: str
    vram: str
    n_gpu_layers: int
    overrides: str
    experts_on_cpu: int
    predicted: dict[str, float]  # MiB: gpu_model, cpu_model, gpu_kv, cpu_kv, gpu_compute
    reported: dict[str, float]  # MiB, the same keys, from llama.cpp's log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rpc_server(binary: Path, port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None:
            raise RuntimeError(f"ggml-rpc-server exited: {server.stdout.read() if server.stdout else ''}")
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("ggml-rpc-server did not start listening within 60 s")


def reported_buffers(command: list[str]) -> dict[str, float]:
    """Run llama.cpp until its buffers are allocated; MiB per kind and device side."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if _READY in line:
            break
    proc.kill()
    proc.wait()
    log = "".join(lines)
    if _READY not in log:
        raise RuntimeError(f"llama.cpp stopped before allocating its buffers:\n{''.join(lines[-15:])}")
    out = dict.fromkeys(("gpu_model", "cpu_model", "gpu_kv", "cpu_kv", "gpu_compute", "cpu_compute"), 0.0)
    for m in _BUFFER.finditer(log):
        side = "gpu" if m.group(1).startswith("RPC") else "cpu"
        out[f"{side}_{m.group(2).lower()}"] += float(m.group(3))
    return out


def predicted_buffers(p: Placement) -> dict[str, float]:
    compute = sum(p.gpu_bytes) - sum(p.gpu_weights) - sum(p.gpu_kv) - GPU_RESERVE * len(p.gpu_bytes)
    return {
        "gpu_model": sum(p.gpu_weights) / MIB,
        "cpu_model": p.cpu_weights / MIB,
        "gpu_kv": sum(p.gpu_kv) / MIB,
        "cpu_kv": p.cpu_kv / MIB,
        "gpu_compute": compute / MIB if p.n_gpu_layers else 0.0,
    }


def check(model: str, vram: str, settings: Settings, text: Path, ctx: dynq.RunContext) -> Row:
    path = Path(dynq.fetch(model, ctx=ctx)) if model.startswith("zoo:") else Path(model)
    plan = dynq.offload(path, Hardware(vram=parse_memory(vram)), settings=settings, kv_types=("f16",), ctx=ctx)
    best = plan.best
    port = free_port()
    perplexity = tool("llama-perplexity", ctx.cache_dir, RPC)
    command = shlex.split(llama_command(str(path), best, settings, binary=str(perplexity)))
    ub = str(settings.n_ubatch)
    command += ["--rpc", f"127.0.0.1:{port}", "-fit", "off", "--load-mode", "none", "--no-repack", "-b", ub, "-ub", ub,
                "-t", "2", "-f", str(text), "--chunks", "1", "-lv", "4"]  # fmt: skip
    server = rpc_server(tool("ggml-rpc-server", ctx.cache_dir, RPC), port)
    try:
        reported = reported_buffers(command)
    finally:
        server.kill()
        server.wait()
    label = model if model.startswith("zoo:") else path.name
    overrides = " ".join(expert_args(best)) or "-"
    return Row(label, vram, best.n_gpu_layers, overrides, best.experts_on_cpu, predicted_buffers(best), reported)


def _err(p: float, r: float) -> str:
    return f"{(p - r) / r * 100:+.2f}%" if r else ("0" if p == 0 else "n/a")


def table(rows: list[Row], settings: Settings, note: str) -> str:
    head = (
        "| model | VRAM | -ngl | expert overrides | expert tensors on CPU | GPU model dynq | llama.cpp | err "
        "| CPU model dynq | llama.cpp | err | GPU KV dynq | llama.cpp | err | CPU KV dynq | llama.cpp | err "
        "| GPU compute allowance | llama.cpp GPU compute |"
    )
    lines = [head, "|" + "---|" * 5 + "---:|" * 14]
    worst = 0.0
    for r in rows:
        cells = []
        for key in ("gpu_model", "cpu_model", "gpu_kv", "cpu_kv"):
            p, q = r.predicted[key], r.reported[key]
            cells += [f"{p:.2f}", f"{q:.2f}", _err(p, q)]
            if q:
                worst = max(worst, abs(p - q) / q * 100)
        overrides = r.overrides.replace("|", "\\|")
        lines.append(
            f"| {r.model} | {r.vram} | {r.n_gpu_layers} | `{overrides}` | {r.experts_on_cpu} | "
            + " | ".join(cells)
            + f" | {r.predicted['gpu_compute']:.2f} | {r.reported['gpu_compute']:.2f} |"
        )
    return "\n".join(
        [
            "# Offload placements against llama.cpp's per-device buffers",
            "",
            "Each placement is the one `dynq offload MODEL --vram V` chooses, run as its own command line "
            "(llama-perplexity in place of llama-cli) with a local ggml-rpc-server (CPU backend) as the GPU: "
            "`--rpc`, `--load-mode none` (no mmap), `--no-repack`, `-fit off`, "
            f"n_ctx {settings.n_ctx}, ubatch {settings.n_ubatch}, "
            f"{settings.kv_type} KV cache, flash attention on. Sizes in MiB as llama.cpp logs them (two decimals); "
            "error = (dynq - llama.cpp) / llama.cpp. Model and KV are the byte model per device; the GPU compute "
            "column is the planner's allowance (activations plus one block's CPU weights staged for prompt batches), "
            "not a prediction of the allocator.",
            *(["", note] if note else []),
            "",
            *lines,
            "",
            f"Largest model/KV disagreement on either device: {worst:.2f}% (the target is 5%).",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/offload-split.md"))
    ap.add_argument("--note", default="", help="a sentence for the table, e.g. how the extra files were made")
    ap.add_argument("cases", nargs="*", help="more cases as MODEL=VRAM, e.g. ~/q.gguf=2GB")
    args = ap.parse_args()
    cases = [*CASES, *(tuple(c.rsplit("=", 1)) for c in args.cases)]
    ctx = dynq.RunContext(threads=2)
    build_tools(ctx.cache_dir, RPC)
    settings = Settings(n_ctx=args.ctx, n_ubatch=args.ubatch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "eval.txt"
        text.write_text(evaluation_text(ctx.cache_dir).text)
        for model, vram in cases:
            rows.append(check(model, vram, settings, text, ctx))
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, settings, args.note))
    args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
