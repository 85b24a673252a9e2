"""The size-budget solver against brute force, and its recipe against the plan it was made from."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dynq.core.qtypes import QType, qtype, quantizable_qtypes
from dynq.core.tensors import ModelInventory, TensorInfo
from dynq.errors import DynqError
from dynq.recipe.plan import QuantPlan, ReasonKind, resolve
from dynq.recipe.rules import recipe_from_dict
from dynq.recipe.solve import Option, Solution, Unit, solve, solve_exact
from dynq.recipe.solved_recipe import (
    Costs,
    compact_blocks,
    recipe_yaml,
    solution_recipe,
    solve_plan,
    units_from_plan,
)
from dynq.sources.shapes import shape_inventory

TYPES = quantizable_qtypes()
EPS = 1e-9
GATE_UP = re.compile(r"ffn_(gate|up)_exps")
LADDER = [qtype(n) for n in ("IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]


# --- brute force on small random instances ---


def brute_force(units: Sequence[Unit], budget: int) -> float | None:
    """The optimal cost by trying every combination, None when nothing fits."""
    best = None
    for combo in itertools.product(*(u.options for u in units)):
        if sum(o.nbytes for o in combo) <= budget:
            cost = math.fsum(o.cost for o in combo)
            best = cost if best is None else min(best, cost)
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[Unit], int]:
    costs = st.one_of(st.integers(0, 12).map(float), st.floats(0.0, 10.0, allow_nan=False))
    units = []
    for u in range(draw(st.integers(2, 6))):
        n = draw(st.integers(2, 5))
        opts = tuple(Option(TYPES[i], draw(st.integers(0, 60)), draw(costs)) for i in range(n))
        units.append(Unit((f"blk.{u}.w",), opts))
    lo = sum(min(o.nbytes for o in u.options) for u in units)
    hi = sum(max(o.nbytes for o in u.options) for u in units)
    tight = draw(st.sampled_from([lo, lo + 1, hi - 1, hi]))
    return units, max(lo, draw(st.one_of(st.just(tight), st.integers(lo, hi + 10))))


def check_consistent(units: Sequence[Unit], budget: int, s: Solution) -> None:
    """The choice names every tensor once, and its bytes and cost are those of the chosen options."""
    chosen = [next(o for o in u.options if o.qtype is s.choice[u.names[0]]) for u in units]
    assert sorted(s.choice) == sorted(n for u in units for n in u.names)
    assert s.nbytes == sum(o.nbytes for o in chosen) <= budget
    assert s.cost == pytest.approx(math.fsum(o.cost for o in chosen), abs=EPS)


@settings(max_examples=400, deadline=None)
@given(instances())
def test_solve_exact_is_the_brute_force_optimum(case: tuple[list[Unit], int]) -> None:
    units, budget = case
    s = solve_exact(units, budget)
    check_consistent(units, budget, s)
    assert s.exact and s.cost == pytest.approx(brute_force(units, budget), abs=EPS)


@settings(max_examples=400, deadline=None)
@given(instances())
def test_solve_is_optimal_on_small_instances(case: tuple[list[Unit], int]) -> None:
    units, budget = case
    s = solve(units, budget)
    check_consistent(units, budget, s)
    assert s.exact and s.cost == pytest.approx(brute_force(units, budget), abs=EPS)


@settings(max_examples=400, deadline=None)
@given(instances())
def test_heuristic_alone_is_bracketed_by_its_bound(case: tuple[list[Unit], int]) -> None:
    """Without the exact programme: never above budget, optimum within [lower bound, cost], no upgrade left out."""
    units, budget = case
    s = solve(units, budget, dp_work=0)
    check_consistent(units, budget, s)
    best = brute_force(units, budget)
    assert best is not None
    assert s.lower_bound <= best + EPS <= s.cost + 2 * EPS
    if s.exact:
        assert s.cost == pytest.approx(best, abs=EPS)
    left = budget - s.nbytes
    for u in units:
        now = next(o for o in u.options if o.qtype is s.choice[u.names[0]])
        assert not any(o.cost < now.cost - EPS and o.nbytes - now.nbytes <= left for o in u.options)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.floats(0.0, 1.0))
def test_thinned_search_is_bracketed_by_the_exact_optimum(seed: int, fraction: float) -> None:
    """With a tiny work allowance the programme keeps only its most promising states: still within budget, never
    better than the optimum, and `exact` only when it is the optimum."""
    units = synthetic(25, 6, seed)
    lo = sum(min(o.nbytes for o in u.options) for u in units)
    hi = sum(max(o.nbytes for o in u.options) for u in units)
    budget = int(lo + fraction * (hi - lo))
    best = solve_exact(units, budget)
    s = solve(units, budget, dp_work=1)
    check_consistent(units, budget, s)
    assert s.lower_bound <= best.cost * (1 + EPS) + EPS and s.cost >= best.cost * (1 - EPS) - EPS
    if s.exact:
        assert s.cost == pytest.approx(best.cost, rel=EPS, abs=EPS)


def synthetic(n_units: int, n_options: int, seed: int) -> list[Unit]:
    """Tensors of random size and sensitivity; damage falls as 2^(-2 bpw), with noise."""
    rng = random.Random(seed)
    units = []
    for u in range(n_units):
        size, sensitivity = rng.randint(10**6, 5 * 10**7), rng.lognormvariate(0, 1)
        opts = []
        for t in TYPES[:n_options]:
            bpw = rng.uniform(1.5, 8.5)
            opts.append(Option(t, int(size * bpw / 8), sensitivity * 2 ** (-2 * bpw) * rng.uniform(0.8, 1.2)))
        units.append(Unit((f"t{u}",), tuple(opts)))
    return units


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7])
def test_large_instance_spends_the_budget_with_a_tiny_proven_gap(fraction: float) -> None:
    units = synthetic(300, 12, seed=7)
    lo = sum(min(o.nbytes for o in u.options) for u in units)
    hi = sum(max(o.nbytes for o in u.options) for u in units)
    budget = int(lo + fraction * (hi - lo))
    s = solve(units, budget)
    check_consistent(units, budget, s)
    assert 0.99 * budget <= s.nbytes <= budget
    assert s.lower_bound <= s.cost and s.gap <= 1e-3 * s.cost


def test_budget_below_the_minimum_names_it() -> None:
    units = [
        Unit(("a",), (Option(TYPES[0], 300, 1.0), Option(TYPES[1], 500, 0.5))),
        Unit(("b",), (Option(TYPES[0], 156, 0.0),)),
    ]
    with pytest.raises(DynqError, match=r"^target 123 B is below the smallest reachable size 456 B \(0\.00 MiB\)"):
        solve(units, 123)
    with pytest.raises(DynqError, match="456 B"):
        solve_exact(units, 455)
    assert solve(units, 456).nbytes == 456


def test_a_unit_without_options_is_named() -> None:
    with pytest.raises(DynqError, match=r"blk\.7\.attn_q\.weight"):
        solve([Unit(("blk.7.attn_q.weight",), ())], 10**9)


def test_a_tensor_in_two_units_is_refused() -> None:
    unit = Unit(("x",), (Option(TYPES[0], 1, 1.0),))
    with pytest.raises(DynqError, match="more than one"):
        solve([unit, unit], 10)


def test_no_units_is_an_empty_solution() -> None:
    assert solve([], 0) == Solution({}, 0, 0.0, 0.0, True)


def test_compact_blocks() -> None:
    assert compact_blocks([9, 0, 1, 2, 3, 7, 10, 11, 12]) == "0-3,7,9-12"
    assert compact_blocks([5]) == "5"
    assert compact_blocks([4, 5]) == "4-5"


# --- candidates from a plan ---


def small_model() -> ModelInventory:
    """Two MoE blocks; attn_q has rows of 576 (no 256-block type fits) and a norm whose name extends it."""
    bf16 = qtype("BF16")
    tensors = [TensorInfo("token_embd.weight", (512, 1000), bf16)]
    for b in range(2):
        tensors += [
            TensorInfo(f"blk.{b}.attn_norm.weight", (512,), bf16),
            TensorInfo(f"blk.{b}.attn_q.weight", (576, 512), bf16),
            TensorInfo(f"blk.{b}.attn_q_norm.weight", (64, 2), bf16),  # 2-D, kept by the keep-list ("norm")
            TensorInfo(f"blk.{b}.ffn_gate_inp.weight", (512, 4), bf16),
            TensorInfo(f"blk.{b}.ffn_gate_exps.weight", (512, 256, 4), bf16),
            TensorInfo(f"blk.{b}.ffn_up_exps.weight", (512, 256, 4), bf16),
            TensorInfo(f"blk.{b}.ffn_down_exps.weight", (256, 512, 4), bf16),
        ]
    tensors += [TensorInfo("output_norm.weight", (512,), bf16), TensorInfo("output.weight", (512, 1000), bf16)]
    return ModelInventory("test:small", "qwen3moe", tuple(tensors))


def base_plan(inventory: ModelInventory) -> QuantPlan:
    return resolve(recipe_from_dict({"name": "base", "default": "Q8_0"}, "test"), inventory)


def random_costs(plan: QuantPlan, types: Sequence[QType], seed: int) -> dict[str, dict[str, float]]:
    """Damage that falls with bits per weight, scaled by size and a random sensitivity per tensor."""
    rng = random.Random(seed)
    costs: dict[str, dict[str, float]] = {}
    for t in plan.tensors:
        sensitivity = rng.lognormvariate(0, 1) * t.info.n_elements / 1e6
        costs[t.info.name] = {q.name: sensitivity * 2 ** (-2 * q.bpw) * rng.uniform(0.9, 1.1) for q in types}
    return costs


def between(plan: QuantPlan, costs: Costs, fraction: float, *, has_imatrix: bool = True, **kw: Any) -> int:
    """A target `fraction` of the way from the smallest reachable file to the largest."""
    units, fixed = units_from_plan(plan, costs, LADDER, has_imatrix=has_imatrix, **kw)
    base = sum(fixed[t.info.name].nbytes(t.info.shape) for t in plan.tensors if t.info.name in fixed)
    lo = base + sum(min(o.nbytes for o in u.options) for u in units)
    hi = base + sum(max(o.nbytes for o in u.options) for u in units)
    return int(lo + fraction * (hi - lo))


def options_of(units: Sequence[Unit], name: str) -> set[str]:
    unit = next(u for u in units if name in u.names)
    return {o.qtype.name for o in unit.options}


def test_candidates_respect_row_length_keep_and_costs() -> None:
    plan = base_plan(small_model())
    costs = random_costs(plan, LADDER, seed=1)
    del costs["blk.1.ffn_down_exps.weight"]["Q6_K"]  # a missing cost: that type is not a candidate
    units, fixed = units_from_plan(plan, costs, LADDER, has_imatrix=True)
    assert options_of(units, "blk.0.attn_q.weight") == {"Q8_0"}  # 576 % 256 != 0 and no silent fallback
    assert options_of(units, "blk.0.ffn_down_exps.weight") == {t.name for t in LADDER}
    assert "Q6_K" not in options_of(units, "blk.1.ffn_down_exps.weight")
    assert {n for n, t in fixed.items() if t.name == "F32"} == {t.info.name for t in plan.tensors if t.kept}
    assert "blk.0.attn_q_norm.weight" in fixed
    with pytest.raises(DynqError, match=r"tensor blk\.0\.attn_q\.weight: no candidate type .*row 576 % 256"):
        units_from_plan(plan, costs, [qtype("Q4_K")], has_imatrix=True)


def test_without_an_imatrix_only_embeddings_and_output_may_take_iq_types() -> None:
    plan = base_plan(small_model())
    costs = random_costs(plan, LADDER, seed=2)
    units, _ = units_from_plan(plan, costs, LADDER, has_imatrix=False)
    assert "IQ1_S" not in options_of(units, "blk.0.ffn_down_exps.weight")
    assert "IQ2_XXS" not in options_of(units, "blk.0.ffn_down_exps.weight")
    assert {"IQ1_S", "IQ2_XXS"} <= options_of(units, "token_embd.weight")
    assert {"IQ1_S", "IQ2_XXS"} <= options_of(units, "output.weight")
    solved, _ = solve_plan(plan, costs, LADDER, between(plan, costs, 0.3, has_imatrix=False), has_imatrix=False)
    assert not solved.needing_imatrix()


def test_ties_share_one_type_and_sum_their_options() -> None:
    plan = base_plan(small_model())
    costs = random_costs(plan, LADDER, seed=3)
    units, _ = units_from_plan(plan, costs, LADDER, has_imatrix=True, ties=[GATE_UP])
    tied = [u for u in units if len(u.names) > 1]
    assert [u.names for u in tied] == [
        ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"),
        ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"),
    ]
    q4 = next(o for o in tied[0].options if o.qtype.name == "Q4_K")
    assert q4.nbytes == 2 * qtype("Q4_K").nbytes((512, 256, 4))
    names = tied[0].names
    assert q4.cost == pytest.approx(costs[names[0]]["Q4_K"] + costs[names[1]]["Q4_K"])
    for target in (between(plan, costs, f / 10, ties=[GATE_UP]) for f in range(11)):
        solved, _ = solve_plan(plan, costs, LADDER, target, has_imatrix=True, ties=[GATE_UP])
        types = {t.info.name: t.qtype for t in solved.tensors}
        assert all(types[f"blk.{b}.ffn_gate_exps.weight"] is types[f"blk.{b}.ffn_up_exps.weight"] for b in (0, 1))
        assert solved.total_bytes <= target


def test_pins_stay_and_count_against_the_target() -> None:
    plan = base_plan(small_model())
    costs = random_costs(plan, LADDER, seed=4)
    pinned = {"output.weight": qtype("Q6_K"), "blk.1.ffn_up_exps.weight": qtype("Q5_K")}
    units, fixed = units_from_plan(plan, costs, LADDER, has_imatrix=True, pinned=pinned, ties=[GATE_UP])
    assert fixed["output.weight"].name == "Q6_K"
    assert fixed["blk.1.ffn_gate_exps.weight"].name == "Q5_K"  # pinned through its tie
    assert not any({"output.weight", "blk.1.ffn_up_exps.weight"} & set(u.names) for u in units)
    target = between(plan, costs, 0.4, pinned=pinned, ties=[GATE_UP])
    solved, solution = solve_plan(plan, costs, LADDER, target, has_imatrix=True, pinned=pinned, ties=[GATE_UP])
    types = {t.info.name: t.qtype.name for t in solved.tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.1.ffn_gate_exps.weight"] == "Q5_K"
    assert solved.total_bytes <= target
    pinned_bytes = sum(t.nbytes for t in solved.tensors if t.kept or t.info.name in fixed)
    assert solution.nbytes == solved.total_bytes - pinned_bytes
    with pytest.raises(DynqError, match=r"pinned type Q4_K does not divide its row length 576"):
        units_from_plan(plan, costs, LADDER, has_imatrix=True, pinned={"blk.0.attn_q.weight": qtype("Q4_K")})


def test_a_target_below_the_minimum_names_the_whole_file_size() -> None:
    plan = base_plan(small_model())
    costs = random_costs(plan, LADDER, seed=5)
    units, fixed = units_from_plan(plan, costs, LADDER, has_imatrix=True)
    minimum = sum(fixed[t.info.name].nbytes(t.info.shape) for t in plan.tensors if t.info.name in fixed)
    minimum += sum(min(o.nbytes for o in u.options) for u in units)
    with pytest.raises(DynqError, match=rf"^target 1000 B is below the smallest reachable size {minimum} B \("):
        solve_plan(plan, costs, LADDER, 1000, has_imatrix=True)
    solved, _ = solve_plan(plan, costs, LADDER, minimum, has_imatrix=True)
    assert solved.total_bytes == minimum


# --- the written recipe ---


def reread(plan: QuantPlan) -> QuantPlan:
    """The plan's recipe through YAML text and back, resolved again."""
    inventory = ModelInventory(plan.source, plan.arch, tuple(t.info for t in plan.tensors))
    return resolve(recipe_from_dict(yaml.safe_load(recipe_yaml(plan.recipe)), "yaml"), inventory)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fraction", [0.2, 0.45])
def test_mixtral_recipe_reproduces_the_choice(seed: int, fraction: float) -> None:
    inventory = shape_inventory("shapes:mixtral-8x7b")
    plan = resolve(recipe_from_dict({"name": "base", "default": "Q8_0"}, "test"), inventory)
    costs = random_costs(plan, LADDER, seed)
    target = int(fraction * plan.total_bytes)
    solved, solution = solve_plan(plan, costs, LADDER, target, has_imatrix=True, ties=[GATE_UP])
    assert 0.99 * target <= solved.total_bytes <= target
    assert solution.lower_bound <= solution.cost and solution.gap <= 1e-3 * solution.cost
    again = reread(solved)
    assert [(t.info.name, t.qtype, t.kept) for t in again.tensors] == [
        (t.info.name, t.qtype, t.kept) for t in solved.tensors
    ]
    assert not again.warnings
    assert all(t.reason.kind is (ReasonKind.KEEP if t.kept else ReasonKind.RULE) for t in again.tensors)
    assert all(solution.choice[t.info.name] is t.qtype for t in solved.tensors if not t.kept)


def test_every_rule_matches_exactly_its_own_tensors() -> None:
    """Anchored rules: attn_q's rule must not reach attn_q_norm (or any other name that extends it)."""
    plan = base_plan(small_model())
    choice = {t.info.name: qtype("Q8_0") for t in plan.tensors if not t.kept}
    choice["blk.1.attn_q.weight"] = qtype("Q5_0")
    choice["blk.0.ffn_down_exps.weight"] = qtype("Q2_K")
    costs = random_costs(plan, [qtype("Q8_0"), qtype("Q5_0"), qtype("Q2_K")], seed=6)
    recipe = solution_recipe(plan, choice, costs, name="t", description="d")
    covered: list[str] = []
    for rule in recipe.rules:
        assert rule.blocks is None or rule.blocks.first == rule.blocks.last == 0
        selected = rule.blocks.absolute if rule.blocks else None
        hits = [
            t.info.name
            for t in plan.tensors
            if rule.pattern.search(t.info.name) and (selected is None or t.info.block in selected)
        ]
        assert hits and all(n in choice and choice[n] is rule.qtype for n in hits), (rule.label, hits)
        assert re.fullmatch(r"predicted cost [0-9.e+-]+, [0-9.]+ (MiB|KiB)", rule.note), rule.note
        covered += hits
    assert sorted(covered) == sorted(choice)  # every chosen tensor by exactly one rule, no kept tensor by any
    by_name = {t.info.name: t for t in resolve(recipe, small_model()).tensors}
    assert all(by_name[n].qtype is t for n, t in choice.items())
    assert by_name["blk.0.attn_q_norm.weight"].kept
    data = yaml.safe_load(recipe_yaml(recipe))
    assert data["default_keep"] is False and data["rules"][0]["match"] == r"^token_embd\.weight$"
    assert {r["match"] for r in data["rules"]} >= {r"^blk\.\d+\.attn_q\.weight$"}
    assert {r["blocks"] for r in data["rules"] if r["match"] == r"^blk\.\d+\.attn_q\.weight$"} == {"0", "1"}


def test_a_choice_missing_a_tensor_is_refused() -> None:
    plan = base_plan(small_model())
    with pytest.raises(DynqError, match=r"no type for tensor token_embd\.weight"):
        solution_recipe(plan, {}, {})


def test_bad_inputs_are_one_line_errors() -> None:
    plan = base_plan(small_model())
    costs = random_costs(plan, LADDER, seed=7)
    with pytest.raises(DynqError, match="type Q8_K is not a target"):
        units_from_plan(plan, costs, [qtype("Q8_K")], has_imatrix=True)
    pins = {"blk.0.ffn_gate_exps.weight": qtype("Q4_K"), "blk.0.ffn_up_exps.weight": qtype("Q5_K")}
    with pytest.raises(DynqError, match="tied but pinned to different types"):
        units_from_plan(plan, costs, LADDER, has_imatrix=True, pinned=pins, ties=[GATE_UP])
    with pytest.raises(DynqError, match=r"blk\.0\.attn_norm\.weight is kept F32 .* cannot be pinned to Q8_0"):
        units_from_plan(plan, costs, LADDER, has_imatrix=True, pinned={"blk.0.attn_norm.weight": qtype("Q8_0")})
    choice = {t.info.name: t.qtype for t in plan.tensors if not t.kept} | {"output_norm.weight": qtype("Q8_0")}
    with pytest.raises(DynqError, match=r"output_norm\.weight is kept F32 by the keep-list; it cannot be Q8_0"):
        solution_recipe(plan, choice, costs)
