"""The refinement search against measured KLD: it measures the unrefined mix first, keeps only what measures better,
never measures one mix twice, stops when a round finds nothing or the time is up; and on a tiny real model the
refined recipe is written, plans to the budget and never measures worse than the solver's own mix."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dynq
from dynq.calib.text import read_texts
from dynq.cli import app
from dynq.core.qtypes import QType, qtype
from dynq.recipe.refine import refine, scaled_costs
from test_solve_cli import sizes
from tiny_solve import TYPES

Q2, Q4, Q8 = qtype("Q2_K"), qtype("Q4_K"), qtype("Q8_0")
runner = CliRunner()


def _toy(true_best: Mapping[str, float]) -> tuple[object, object, list[dict[str, QType]]]:
    """A 'solver' that gives the kind with the largest weight Q8_0 and the others Q2_K, and a 'measure' whose
    KLD is lowest when that kind is the one `true_best` favours."""
    measured: list[dict[str, QType]] = []

    def solve(weights: Mapping[str, float]) -> dict[str, QType]:
        top = max(sorted(weights), key=lambda k: weights[k])
        return {k: Q8 if k == top else Q2 for k in sorted(weights)}

    def measure(choice: Mapping[str, QType]) -> float:
        measured.append(dict(choice))
        return sum(true_best[k] * (0.1 if t is Q8 else 1.0) for k, t in choice.items())

    return solve, measure, measured


def test_search_finds_the_better_mix_and_stops() -> None:
    solve, measure, measured = _toy({"attn": 1.0, "ffn": 5.0})
    result = refine(["attn", "ffn"], solve, measure, seconds=1e9)  # type: ignore[arg-type]
    assert result.first == pytest.approx(1.0 * 0.1 + 5.0)  # the unrefined mix: attn (first of equal weights) Q8_0
    assert result.best == pytest.approx(1.0 + 5.0 * 0.1)
    assert result.choice == {"attn": Q2, "ffn": Q8} and result.weights["ffn"] > result.weights["attn"]
    assert len(measured) == len({tuple(sorted((k, t.name) for k, t in m.items())) for m in measured})  # none twice
    assert sum(t.accepted for t in result.trials) == 2  # the start and the one improvement


def test_nothing_better_keeps_the_solution() -> None:
    solve, measure, _ = _toy({"attn": 5.0, "ffn": 1.0})
    result = refine(["attn", "ffn"], solve, measure, seconds=1e9)  # type: ignore[arg-type]
    assert result.best == result.first and result.choice == {"attn": Q8, "ffn": Q2}


def test_time_budget_stops_new_measurements() -> None:
    ticks = iter(range(1000))
    solve, measure, measured = _toy({"attn": 1.0, "ffn": 5.0})
    result = refine(["attn", "ffn"], solve, measure, seconds=0, clock=lambda: float(next(ticks)))  # type: ignore[arg-type]
    assert len(measured) == 1 and result.best == result.first  # only the unrefined mix


def test_scaled_costs() -> None:
    costs = {"blk.0.attn_q.weight": {"Q2_K": 1.0}, "output.weight": {"Q2_K": 2.0}}
    kinds = {"blk.0.attn_q.weight": "attn_q.weight", "output.weight": "output.weight"}
    scaled = scaled_costs(costs, kinds.__getitem__, {"attn_q.weight": 3.0})
    assert scaled == {"blk.0.attn_q.weight": {"Q2_K": 3.0}, "output.weight": {"Q2_K": 2.0}}


def test_solve_refine_on_a_tiny_model(made: dict[str, Path]) -> None:
    low, high = sizes(made)
    target = (low + high) // 2
    recipe = made["dir"] / "refined.yaml"
    args = ["solve", str(made["tiny"]), "--profile", str(made["profile"]), "--target", str(target), "-o", str(recipe),
            *[a for t in TYPES for a in ("--type", t)], "--text", str(made["text"])]  # fmt: skip
    ran = runner.invoke(app, [*args, "--imatrix", str(made["imatrix"]), "--refine", "8", "--refine-chunks", "1"])
    assert ran.exit_code == 0, ran.output
    assert "refined in" in ran.output and "->" in ran.output
    assert 0.99 * target <= dynq.plan(made["tiny"], str(recipe)).total_bytes <= target
    result = dynq.refine(made["tiny"], made["profile"], target, imatrix=made["imatrix"],
                         text=read_texts([made["text"]]), seconds=5, chunks=1,
                         types=TYPES)  # fmt: skip
    assert result.search.best <= result.search.first and result.search.trials[0].accepted
    assert result.solved.plan.total_bytes <= target
    # the recipe states the profile's own predictions, not the reweighted costs the search solved with
    assert f"predicted cost {result.solved.predicted_kld:.4g}" in result.solved.recipe.description
