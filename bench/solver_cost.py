"""What `dynq profile` would cost on DeepSeek-R1, projected from the timings of a profile measured here.

The profile's two phases scale differently:
- errors: encoding sampled rows at every candidate type; the rate (row elements encoded per second, summed over
  types) is measured on the profiled model and applied to R1's tensors, rows and candidate types;
- probes: one forward pass of the reference over the probe text per group, plus encoding the group at the probe
  type. A least-squares fit of the measured probe times, seconds = a + b * (group parameters), gives the forward
  cost a (scaled to R1 by active parameters, which set a forward pass's FLOPs) and the encode cost b per parameter.

Scenarios scale the measured compute by core count and add the floors that are not compute: a forward pass over
a 512-token chunk touches nearly every routed expert, so it streams the whole reference from wherever it lives.

    .venv/bin/python bench/solver_cost.py REF.gguf --profile P.json [--target shapes:deepseek-r1]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dynq
from dynq.budget.distortion import candidate_types, probe_groups
from dynq.budget.profile_file import Profile
from dynq.core.tensors import ModelInventory, TensorClass, TensorInfo

RESULTS = Path(__file__).parent / "results"
GB = 1e9


def profiled(inventory: ModelInventory) -> list[TensorInfo]:
    plan = dynq.plan(inventory.source, "uniform-q8_0")
    return [p.info for p in plan.tensors if not p.kept]


def error_work(tensors: list[TensorInfo], rows: int, types: tuple[str, ...]) -> float:
    """Row elements encoded by the errors phase: sampled rows x row length x candidate types (with an imatrix)."""
    total = 0.0
    for t in tensors:
        n_rows = t.n_elements // t.row_length
        total += min(rows, n_rows) * t.row_length * max(1, len(candidate_types(t, types, True)))
    return total


def active_parameters(inventory: ModelInventory) -> float:
    """Parameters one token's forward pass multiplies with: every 2-D weight but the embedding table (a lookup),
    and of each 3-D expert tensor the share of experts a token is routed to."""
    meta = inventory.metadata
    used = next((v for k, v in meta.items() if k.endswith(".expert_used_count")), None)
    count = next((v for k, v in meta.items() if k.endswith(".expert_count")), None)
    share = used / count if isinstance(used, int) and isinstance(count, int) and count else 1.0
    matmuls = [t for t in inventory.tensors if len(t.shape) > 1 and t.tensor_class is not TensorClass.EMBEDDINGS]
    return sum(t.n_elements * (share if len(t.shape) == 3 else 1.0) for t in matmuls)


@dataclass(frozen=True)
class Scenario:
    name: str
    cores: int
    stream_gb_s: float  # how fast a forward pass can read the whole reference (RAM, disk) in GB/s
    nodes: int = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--target", default="shapes:deepseek-r1")
    parser.add_argument("--threads", type=int, default=2, help="threads the profile was measured with")
    args = parser.parse_args()
    prof = Profile.load(args.profile)
    here = dynq.open_source(args.reference).inventory()
    there = dynq.open_source(args.target).inventory()
    m = prof.method

    rate = error_work(profiled(here), m.rows, m.types) / prof.seconds["errors"]
    params = {t.name: t.n_elements for t in here.tensors}
    x = np.array([sum(params[n] for n in p.tensors) for p in prof.probes], dtype=float)
    y = np.array([p.seconds for p in prof.probes])
    b, a = np.polyfit(x, y, 1)
    scale = active_parameters(there) / active_parameters(here)
    r1 = profiled(there)
    groups = probe_groups(r1, m.group_blocks)
    r1_params = {t.name: t.n_elements for t in r1}
    encode = sum(b * sum(r1_params[n] for n in names) for names in groups.values())
    errors = error_work(r1, m.rows, m.types) / rate
    forward = a * scale
    ref_gb = there.nbytes / GB

    lines = [
        f"# Projected profiling cost: {there.source} from the {args.reference.stem} profile",
        "",
        f"Measured here ({args.threads} threads, {prof.method.n_ctx}-token probe chunks x {prof.method.chunks}, "
        f"groups of {m.group_blocks} blocks, {m.rows} sampled rows, {len(m.types)} candidate types): errors phase "
        f"{prof.seconds['errors']:.0f} s ({rate / 1e6:.1f} M row elements per second, over all types); "
        f"{len(prof.probes)} probes, fit seconds = {a:.1f} + {b * 1e9:.1f} per G parameters "
        f"(forward pass of {active_parameters(here) / 1e9:.2f} G active parameters: {a:.1f} s).",
        "",
        f"{there.source}: {there.n_parameters / 1e9:.0f} G parameters, {active_parameters(there) / 1e9:.1f} G active "
        f"per token ({scale:.0f}x the forward FLOPs), reference {ref_gb:.0f} GB as stored; {len(r1)} profiled "
        f"tensors, {len(groups)} probe groups.",
        "",
        "| where | errors | probes: forward | probes: encode | stream floor per probe | total |",
        "|---|---|---|---|---|---|",
    ]
    scenarios = [
        Scenario(f"this machine ({args.threads} cores, reference read from disk at 2 GB/s)", args.threads, 2.0),
        Scenario("1 CPU server (128 cores, 1.5 TB RAM holding the reference, 300 GB/s)", 128, 300.0),
        Scenario("8 CPU servers as above, probes spread over them with Ray", 128, 300.0, nodes=8),
    ]
    for s in scenarios:
        speed = s.cores / args.threads
        floor = ref_gb / s.stream_gb_s
        per_probe_forward = max(forward / speed, floor)
        probes = (len(groups) * per_probe_forward + encode / speed) / s.nodes
        total = errors / speed / s.nodes + probes
        lines.append(f"| {s.name} | {_h(errors / speed / s.nodes)} | {_h(len(groups) * per_probe_forward / s.nodes)} "
                     f"| {_h(encode / speed / s.nodes)} | {floor:.0f} s | {_h(total)} |")  # fmt: skip
    gpus = -(-int(ref_gb) // 141)
    reload = ref_gb / (gpus * 25.0)
    lines += [
        "",
        "Assumptions: compute scales linearly with cores from the rates measured here (optimistic beyond a few "
        "dozen cores); a probe's forward pass cannot beat streaming the whole reference once (a "
        f"{m.n_ctx}-token chunk routes through nearly every expert); the probe work copy of the reference (dynq "
        "keeps one on disk, open in llama.cpp, and restores each probed group in place) needs another "
        f"{ref_gb:.0f} GB of disk. On this machine neither the reference nor the work copy fits in memory, so every "
        "probe reads both from disk.",
        "",
        f"GPU (not measured here: no device in this session): the {ref_gb:.0f} GB reference needs {gpus} H200s "
        "(141 GB each) to stay resident. The forward FLOPs of a probe "
        f"({2 * active_parameters(there) * m.n_ctx * m.chunks / 1e12:.0f} TFLOP) take well under a second there; "
        "on the CPU llama.cpp computes from its memory map of the work copy, so a probe's group is written into "
        "the file and the model never reloads, but on a GPU it copies the weights into VRAM, and dynq then "
        f"reloads the model for every probe: about {reload:.0f} s each at 25 GB/s per GPU from host memory "
        f"({_h(reload * len(groups))} for the probes), plus the encodes of each group. What makes R1 affordable "
        "there: upload only the probed group's tensors into the loaded model (llama.cpp's API has no call for it "
        "today; the forward pass would then be the whole cost), probe routed experts in groups of 8 blocks (they are "
        "88% of the weights and behave alike), and spread probes over nodes.",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "solver-cost.md").write_text(text)
    print(text)


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


if __name__ == "__main__":
    main()
