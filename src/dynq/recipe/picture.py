"""Where a plan puts its bits, drawn: bits per weight of every tensor kind in every block, one panel per plan, so
that presets and solved mixes side by side show at a glance where the bytes go (PNG, matplotlib's Agg canvas)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynq.core.atomic import atomic_path
from dynq.recipe.plan import QuantPlan

OUTSIDE = "other"  # the column of tensors outside the blocks (embeddings, output, final norm)


def kinds_and_blocks(plans: Sequence[QuantPlan]) -> tuple[list[str], list[int]]:
    """The 2-D tensor kinds of the blocks (rows) and the block numbers (columns) any of `plans` holds."""
    kinds = sorted({p.info.kind for plan in plans for p in plan.tensors if p.info.block is not None
                    and len(p.info.shape) >= 2})  # fmt: skip
    blocks = sorted({p.info.block for plan in plans for p in plan.tensors if p.info.block is not None})
    return kinds, blocks


def bpw_grid(plan: QuantPlan, kinds: Sequence[str], blocks: Sequence[int]) -> np.ndarray:
    """bits per weight of each (kind, block); NaN where the plan has no such tensor."""
    grid = np.full((len(kinds), len(blocks)), np.nan)
    row, col = {k: i for i, k in enumerate(kinds)}, {b: j for j, b in enumerate(blocks)}
    for p in plan.tensors:
        if p.info.block is not None and p.info.kind in row:
            grid[row[p.info.kind], col[p.info.block]] = p.qtype.bpw
    return grid


def label_grid(ax: Any, kinds: Sequence[str], blocks: Sequence[int]) -> None:
    """A kinds x blocks heatmap's ticks: every kind, at most about 30 block numbers."""
    ax.set_yticks(range(len(kinds)), [k.removesuffix(".weight") for k in kinds], fontsize=7)
    step = max(1, len(blocks) // 30)
    ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)


def save_png(fig: Any, path: str | Path) -> Path:
    """Write `fig` to `path` as PNG, under a temporary name first."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


def plot_plans(plans: Sequence[QuantPlan], path: str | Path, title: str = "") -> Path:
    """One heatmap per plan (rows: tensor kinds, columns: blocks, colour: bits per weight on one shared scale), with
    each plan's name, size and overall bpw above it; written to `path` (temporary name, then renamed)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds, blocks = kinds_and_blocks(plans)
    grids = [bpw_grid(plan, kinds, blocks) for plan in plans]
    # the quantized range on the scale; float tensors kept whole (routers, norms at 16-32 bits) in one grey
    cmap = colormaps["viridis"].with_extremes(over="lightgrey", bad="white")
    fig = Figure(figsize=(max(6.0, 0.14 * len(blocks) + 3), (0.2 * len(kinds) + 0.9) * len(plans) + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plans), 1, squeeze=False)[:, 0]
    image = None
    for ax, plan, grid in zip(axes, plans, grids, strict=True):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=1.5, vmax=8.5, interpolation="nearest")
        label_grid(ax, kinds, blocks)
        ax.set_title(f"{plan.recipe.name}: {plan.total_bytes / 2**30:.2f} GiB, {plan.bpw:.3f} bpw", fontsize=9)
    axes[-1].set_xlabel("block")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="bits per weight (grey: float, kept whole)", extend="max", shrink=0.9)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
