"""The offload planner: which blocks and which expert tensors go to the GPU(s), and how fast decoding will be.

llama.cpp places whole layers with `-ngl N` (the last N-1 blocks and the output layer; the input layer stays on the
CPU) and single tensors with `-ot REGEX=CPU` / `--n-cpu-moe N`. Per decoded token every dense weight is read once,
routed experts k/n of theirs, and the KV cache of every block; time per token is bytes over bandwidth on each side.
So the planner fills VRAM first with what each token reads in full (attention, shared experts, KV, output) and
then with routed experts from the last block down, and keeps the placement with the highest predicted speed.
"""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass, field, replace
from typing import Any

from dynq.core.context import RunContext, context
from dynq.core.units import GIB
from dynq.deploy.memory import ByteModel, SizedTensor, byte_model
from dynq.recipe.plan import resolve
from dynq.recipe.presets import RecipeLike, as_recipe
from dynq.sources.described import GGUFFile
from dynq.sources.open import SourceLike, open_source

log = logging.getLogger(__name__)

# Peak memory bandwidth (bytes/s) of a common GPU per VRAM size, used when none is given.
_GPU_BY_VRAM: tuple[tuple[int, str, float], ...] = (
    (8, "RTX 4060 (272 GB/s)", 272e9),
    (12, "RTX 4070 (504 GB/s)", 504e9),
    (16, "RTX 4080 (717 GB/s)", 717e9),
    (24, "RTX 4090 (1008 GB/s)", 1008e9),
    (32, "RTX 5090 (1792 GB/s)", 1792e9),
    (48, "RTX 6000 Ada (960 GB/s)", 960e9),
    (80, "H100 SXM 80GB (3350 GB/s)", 3350e9),
    (141, "H200 (4800 GB/s)", 4800e9),
)
DEFAULT_CPU_BANDWIDTH = 90e9  # dual-channel DDR5-5600, a desktop board
DEFAULT_EFFICIENCY = 0.7  # share of peak bandwidth llama.cpp's decode reaches in practice
GPU_RESERVE = GIB // 2  # CUDA context, cuBLAS workspace and the driver's own allocations per GPU
RULE_OF_THUMB_MARGIN = 4  # the blocks the common rule subtracts "for safety"
EXPERT_REGEX = r"ffn_(up|down|gate|gate_up)_(ch|)exps"  # llama.cpp's own --n-cpu-moe pattern


def default_gpu(vram: int) -> tuple[str, float]:
    """The common GPU with the nearest VRAM size at or above `vram` (or the largest)."""
    gib = vram / GIB
    for size, name, bw in _GPU_BY_VRAM:
        if gib <= size * 1.02:
            return name, bw
    return _GPU_BY_VRAM[-1][1], _GPU_BY_VRAM[-1][2]


@dataclass(frozen=True)
class Hardware:
    vram: int  # bytes per GPU
    n_gpus: int = 1
    ram: int | None = None  # bytes of system memory; None: not checked
    gpu_bandwidth: float | None = None  # bytes/s per GPU; None: by VRAM size
    cpu_bandwidth: float = DEFAULT_CPU_BANDWIDTH
    efficiency: float = DEFAULT_EFFICIENCY

    @property
    def gpu(self) -> tuple[str, float]:
        if self.gpu_bandwidth is not None:
            return f"given ({self.gpu_bandwidth / 1e9:.0f} GB/s)", self.gpu_bandwidth
        return default_gpu(self.vram)


@dataclass(frozen=True)
class Settings:
    n_ctx: int = 4096
    kv_type: str = "f16"
    n_ubatch: int = 512
    op_offload: bool = True  # llama.cpp's default: prompt batches run on the GPU, CPU weights staged in


@dataclass(frozen=True)
class Placement:
    """One way to load the model, with its memory per device and predicted decode speed."""

    label: str
    n_gpu_layers: int
    override_tensors: tuple[str, ...]
    n_cpu_moe: int | None  # when the CPU experts are exactly those of the first N blocks
    tensor_split: tuple[int, ...] | None
    gpu_bytes: tuple[int, ...]  # per GPU: weights + KV + compute allowance + reserve
    cpu_bytes: int  # weights + KV + compute allowance in system memory
    gpu_weights: tuple[int, ...]  # per GPU, the exact tensor bytes llama.cpp's model buffer holds
    gpu_kv: tuple[int, ...]  # per GPU, the exact KV cache bytes
    cpu_weights: int
    cpu_kv: int
    gpu_read: int  # bytes read from VRAM per decoded token
    cpu_read: int  # bytes read from system memory per decoded token
    experts_on_cpu: int  # routed-expert tensors kept in system memory
    fits_vram: bool
    fits_ram: bool
    tokens_per_s: float

    @property
    def fits(self) -> bool:
        return self.fits_vram and self.fits_ram

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n_gpu_layers": self.n_gpu_layers,
            "override_tensors": list(self.override_tensors),
            "n_cpu_moe": self.n_cpu_moe,
            "tensor_split": list(self.tensor_split) if self.tensor_split else None,
            "gpu_bytes": sum(self.gpu_bytes),
            "gpu_bytes_per_gpu": list(self.gpu_bytes),
            "cpu_bytes": self.cpu_bytes,
            "gpu_weights_per_gpu": list(self.gpu_weights),
            "gpu_kv_per_gpu": list(self.gpu_kv),
            "cpu_weights": self.cpu_weights,
            "cpu_kv": self.cpu_kv,
            "gpu_read_per_token": self.gpu_read,
            "cpu_read_per_token": self.cpu_read,
            "experts_on_cpu": self.experts_on_cpu,
            "fits": self.fits,
            "predicted_tokens_per_s": self.tokens_per_s,
        }


@dataclass(frozen=True)
class OffloadPlan:
    model: ByteModel
    hardware: Hardware
    settings: Settings
    best: Placement
    alternatives: tuple[Placement, ...]
    rule_of_thumb: Placement
    command: str
    assumptions: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        m, s = self.model, self.settings
        return {
            "source": m.source,
            "arch": m.arch,
            **self.best.to_dict(),
            "command": self.command,
            "file_bytes": m.file_bytes,
            "bytes": {
                "input": m.input_bytes,
                "output": m.output_bytes,
                "blocks": list(m.block_bytes),
                "routed_experts": list(m.expert_bytes),
                "kv_per_token": [m.kv_bytes_per_token(b, s.kv_type) for b in range(m.n_blocks)],
                "kv_total": m.kv_total(s.n_ctx, s.kv_type, s.n_ubatch),
                "compute_allowance": m.compute_bytes(s.n_ctx, s.n_ubatch, True),
            },
            "ctx": s.n_ctx,  # the key `dynq offload --json` has always written
            "kv_type": s.kv_type,
            "rule_of_thumb": self.rule_of_thumb.to_dict(),
            "alternatives": [p.to_dict() for p in self.alternatives],
            "assumptions": list(self.assumptions),
            "notes": list(self.notes),
        }


def rule_of_thumb_layers(model: ByteModel, total_vram: int) -> int:
    """The common rule: blocks on GPU = VRAM / file size x blocks - 4, as an --n-gpu-layers value."""
    n = math.floor(total_vram / model.file_bytes * model.n_blocks - RULE_OF_THUMB_MARGIN)
    return max(0, min(n, model.n_blocks))


@dataclass(frozen=True)
class _Layout:
    """A candidate: `ngl` layers offloaded, the first `k` of the offloaded blocks' expert tensors kept on the CPU."""

    ngl: int
    k: int


class _Planner:
    def __init__(self, model: ByteModel, hw: Hardware, settings: Settings) -> None:
        self.m, self.hw, self.s = model, hw, settings
        n = model.n_blocks
        self.kv = [model.kv_bytes(b, settings.n_ctx, settings.kv_type, settings.n_ubatch) for b in range(n)]
        self.kv_read = [model.kv_bytes_per_token(b, settings.kv_type) * _pad_ctx(settings.n_ctx) for b in range(n)]
        self.act_gpu = model.compute_bytes(settings.n_ctx, settings.n_ubatch, with_output=True)
        self.act_cpu = self.act_gpu
        self.experts = [(b, t) for b in range(n) for t in model.blocks[b] if t.routed_expert]

    def gpu_start(self, ngl: int) -> int:
        """The first block on a GPU (llama.cpp: n_layer + 1 - ngl; layer n_layer is the output layer)."""
        return max(self.m.n_blocks + 1 - ngl, 0)

    def cpu_experts(self, lay: _Layout) -> list[tuple[int, SizedTensor]]:
        start = self.gpu_start(lay.ngl)
        return [e for e in self.experts if e[0] >= start][: lay.k]

    def n_offloaded_experts(self, ngl: int) -> int:
        start = self.gpu_start(ngl)
        return sum(1 for b, _ in self.experts if b >= start)

    def evaluate(self, label: str, lay: _Layout) -> Placement:
        m, hw = self.m, self.hw
        start = self.gpu_start(lay.ngl)
        on_cpu = {t.name for _, t in self.cpu_experts(lay)}
        frac = m.expert_read_fraction
        # per-layer VRAM weights and KV in llama.cpp's layer order (blocks, then the output layer)
        weight_loads: list[int] = []
        kv_loads: list[int] = []
        gpu_read = cpu_read = 0
        cpu_weights, cpu_kv = m.input_bytes, 0
        staged = 0  # the largest CPU-resident weights of one block: op offload copies them into VRAM per split
        cpu_read += m.input_bytes // max(1, m.n_vocab)  # one embedding row per token
        for b, block in enumerate(m.blocks):
            gpu_part = sum(t.nbytes for t in block if b >= start and t.name not in on_cpu)
            cpu_part = m.block_bytes[b] - gpu_part
            read_gpu = sum(_read(t, frac) for t in block if b >= start and t.name not in on_cpu)
            read_cpu = sum(_read(t, frac) for t in block) - read_gpu
            if b >= start:
                weight_loads.append(gpu_part)
                kv_loads.append(self.kv[b])
                gpu_read += read_gpu + self.kv_read[b]
            else:
                cpu_kv += self.kv[b]
                cpu_read += self.kv_read[b]
            cpu_weights += cpu_part
            cpu_read += read_cpu
            staged = max(staged, cpu_part)
        output_on_gpu = lay.ngl >= 1
        if output_on_gpu:
            weight_loads.append(m.output_bytes)
            kv_loads.append(0)
            gpu_read += m.output_bytes
        else:
            cpu_weights += m.output_bytes - (m.input_bytes if m.tied_output else 0)
            cpu_read += m.output_bytes
        loads = [w + k for w, k in zip(weight_loads, kv_loads, strict=True)]
        compute = [self.act_gpu] * hw.n_gpus
        if self.s.op_offload and staged:
            compute[0] += staged
        split = _split(loads, [hw.vram - GPU_RESERVE - c for c in compute]) if loads else [0] * hw.n_gpus
        fits_vram = split is not None
        if split is None:  # report the balanced split it would need, and mark it as not fitting
            split = _even_split(len(loads), hw.n_gpus)
        per_gpu, gpu_weights, gpu_kv, i = [], [], [], 0
        for g, count in enumerate(split):
            gpu_weights.append(sum(weight_loads[i : i + count]))
            gpu_kv.append(sum(kv_loads[i : i + count]))
            i += count
            per_gpu.append(gpu_weights[-1] + gpu_kv[-1] + compute[g] + GPU_RESERVE if lay.ngl else 0)
        cpu_total = cpu_weights + cpu_kv + self.act_cpu
        fits_ram = hw.ram is None or cpu_total <= hw.ram
        _, gpu_bw = hw.gpu
        seconds = gpu_read / (gpu_bw * hw.efficiency) + cpu_read / (hw.cpu_bandwidth * hw.efficiency)
        patterns, n_cpu_moe = self.override_patterns(lay)
        return Placement(
            label=label,
            n_gpu_layers=lay.ngl,
            override_tensors=patterns,
            n_cpu_moe=n_cpu_moe,
            tensor_split=tuple(split) if hw.n_gpus > 1 and lay.ngl else None,
            gpu_bytes=tuple(per_gpu),
            cpu_bytes=cpu_total,
            gpu_weights=tuple(gpu_weights),
            gpu_kv=tuple(gpu_kv),
            cpu_weights=cpu_weights,
            cpu_kv=cpu_kv,
            gpu_read=gpu_read,
            cpu_read=cpu_read,
            experts_on_cpu=len(on_cpu) + sum(1 for b, _ in self.experts if b < start),
            fits_vram=fits_vram,
            fits_ram=fits_ram,
            tokens_per_s=1.0 / seconds if seconds > 0 else math.inf,
        )

    def override_patterns(self, lay: _Layout) -> tuple[tuple[str, ...], int | None]:
        """The `-ot` patterns that keep the layout's expert tensors on the CPU, and `--n-cpu-moe N` when they are
        exactly the experts of blocks below N."""
        chosen = self.cpu_experts(lay)
        if not chosen:
            return (), None
        if len(chosen) == self.n_offloaded_experts(lay.ngl):  # blocks below the GPU ones are on the CPU anyway
            return (f"{EXPERT_REGEX}=CPU",), None
        by_block: dict[int, list[str]] = {}
        for b, t in chosen:
            by_block.setdefault(b, []).append(t.name.split(".")[2])
        per_block = {b: len([1 for bb, _ in self.experts if bb == b]) for b in by_block}
        full = sorted(b for b, names in by_block.items() if len(names) == per_block[b])
        partial = {b: names for b, names in by_block.items() if len(names) < per_block[b]}
        patterns = []
        if full:
            patterns.append(rf"blk\.({'|'.join(map(str, full))})\.{EXPERT_REGEX}=CPU")
        for b, names in partial.items():
            patterns.append(rf"blk\.{b}\.({'|'.join(names)})\.=CPU")
        return tuple(patterns), full[-1] + 1 if full else None

    def fits(self, lay: _Layout) -> bool:
        p = self.evaluate("", lay)
        return p.fits_vram

    def fewest_cpu_experts(self, ngl: int) -> int | None:
        """The smallest k for which `ngl` layers fit (VRAM only grows as k shrinks), or None."""
        hi = self.n_offloaded_experts(ngl)
        if not self.fits(_Layout(ngl, hi)):
            return None
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fits(_Layout(ngl, mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def largest_ngl(self, k_of: Any) -> int:
        best = 0
        for ngl in range(self.m.n_blocks + 2):
            if self.fits(_Layout(ngl, k_of(ngl))):
                best = ngl
        return best


def _read(t: SizedTensor, expert_fraction: float) -> int:
    return int(t.nbytes * expert_fraction) if t.routed_expert else t.nbytes


def _pad_ctx(n_ctx: int) -> int:
    return (n_ctx + 255) // 256 * 256


def _split(loads: list[int], capacities: list[int]) -> list[int] | None:
    """Contiguous layer counts per GPU: llama.cpp's even split of identical GPUs when it fits, else each GPU filled
    in order before the next; None if they do not fit."""
    even, i = _even_split(len(loads), len(capacities)), 0
    for count, cap in zip(even, capacities, strict=True):
        if sum(loads[i : i + count]) > cap:
            break
        i += count
    else:
        return even
    counts, i = [], 0
    for cap in capacities:
        used, n = 0, 0
        while i < len(loads) and used + loads[i] <= cap:
            used += loads[i]
            i, n = i + 1, n + 1
        counts.append(n)
    return counts if i == len(loads) else None


def _even_split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if g < n % parts else 0) for g in range(parts)]


def plan_offload(
    model: ByteModel, hw: Hardware, settings: Settings | None = None, model_file: str | None = None
) -> OffloadPlan:
    """The fastest placement that fits, the alternatives, the rule of thumb, and the command line."""
    s = settings or Settings()
    p = _Planner(model, hw, s)
    all_layers = model.n_blocks + 1
    candidates: list[Placement] = []
    for ngl in range(all_layers + 1):
        k = p.fewest_cpu_experts(ngl)
        if k is not None:
            candidates.append(p.evaluate("best", _Layout(ngl, k)))
    fitting = [c for c in candidates if c.fits] or candidates
    best = max(fitting, key=lambda c: (c.tokens_per_s, c.n_gpu_layers))
    layers_ngl = p.largest_ngl(lambda ngl: 0)
    alternatives = [p.evaluate("layers only (-ngl)", _Layout(layers_ngl, 0))]
    if model.is_moe:
        all_experts_ngl = p.largest_ngl(p.n_offloaded_experts)
        cpu_all = _Layout(all_experts_ngl, p.n_offloaded_experts(all_experts_ngl))
        alternatives.append(p.evaluate("all routed experts on CPU", cpu_all))
    rule = p.evaluate("rule of thumb", _Layout(rule_of_thumb_layers(model, hw.vram * hw.n_gpus), 0))
    gpu_name, _ = hw.gpu
    assumptions = (
        f"{hw.n_gpus} x GPU with {hw.vram / GIB:.0f} GiB, bandwidth {gpu_name}; "
        f"{GPU_RESERVE / GIB:.1f} GiB per GPU kept for the CUDA context",
        f"system memory bandwidth {hw.cpu_bandwidth / 1e9:.0f} GB/s; "
        + ("RAM not checked" if hw.ram is None else f"RAM {hw.ram / GIB:.0f} GiB"),
        f"decode reaches {hw.efficiency:.0%} of peak bandwidth; per token: every dense weight, "
        f"{model.n_expert_used}/{model.n_expert} of the routed experts, the KV cache of a full {s.n_ctx}-token window"
        if model.is_moe
        else f"decode reaches {hw.efficiency:.0%} of peak bandwidth; per token: every weight and the KV cache of a "
        f"full {s.n_ctx}-token window",
        f"KV cache {s.kv_type} (K and V), context {s.n_ctx}, ubatch {s.n_ubatch}, flash attention; compute buffer "
        f"{model.compute_bytes(s.n_ctx, s.n_ubatch, True) / GIB:.2f} GiB per backend"
        + (", plus one block's CPU-resident weights staged on GPU 0 for prompt batches (op offload)"
           if s.op_offload else ""),
    )  # fmt: skip
    notes = _notes(model, s, best, hw)
    command = llama_command(model_file or "MODEL.gguf", best, s)
    return OffloadPlan(model, hw, s, best, tuple(alternatives), rule, command, assumptions, notes)


def _notes(model: ByteModel, s: Settings, best: Placement, hw: Hardware) -> tuple[str, ...]:
    notes = []
    if not best.fits_ram and hw.ram is not None:
        notes.append(
            f"the CPU share ({best.cpu_bytes / GIB:.1f} GiB) exceeds RAM ({hw.ram / GIB:.0f} GiB): llama.cpp's mmap "
            "still runs it, reading the rest from disk each token, so expect less than the predicted speed"
        )
    if model.arch == "deepseek2" and not model.attention.mla:
        per = model.kv_bytes_per_token(0, s.kv_type)
        notes.append(
            f"this file keeps attn_kv_b whole (pre-MLA naming): llama.cpp caches full K and V per head, "
            f"{per / 1024:.0f} KiB per token per block at {s.kv_type}; a file with attn_k_b/attn_v_b caches the "
            f"MLA latent instead (kv_lora_rank + rope elements, no V)"
        )
    return tuple(notes)


def expert_args(p: Placement) -> list[str]:
    """llama.cpp's arguments that keep the placement's expert tensors on the CPU."""
    args, patterns = [], list(p.override_tensors)
    if p.n_cpu_moe is not None:  # the block-list pattern, said the short way
        args += ["--n-cpu-moe", str(p.n_cpu_moe)]
        patterns = patterns[1:]
    for pattern in patterns:
        args += ["-ot", pattern]
    return args


def llama_command(model_file: str, p: Placement, s: Settings, binary: str = "llama-cli") -> str:
    args = [binary, "-m", model_file, "-ngl", str(p.n_gpu_layers), "-c", str(s.n_ctx), *expert_args(p)]
    if p.tensor_split:
        args += ["-ts", ",".join(map(str, p.tensor_split))]
    if s.kv_type != "f16":
        args += ["-ctk", s.kv_type, "-ctv", s.kv_type]
    args += ["-fa", "on"]
    if not s.op_offload:
        args.append("--no-op-offload")
    return shlex.join(args)


# When no KV cache type is asked for, these are tried in order until the placement fits (llama.cpp's default first).
AUTO_KV_TYPES = ("f16", "q8_0", "q4_0")


def offload(
    source: SourceLike,
    hardware: Hardware,
    *,
    recipe: RecipeLike | None = None,
    settings: Settings | None = None,
    kv_types: tuple[str, ...] | None = None,
    ctx: RunContext | None = None,
) -> OffloadPlan:
    """Plan how llama.cpp should load `source` (GGUF path, `zoo:X`, `shapes:X` or an opened source) on `hardware`:
    the model as stored, or as `recipe` would quantize it. With `kv_types`, the first KV cache type whose best
    placement fits in VRAM and RAM wins (settings.kv_type is ignored); the plan notes what the smaller cache buys."""
    opened = open_source(source, context(ctx).cache_dir)
    inventory = opened.inventory()
    plan = resolve(as_recipe(recipe), inventory) if recipe is not None else None
    model_file = str(opened.path) if recipe is None and isinstance(opened, GGUFFile) else None
    model = byte_model(inventory, plan)
    s = settings or Settings()
    tried = kv_types or (s.kv_type,)
    plans = []
    for kv in tried:
        plans.append(plan_offload(model, hardware, replace(s, kv_type=kv), model_file))
        if plans[-1].best.fits:
            break
    result = plans[-1]
    if len(plans) > 1:
        first = plans[0].best
        note = (f"with a {tried[0]} KV cache nothing fits ({first.cpu_bytes / GIB:.1f} GiB would be left for RAM); "
                f"a {result.settings.kv_type} cache does (-ctk/-ctv {result.settings.kv_type}, which needs flash "
                "attention)")  # fmt: skip
        result = replace(result, notes=(note, *result.notes))
    return result
