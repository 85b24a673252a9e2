"""Does the profile's error model rank mixes the way the real KL divergence does?

Quantizes a set of mixes of one model (random ones, and the solver's at several sizes), measures each one's mean
KL divergence against the reference on the evaluation text (which the profile never saw), and reports it beside the
profile's prediction: Spearman rank correlation, the predicted/measured ratio per mix, and a log-log plot.

Random mixes: every tensor kind (attn_q, ffn_down, token_embd, ...) gets a random level on a ladder of types sorted
by size, and every tensor a random step of -1, 0 or +1 from its kind's level, so the mixes differ both in size and
in where their bytes go. Encoded tensors are cached across mixes (dynq.quantize's reuse_encoded).

    .venv/bin/python bench/error_model.py REF.gguf --profile P.json --imatrix I.gguf \
        [--random 8] [--solve-at 560MiB ...] [--chunks 4] [--seed 0] [--name qwen2.5-coder-1.5b]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dynq
from dynq.budget.profile_file import Profile
from dynq.core.qtypes import QType, qtype
from dynq.core.units import MIB
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.solved_recipe import solution_recipe, units_from_plan

THREADS = os.cpu_count() or 1
RESULTS = Path(__file__).parent / "results"
# The ladder random mixes climb: the types a user's budget spans, one per size step.
LADDER = ("IQ1_S", "IQ2_XXS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class MixResult:
    name: str
    kind: str  # "random" or "solved"
    bytes: int
    bpw: float
    predicted_kld: float
    kld_mean: float
    kld_p99: float
    top1: float
    seconds: float


def _kind(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", name)


def random_choice(plan: QuantPlan, profile: Profile, rng: random.Random) -> dict[str, QType]:
    """A random mix: per tensor kind a level on the ladder, per tensor a step of -1..1 from it, among the types
    that tensor can take (row length, profiled)."""
    units, fixed = units_from_plan(plan, profile.costs(), [qtype(t) for t in LADDER], has_imatrix=True)
    levels: dict[str, int] = {}
    choice = dict(fixed)  # kept tensors keep their type
    for unit in units:
        options = sorted(unit.options, key=lambda o: o.nbytes)
        names = [(n, _kind(n)) for n in unit.names]
        level = levels.setdefault(names[0][1], rng.randrange(len(LADDER)))
        at = min(max(round(level * (len(options) - 1) / (len(LADDER) - 1)) + rng.choice((-1, 0, 1)), 0),
                 len(options) - 1)  # fmt: skip
        for n, _ in names:
            choice[n] = options[at].qtype
    return choice


def measure(
    plan: QuantPlan,
    kind: str,
    predicted: float,
    ref: Path,
    imatrix: dynq.Imatrix,
    work: Path,
    chunks: int,
    ctx: dynq.RunContext,
) -> MixResult:
    out = work / f"{plan.recipe.name}.gguf"
    started = time.perf_counter()
    dynq.quantize(plan, out, imatrix=imatrix, ctx=ctx, reuse_encoded=True, overwrite=True)
    scores = dynq.evaluate(out, ref, n_ctx=512, chunks=chunks, ctx=ctx)
    out.unlink()
    return MixResult(plan.recipe.name, kind, plan.total_bytes, plan.bpw, predicted, scores.kld_mean,
                     scores.kld_p99, scores.top1, time.perf_counter() - started)  # fmt: skip


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _plot(results: Sequence[MixResult], path: Path, title: str) -> None:
    fig = Figure(figsize=(6.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for kind, marker in (("random", "o"), ("solved", "*")):
        pts = [r for r in results if r.kind == kind]
        ax.scatter([r.predicted_kld for r in pts], [r.kld_mean for r in pts], marker=marker, s=60, label=kind)
    lo = min(min(r.predicted_kld, r.kld_mean) for r in results) * 0.8
    hi = max(max(r.predicted_kld, r.kld_mean) for r in results) * 1.25
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, label="measured = predicted")
    ax.set(xscale="log", yscale="log", xlabel="predicted KLD (profile, calibration text)",
           ylabel="measured mean KLD (evaluation text)", title=title)  # fmt: skip
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def report(results: Sequence[MixResult], settings: Mapping[str, object], name: str) -> str:
    rho = spearman([r.predicted_kld for r in results], [r.kld_mean for r in results])
    ratios = np.array([r.predicted_kld / r.kld_mean for r in results])
    lines = [
        f"# The profile's error model against measured KL divergence: {name}",
        "",
        f"{len(results)} mixes; Spearman rank correlation predicted vs measured: **{rho:.3f}**. Predicted/measured "
        f"ratio: median {np.median(ratios):.2f}, range {ratios.min():.2g}-{ratios.max():.2g}.",
        "",
        "Within one kind of mix: "
        + ", ".join(
            f"{kind} {spearman([r.predicted_kld for r in sub], [r.kld_mean for r in sub]):.3f} ({len(sub)} mixes)"
            for kind in ("random", "solved")
            if len(sub := [r for r in results if r.kind == kind]) > 2
        )
        + ". Predicted: the profile's sum over tensors (calibration text); measured: `dynq eval` on the evaluation "
        "text, which the profile never saw. Solved mixes are named by their target in bytes (the sizes of "
        "llama.cpp's IQ1_S, IQ1_M, IQ2_XXS, Q2_K, Q3_K_M and Q4_K_M mixes in the model's bench).",
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()),
        "",
        "| mix | kind | size (MiB) | bpw | predicted KLD | measured KLD | ratio | KLD p99 | top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.bytes):
        ratio = r.predicted_kld / r.kld_mean
        lines.append(f"| {r.name} | {r.kind} | {r.bytes / MIB:.1f} | {r.bpw:.3f} | {r.predicted_kld:.3g} | "
                     f"{r.kld_mean:.3g} | {ratio:.2g} | {r.kld_p99:.3f} | {r.top1:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--imatrix", type=Path, required=True)
    parser.add_argument("--random", type=int, default=8)
    parser.add_argument("--solve-at", action="append", default=[])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--render", action="store_true", help="only redraw the table and plot from the JSON")
    args = parser.parse_args()
    name = args.name or args.reference.stem
    out_json = RESULTS / f"error-model-{name}.json"
    if args.render:
        saved = json.loads(out_json.read_text())
        _write(name, [MixResult(**m) for m in saved["mixes"]], saved["settings"])
        return
    ctx = dynq.RunContext(threads=args.threads)
    profile = Profile.load(args.profile)
    imatrix = dynq.read_imatrix(args.imatrix)
    base = dynq.plan(args.reference, "uniform-q8_0")
    inventory = dynq.open_source(args.reference).inventory()
    rng = random.Random(args.seed)
    mixes: list[tuple[QuantPlan, str, float]] = []
    for i in range(args.random):
        choice = random_choice(base, profile, rng)
        recipe = solution_recipe(base, choice, profile.costs(), name=f"random-{i}")
        mixes.append(
            (resolve(recipe, inventory), "random", profile.predicted_kld({n: t.name for n, t in choice.items()}))
        )
    for target in args.solve_at:
        solved = dynq.solve(args.reference, profile, target, has_imatrix=True, name=f"solved@{target}")
        mixes.append((solved.plan, "solved", solved.predicted_kld))
    results: list[MixResult] = []
    settings = {"reference": args.reference.name, "profile": args.profile.name, "imatrix": args.imatrix.name,
                "evaluation": f"{args.chunks} x 512 tokens", "seed": args.seed, "threads": args.threads}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dynq-error-model-") as tmp:
        for plan, kind, predicted in mixes:
            r = measure(plan, kind, predicted, args.reference, imatrix, Path(tmp), args.chunks, ctx)
            results.append(r)
            print(f"{r.name}: {r.bytes / MIB:.1f} MiB predicted {r.predicted_kld:.4f} measured {r.kld_mean:.4f} "
                  f"({r.seconds:.0f} s)", flush=True)  # fmt: skip
            out_json.write_text(json.dumps({"settings": settings, "mixes": [asdict(x) for x in results]}, indent=1))
    _write(name, results, settings)


def _write(name: str, results: Sequence[MixResult], settings: Mapping[str, object]) -> None:
    (RESULTS / f"error-model-{name}.md").write_text(report(results, settings, name))
    _plot(results, RESULTS / f"error-model-{name}.png", f"error model, {name}")
    print(report(results, settings, name))


if __name__ == "__main__":
    main()
