"""dynq's torch encoders against llama.cpp's (ggml) for every type: weighted error and weights per second.

Rows are sampled evenly from every weight tensor of a model (by default the F16 reference of qwen2.5-coder-1.5b)
with its imatrix. For each type the same rows are encoded by ggml (llama.cpp's C quantizers), by torch on the CPU and,
when a GPU is present, by torch on CUDA; each result is decoded by gguf-py and scored by Σ importance·(x - y)².
On CUDA the throughput is also timed at full size: every tensor at its real shape, tiled from its sampled rows on the
GPU. The table ends with the projected time to encode DeepSeek-R1 with the dyn-iq1_s plan.

    .venv/bin/python bench/kernels.py sample [--rows 16] -o SAMPLE.npz     # real rows, small enough to travel
    .venv/bin/python bench/kernels.py run [--sample SAMPLE.npz] [--types Q4_K,IQ1_S] [--devices cpu,cuda]
    bench/kernels_gpu.sh        # on a GPU machine: the same sample, ggml's rows reused from the CPU run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dynq
from dynq.kernels import KernelBackend
from dynq.kernels.compare import decode, weighted_error
from dynq.kernels.encoders import encoders
from dynq.kernels.ggml import GgmlBackend
from dynq.kernels.torch_backend import TorchBackend

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
         "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")  # fmt: skip
RESULTS = Path(__file__).parent / "results"
CACHE = dynq.RunContext().cache_dir
DEMO = CACHE / "demo"


@dataclass
class Sample:
    name: str
    shape: tuple[int, int]  # the full tensor as rows x row length
    rows: np.ndarray  # float32 [r, k]
    importance: np.ndarray | None  # float32 [k]


def make_sample(ref: Path, imatrix: Path, rows: int, out: Path) -> None:
    model = dynq.open_source(ref)
    imx = dynq.read_imatrix(imatrix)
    arrays: dict[str, np.ndarray] = {}
    for t in model.inventory().tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight") or "norm" in t.name:
            continue
        full = model.load(t.name).reshape(-1, t.row_length)
        pick = np.linspace(0, full.shape[0] - 1, min(rows, full.shape[0])).astype(np.int64)
        arrays[f"{t.name}/rows"] = full[pick].astype(np.float16)
        arrays[f"{t.name}/shape"] = np.array(full.shape, dtype=np.int64)
        entry = imx.entries.get(t.name)
        if entry is not None:
            arrays[f"{t.name}/importance"] = entry.importance()[0].astype(np.float32)
        model.release(t.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def load_sample(path: Path) -> list[Sample]:
    data = np.load(path)
    names = sorted({k.rsplit("/", 1)[0] for k in data.files})
    out = []
    for n in names:
        imp = data[f"{n}/importance"] if f"{n}/importance" in data.files else None
        shape = tuple(int(v) for v in data[f"{n}/shape"])
        out.append(Sample(n, (shape[0], shape[1]), data[f"{n}/rows"].astype(np.float32), imp))
    return out


@dataclass
class Measured:
    error: float
    weights: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.weights / self.seconds if self.seconds > 0 else float("nan")


def measure(backend: KernelBackend, type_name: str, samples: list[Sample]) -> Measured:
    qt = dynq.qtype(type_name)
    usable = [s for s in samples if s.rows.shape[1] % qt.block_size == 0]
    backend.encode(qt, usable[0].rows[:4], usable[0].importance)  # warm-up: grids, kernels, thread pools
    err, n, seconds = 0.0, 0, 0.0
    for s in usable:
        start = time.perf_counter()
        data = backend.encode(qt, s.rows, s.importance)
        seconds += time.perf_counter() - start
        err += weighted_error(s.rows, decode(qt, data, s.rows.shape[1]), s.importance)
        n += s.rows.size
    return Measured(err, n, seconds)


def cuda_full_rate(type_name: str, samples: list[Sample]) -> float:
    """Weights per second of the torch encoder on CUDA over every tensor at its full shape."""
    qt = dynq.qtype(type_name)
    encode = encoders()[type_name]
    usable = [s for s in samples if s.rows.shape[1] % qt.block_size == 0]
    n, seconds = 0, 0.0
    with torch.inference_mode():
        for s in usable:
            rows = torch.from_numpy(s.rows).cuda()
            imp = None if s.importance is None else torch.from_numpy(s.importance).cuda()
            full = rows.repeat((s.shape[0] + len(rows) - 1) // len(rows), 1)[: s.shape[0]]
            step = max(1, (1 << 25) // s.shape[1])
            encode(full[:step], imp)  # warm-up at this shape
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, s.shape[0], step):
                encode(full[i : i + step], imp)
            torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            n += full.numel()
    return n / seconds


def r1_projection(rates: dict[str, float]) -> tuple[float, int, list[str]]:
    """Seconds to encode DeepSeek-R1's quantized tensors with the dyn-iq1_s plan at `rates` (weights/s)."""
    plan = dynq.plan("shapes:deepseek-r1", "dyn-iq1_s")
    per_type: dict[str, int] = {}
    for p in plan.tensors:
        if not p.qtype.is_float:
            per_type[p.qtype.name] = per_type.get(p.qtype.name, 0) + p.info.n_elements
    missing = [t for t in per_type if t not in rates]
    seconds = sum(n / rates[t] for t, n in per_type.items() if t in rates)
    return seconds, sum(per_type.values()), missing


def sample_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def ggml_rows_from(path: Path, digest: str) -> dict[str, Measured]:
    """ggml's error and rate per type from an earlier run on the same sample (for a GPU machine without
    llama-cpp-python: its rows were measured on the host that wrote `path`)."""
    earlier = json.loads(path.read_text())
    if earlier["sample_sha256"] != digest:
        raise SystemExit(f"{path} was measured on another sample ({earlier['sample_sha256']}, this one {digest})")
    out = {}
    for r in earlier["rows"]:
        weights = int(r["weights"])
        out[str(r["type"])] = Measured(float(r["ggml_error"]), weights, weights / float(r["ggml_rate"]))
    return out


def run(args: argparse.Namespace) -> None:
    samples = load_sample(args.sample)
    digest = sample_digest(args.sample)
    types = args.types.split(",") if args.types else list(TYPES)
    devices = args.devices.split(",")
    earlier = ggml_rows_from(args.ggml_from, digest) if args.ggml_from else None
    ggml = GgmlBackend(args.threads) if earlier is None else None  # a GPU machine may lack llama-cpp-python
    torch_backends = {d: TorchBackend(d, args.threads) for d in devices}
    rows: list[dict[str, object]] = []
    for t in types:
        if ggml is not None:
            g = measure(ggml, t, samples)
        else:
            assert earlier is not None
            g = earlier[t]
        row: dict[str, object] = {"type": t, "weights": g.weights, "ggml_error": g.error, "ggml_rate": g.rate}
        for d, backend in torch_backends.items():
            m = measure(backend, t, samples)
            row[f"torch_{d}_ratio"] = m.error / g.error if g.error else float("nan")
            row[f"torch_{d}_rate"] = m.rate
        if "cuda" in devices and args.cuda_full:
            row["torch_cuda_full_rate"] = cuda_full_rate(t, samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(rows, devices, args, digest)


def write_results(rows: list[dict[str, object]], devices: list[str], args: argparse.Namespace, digest: str) -> None:
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cuda_key = "torch_cuda_full_rate" if args.cuda_full and "cuda" in devices else "torch_cuda_rate"
    lines = [
        "# Kernel benchmark: dynq's torch encoders against llama.cpp's (ggml)",
        "",
        f"Sample: {args.sample.name}, rows spread evenly over every weight tensor of the model, with its imatrix.",
        f"Host: {host}{f'; GPU: {gpu}' if gpu else ''}. ggml and torch-cpu use {args.threads} threads."
        + (f" ggml's columns are from {args.ggml_from.name} (same sample, measured there)." if args.ggml_from else ""),
        "Error ratio: Σ importance·(x − decoded)² of torch over ggml's, on the same rows (below 1: torch is better).",
        "",
        "| type | error ratio (cpu) | "
        + ("error ratio (cuda) | " if "cuda" in devices else "")
        + f"ggml {args.threads} thr (Mw/s) | torch cpu (Mw/s) | "
        + ("torch cuda (Mw/s) | cuda / ggml |" if "cuda" in devices else "torch cpu / ggml |"),
        "|---|---|" + ("---|" if "cuda" in devices else "") + "---|---|---|" + ("---|" if "cuda" in devices else ""),
    ]
    rates: dict[str, float] = {}
    for r in rows:
        ggml_rate = float(r["ggml_rate"])  # type: ignore[arg-type]
        cells = [str(r["type"]), f"{r['torch_cpu_ratio']:.4f}"] if "cpu" in devices else [str(r["type"]), "–"]
        if "cuda" in devices:
            cells.append(f"{r['torch_cuda_ratio']:.4f}")
        cells += [f"{ggml_rate / 1e6:.2f}", f"{float(r.get('torch_cpu_rate', float('nan'))) / 1e6:.2f}"]  # type: ignore[arg-type]
        if "cuda" in devices:
            cuda_rate = float(r[cuda_key])  # type: ignore[arg-type]
            cells += [f"{cuda_rate / 1e6:.1f}", f"{cuda_rate / ggml_rate:.0f}x"]
            rates[str(r["type"])] = cuda_rate
        else:
            cpu_rate = float(r["torch_cpu_rate"])  # type: ignore[arg-type]
            cells.append(f"{cpu_rate / ggml_rate:.2f}x")
            rates[str(r["type"])] = cpu_rate
        lines.append("| " + " | ".join(cells) + " |")
    ggml_rates = {str(r["type"]): float(r["ggml_rate"]) for r in rows}  # type: ignore[arg-type]
    ours, total, missing = r1_projection(rates)
    theirs, _, _ = r1_projection(ggml_rates)
    where = "one GPU (torch on CUDA)" if "cuda" in devices else f"this CPU (torch, {args.threads} threads)"
    lines += [
        "",
        f"DeepSeek-R1 with dyn-iq1_s: {total / 1e9:.0f} G quantized weights. Projected encode time on {where}: "
        f"{ours / 3600:.2f} h; with ggml on {args.threads} threads: {theirs / 3600:.1f} h"
        + (f" (types not measured: {', '.join(missing)})" if missing else "") + ".",
    ]  # fmt: skip
    stem = args.out
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    record = {"rows": rows, "sample_sha256": digest, "args": {k: str(v) for k, v in vars(args).items()}}
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample real rows and importance into an .npz")
    s.add_argument("--ref", type=Path, default=DEMO / "qwen2.5-coder-1.5b-f16.gguf")
    s.add_argument("--imatrix", type=Path, default=DEMO / "calib8.imatrix.gguf")
    s.add_argument("--rows", type=int, default=16)
    s.add_argument("-o", "--output", type=Path, default=CACHE / "bench" / "kernel-sample.npz")
    r = sub.add_parser("run", help="measure every type on a sample")
    r.add_argument("--sample", type=Path, default=CACHE / "bench" / "kernel-sample.npz")
    r.add_argument("--types", default="")
    r.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--cuda-full", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--out", default="kernels")
    r.add_argument("--ggml-from", type=Path, help="reuse ggml's rows from an earlier run's JSON on this sample")
    args = parser.parse_args()
    if args.command == "sample":
        make_sample(args.ref, args.imatrix, args.rows, args.output)
    else:
        run(args)


if __name__ == "__main__":
    main()
