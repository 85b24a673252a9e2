"""A profile, drawn: how much each tensor kind in each block hurts the output at the probe's type (a heatmap of the
predicted KL divergence it adds), and how the error of a few tensors falls with bits per weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dynq.budget.profile_file import Profile
from dynq.core.qtypes import qtype
from dynq.core.tensors import block_of, kind_of
from dynq.recipe.picture import label_grid, save_png


def sensitivity_grid(profile: Profile, at: str) -> tuple[list[str], list[int], np.ndarray]:
    """(kinds, blocks, grid): the predicted KL divergence each block tensor adds at type `at`; NaN where none."""
    costs = {name: t.costs()[at] for name, t in profile.tensors.items() if at in t.errors}
    kinds = sorted({kind_of(n) for n in costs if block_of(n) is not None})
    blocks = sorted({b for n in costs if (b := block_of(n)) is not None})
    grid = np.full((len(kinds), len(blocks)), np.nan)
    row, col = {k: i for i, k in enumerate(kinds)}, {b: j for j, b in enumerate(blocks)}
    for name, cost in costs.items():
        if (b := block_of(name)) is not None:
            grid[row[kind_of(name)], col[b]] = cost
    return kinds, blocks, grid


def plot_profile(profile: Profile, path: str | Path, curves: int = 6) -> Path:
    """Left: the sensitivity heatmap at the probe's type (log scale). Right: relative error against bits per weight
    for the `curves` tensors that cost most at that type, each of another kind where there are enough kinds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    at = profile.method.probe_type
    kinds, blocks, grid = sensitivity_grid(profile, at)
    fig = Figure(figsize=(max(9.0, 0.14 * len(blocks) + 8), max(4.0, 0.3 * len(kinds) + 1.5)))
    FigureCanvasAgg(fig)
    heat, curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    finite = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else None
    image = heat.imshow(grid, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    label_grid(heat, kinds, blocks)
    heat.set_xlabel("block")
    heat.set_title(f"predicted KL divergence each tensor adds at {at}", fontsize=9)
    fig.colorbar(image, ax=heat, label="KLD (nats)")
    ranked = sorted(profile.tensors, key=lambda n: -profile.tensors[n].costs().get(at, 0.0))
    chosen: list[str] = []
    for name in ranked:  # the costliest tensor of each kind first, then the rest
        if kind_of(name) not in {kind_of(c) for c in chosen} and len(chosen) < curves:
            chosen.append(name)
    chosen += [n for n in ranked if n not in chosen][: curves - len(chosen)]
    for name in chosen:
        # the quantized types: a float copy's error (~1e-16 at 16 bits) would squash the curve
        errors = sorted(
            (qtype(t).bpw, e) for t, e in profile.tensors[name].errors.items() if e > 0 and qtype(t).bpw < 9
        )
        curve.plot([b for b, _ in errors], [e for _, e in errors], "o-", ms=3, label=name.removesuffix(".weight"))
    curve.set_yscale("log")
    curve.set_xlabel("bits per weight")
    curve.set_ylabel("relative weighted squared error")
    curve.set_title("error against bits, costliest tensors", fontsize=9)
    curve.legend(fontsize=6)
    fig.suptitle(f"{Path(profile.model.spec).name}: profile", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
