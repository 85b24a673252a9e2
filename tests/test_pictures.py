"""The pictures the commands draw: the numbers under each are the plan's and the profile's own (checked cell by
cell), and the PNG is written whole by the command that computes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import dynq
from dynq.budget.picture import sensitivity_grid
from dynq.cli import app
from dynq.recipe.picture import bpw_grid, kinds_and_blocks

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_plans_grid_is_its_bits_per_weight() -> None:
    plans = [dynq.plan("shapes:deepseek-r1", r) for r in ("dyn-iq1_s", "dyn-q2_k_xl")]
    kinds, blocks = kinds_and_blocks(plans)
    assert "ffn_down_exps.weight" in kinds and blocks == list(range(61))
    grid = bpw_grid(plans[0], kinds, blocks)
    by_name = {p.info.name: p.qtype.bpw for p in plans[0].tensors}
    assert grid[kinds.index("ffn_down_exps.weight"), 3] == by_name["blk.3.ffn_down_exps.weight"]
    assert np.isnan(grid[kinds.index("ffn_down_exps.weight"), 0])  # a dense block has no experts
    assert grid[kinds.index("attn_output.weight"), 60] == by_name["blk.60.attn_output.weight"]


def test_compare_and_plan_draw_their_pictures(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["compare", "shapes:deepseek-r1", "-r", "dyn-iq1_s", "-r", "uniform-iq1_s"],
                 ["plan", "shapes:deepseek-r1", "-r", "dyn-iq1_s", "--no-tensors"]):  # fmt: skip
        png = tmp_path / f"{args[0]}.png"
        ran = runner.invoke(app, [*args, "--plot", str(png)])
        assert ran.exit_code == 0, ran.output
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written under a temporary name


def test_a_profiles_picture(made: dict[str, Path], tmp_path: Path) -> None:
    profile = dynq.Profile.load(made["profile"])
    kinds, blocks, grid = sensitivity_grid(profile, profile.method.probe_type)
    name = "blk.1.ffn_down.weight"
    assert grid[kinds.index("ffn_down.weight"), blocks.index(1)] == profile.tensors[name].costs()["Q2_K"]
    png = dynq.plot_profile(profile, tmp_path / "profile.png")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000
