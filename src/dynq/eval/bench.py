"""A bench's rows (one quant of one model judged against the reference: size, bpw, PPL, KLD mean and tail, top-1,
loop rate, time), its markdown table and its plot of KLD (mean and tail) against size with the Pareto front. The
workflow that measures them is benchmark.py's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynq.core.jsonfile import read_json
from dynq.core.records import RecordFormat
from dynq.errors import DynqError

SOLVED = "solved@"  # the name of a solver row


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
    # the tail (rows written before these were measured read as NaN, shown as "-")
    kld_p999: float = float("nan")
    kld_max: float = float("nan")
    kld_over_1: float = float("nan")  # share of tokens above 1 nat


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


def shown(x: float, fmt: str, unit: str = "") -> str:
    """A measured number; "-" for one not measured (NaN)."""
    return "-" if x != x else format(x, fmt) + unit


def markdown_table(rows: Sequence[BenchRow], title: str, settings: str = "") -> str:
    front = {(r.maker, r.name) for r in pareto_front(rows)}
    lines = [f"# {title}", "", *([settings, ""] if settings else [])]
    header = ["recipe", "by", "size (MiB)", "bpw", "PPL", "KLD mean", "KLD p99", "KLD p99.9", "KLD max", "> 1 nat",
              "top-1", "loops", "quantize (s)", "Pareto"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: r.bytes):
        lines.append(
            f"| {r.name} | {r.maker} | {r.bytes / 2**20:.1f} | {r.bpw:.3f} | {r.ppl:.3f} | {r.kld_mean:.4f} | "
            f"{r.kld_p99:.4f} | {shown(r.kld_p999, '.3f')} | {shown(r.kld_max, '.2f')} | "
            f"{shown(100 * r.kld_over_1, '.2f', '%')} | {100 * r.top1:.1f}% | {100 * r.loop_rate:.0f}% | "
            f"{r.quantize_seconds:.0f} | {'yes' if (r.maker, r.name) in front else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[BenchRow], path: Path, title: str) -> None:
    """KLD mean against size with the Pareto front (left) and the tail, p99.9 of the per-token KLD (right)."""
    # A Figure with its own Agg canvas: no pyplot, so no process-wide backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tail = [r for r in rows if r.kld_p999 == r.kld_p999]
    fig = Figure(figsize=(13 if tail else 8, 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if tail else 1, squeeze=False)[0]
    panels = [(axes[0], rows, "kld_mean", "mean KL divergence to the reference")]
    if tail:
        panels.append((axes[1], tail, "kld_p999", "p99.9 of the per-token KL divergence"))
    for ax, shown_rows, key, label in panels:
        for kind, marker in (("dynq", "o"), ("llama.cpp", "s"), ("dynq solver", "*")):
            pts = [r for r in shown_rows if _kind(r) == kind]
            if pts:
                ax.scatter([r.bytes / 2**20 for r in pts], [getattr(r, key) for r in pts], marker=marker, label=kind)
        if key == "kld_mean":
            front = pareto_front(rows)
            ax.plot([r.bytes / 2**20 for r in front], [r.kld_mean for r in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend()
        by_size = sorted(shown_rows, key=lambda r: r.bytes)
        place_labels(ax, [(r.name, r.bytes / 2**20, getattr(r, key)) for r in by_size])
    fig.suptitle(title)
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


# Each row carries its version (the file stays a plain list of rows); a row from before version 1 has none.
BENCH_REMEDY = "pass the .json file `dynq bench` wrote"
ROW_FORMAT = RecordFormat(BenchRow, "dynq bench row", 1, BENCH_REMEDY, unversioned=1)
# A bench file holds a few dozen rows (a few KiB); one of many MiB is not one.
MAX_BENCH_BYTES = 16 << 20


def rows_as_dicts(rows: Sequence[BenchRow]) -> list[dict[str, object]]:
    return [ROW_FORMAT.to_record(r) for r in rows]


def read_bench(path: str | os.PathLike[str]) -> list[BenchRow]:
    """The rows of a `dynq bench` JSON file (bench/results/NAME.json)."""
    raw = read_json(path, "dynq bench results", BENCH_REMEDY, MAX_BENCH_BYTES)
    if not isinstance(raw, list):
        raise DynqError(f"{path}: not dynq bench results (expected a list of rows with name, maker, bytes, ...)")
    return [ROW_FORMAT.from_record(r, f"{path}, row {i + 1}") for i, r in enumerate(raw)]
