"""`dynq bench`: one model quantized with a list of dynq recipes and with llama.cpp's own mixes (llama-quantize,
same imatrix), each judged against the reference: size, bpw, PPL, KLD mean and p99, top-1, loop rate, time.
Writes a markdown table and a plot of KLD against size with the Pareto front.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynq.calib.text import Text
from dynq.core.context import RunContext
from dynq.errors import DynqError
from dynq.eval.evaluate import evaluate
from dynq.eval.loops import generate, loop_rate
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import summarize
from dynq.llamacpp_tools import tool
from dynq.quantize import quantize
from dynq.recipe.budget import parse_target
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import load_recipe

log = logging.getLogger(__name__)

LLAMA = "llama:"  # a solve target named by a llama.cpp mix: that mix's size
SOLVED = "solved@"  # the name of a solver row
_UNSAFE = re.compile(r"[^\w.@-]")  # in a work file's name: a recipe may be given as a path
# (target bytes, row name) -> the solved plan to quantize
SolveFor = Callable[[int, str], QuantPlan]


@dataclass(frozen=True)
class BenchRow:
    name: str
    maker: str  # "dynq" or "llama.cpp"
    bytes: int
    bpw: float
    ppl: float
    kld_mean: float
    kld_p99: float
    top1: float
    loop_rate: float
    quantize_seconds: float


def _llama_quantize(ref: Path, mix: str, out: Path, imatrix: Path | None, ctx: RunContext) -> None:
    cmd = [str(tool("llama-quantize", ctx.cache_dir))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(ref), str(out), mix, str(ctx.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DynqError(f"llama-quantize {mix} failed: {done.stderr.strip().splitlines()[-1:]}")


def run_bench(
    ref: Path,
    recipes: Sequence[str],
    llama_mixes: Sequence[str],
    imatrix: Path | None,
    text: Text,
    work: Path,
    *,
    n_ctx: int = 512,
    chunks: int | None = None,
    loop_tokens: int = 256,
    ctx: RunContext,
    on_row: Callable[[BenchRow], None] | None = None,
    solve_at: Sequence[str] = (),
    solve_for: SolveFor | None = None,
    measured: Sequence[BenchRow] = (),
) -> list[BenchRow]:
    """Measure every recipe, llama.cpp mix and solve target; `measured` rows (from a resumed run) count for the
    sizes `llama:MIX` targets name."""
    rows: list[BenchRow] = []
    jobs = [("dynq", r) for r in recipes] + [("llama.cpp", m) for m in llama_mixes]
    jobs += [("dynq", SOLVED + s.removeprefix(LLAMA)) for s in solve_at]  # after the mixes whose sizes they take
    if solve_at and solve_for is None:
        raise DynqError("solve targets need a profile to solve from")
    inventory = GGUFModel(ref).inventory()
    for maker, name in jobs:
        out = work / f"{ref.stem}-{maker}-{_UNSAFE.sub('_', name)}.gguf"
        started = time.perf_counter()
        if name.startswith(SOLVED) and solve_for is not None:
            spec = solve_at[[SOLVED + s.removeprefix(LLAMA) for s in solve_at].index(name)]
            target = _target_bytes(spec, [*measured, *rows], inventory.n_parameters)
            quantize(solve_for(target, name), out, imatrix=imatrix, ctx=ctx)
        elif maker == "dynq":
            # No encoding cache: the time column must be what a user waits for.
            quantize(resolve(load_recipe(name), inventory), out, imatrix=imatrix, ctx=ctx)
        else:
            _llama_quantize(ref, name, out, imatrix, ctx)
        seconds = time.perf_counter() - started
        scores = evaluate(out, ref, text.text, text.provenance, n_ctx=n_ctx, n_chunks=chunks, ctx=ctx)
        loops = loop_rate(generate(out, loop_tokens, ctx.threads)) if loop_tokens else float("nan")
        summary = summarize(GGUFModel(out))
        row = BenchRow(name, maker, summary.total_bytes, summary.bpw, scores.ppl, scores.kld_mean, scores.kld_p99,
                       scores.top1, loops, seconds)  # fmt: skip
        rows.append(row)
        if on_row is not None:
            on_row(row)
        out.unlink()
    return rows


def _target_bytes(spec: str, rows: Sequence[BenchRow], n_parameters: int) -> int:
    """`llama:MIX`: the tensor bytes of that llama.cpp mix as measured here (equal size, byte for byte); otherwise
    a size or bpw."""
    if not spec.startswith(LLAMA):
        return parse_target(spec, n_parameters)
    mix = spec.removeprefix(LLAMA)
    found = [r.bytes for r in rows if r.maker == "llama.cpp" and r.name == mix]
    if not found:
        raise DynqError(f"--solve-at {spec} takes the size of llama.cpp's {mix} mix: add --llama-mix {mix}")
    return found[0]


def _kind(row: BenchRow) -> str:
    return "dynq solver" if row.name.startswith(SOLVED) else row.maker


def pareto_front(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """Rows no other row beats on both size and mean KLD, by size."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (r.bytes, r.kld_mean)):
        if r.kld_mean < best:
            front.append(r)
            best = r.kld_mean
    return front


def markdown_table(rows: Sequence[BenchRow], title: str, settings: str = "") -> str:
    front = {(r.maker, r.name) for r in pareto_front(rows)}
    lines = [f"# {title}", "", *([settings, ""] if settings else [])]
    lines += ["| recipe | by | size (MiB) | bpw | PPL | KLD mean | KLD p99 | top-1 | loops | quantize (s) | Pareto |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r.bytes):
        lines.append(
            f"| {r.name} | {r.maker} | {r.bytes / 2**20:.1f} | {r.bpw:.3f} | {r.ppl:.3f} | {r.kld_mean:.4f} | "
            f"{r.kld_p99:.4f} | {100 * r.top1:.1f}% | {100 * r.loop_rate:.0f}% | {r.quantize_seconds:.0f} | "
            f"{'yes' if (r.maker, r.name) in front else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[BenchRow], path: Path, title: str) -> None:
    # A Figure with its own Agg canvas: no pyplot, so no process-wide backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, marker in (("dynq", "o"), ("llama.cpp", "s"), ("dynq solver", "*")):
        pts = [r for r in rows if _kind(r) == label]
        if pts:
            ax.scatter([r.bytes / 2**20 for r in pts], [r.kld_mean for r in pts], marker=marker, label=label)
    front = pareto_front(rows)
    ax.plot([r.bytes / 2**20 for r in front], [r.kld_mean for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("mean KL divergence to the reference")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    place_labels(ax, [(r.name, r.bytes / 2**20, r.kld_mean) for r in sorted(rows, key=lambda r: r.bytes)])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def place_labels(ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Label each point at the first of a few spots around it that overlaps no marker and no label placed before it."""
    from matplotlib.transforms import Bbox

    spots = (((4, 4), "left", "bottom"), ((4, -4), "left", "top"), ((-4, 4), "right", "bottom"),
             ((-4, -4), "right", "top"))  # fmt: skip
    renderer = ax.figure.canvas.get_renderer()
    centres = [ax.transData.transform((x, y)) for _, x, y in points]
    placed: list[Any] = [Bbox.from_bounds(cx - 4, cy - 4, 8, 8) for cx, cy in centres]
    for name, x, y in points:
        for offset, ha, va in spots:
            text = ax.annotate(name, (x, y), fontsize=7, xytext=offset, textcoords="offset points", ha=ha, va=va)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or (offset, ha, va) == spots[-1]:
                placed.append(box)
                break
            text.remove()


def rows_as_dicts(rows: Sequence[BenchRow]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
