from __future__ import annotations

import itertools
import re
import shlex

import pytest

from dynq.core.tensors import TensorClass
from dynq.core.units import GIB
from dynq.recipe.llama_args import llama_quantize_command
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import load_recipe, preset_names
from dynq.sources.shapes import inventory_names, shape_inventory

# Published sizes of Unsloth's DeepSeek-R1 dynamic files (GiB), field.md §1.
PUBLISHED_R1 = {"dyn-iq1_s": 130.6, "dyn-iq1_m": 158.0, "dyn-iq2_xxs": 183.0, "dyn-q2_k_xl": 212.0}


@pytest.fixture(scope="module")
def r1():  # type: ignore[no-untyped-def]
    return shape_inventory("deepseek-r1")


def test_r1_inventory_matches_the_published_model(r1) -> None:  # type: ignore[no-untyped-def]
    assert len(r1.tensors) == 1025
    assert r1.n_parameters == pytest.approx(671.03e9, rel=1e-4)
    experts = sum(t.n_elements for t in r1.tensors if t.tensor_class is TensorClass.ROUTED_EXPERTS)
    assert experts / r1.n_parameters == pytest.approx(0.9745, abs=0.001)  # routed experts dominate everything
    assert sum(len(t.shape) == 1 or "gate_inp" in t.name for t in r1.tensors) == 361  # the F32 tensors


@pytest.mark.parametrize("recipe", sorted(PUBLISHED_R1))
def test_r1_dyn_presets_within_3_percent_of_published(r1, recipe: str) -> None:  # type: ignore[no-untyped-def]
    plan = resolve(load_recipe(recipe), r1)
    gib = plan.total_bytes / GIB
    assert abs(gib - PUBLISHED_R1[recipe]) / PUBLISHED_R1[recipe] < 0.03, gib
    assert not plan.warnings


def test_r1_q2_k_xl_census_matches_the_published_file(r1) -> None:  # type: ignore[no-untyped-def]
    # llama.cpp's load log of DeepSeek-R1-UD-Q2_K_XL: f32 361, q2_K 171, q3_K 3, q4_K 306, q6_K 184
    plan = resolve(load_recipe("dyn-q2_k_xl"), r1)
    assert plan.census == {"F32": 361, "Q4_K": 306, "Q6_K": 184, "Q2_K": 171, "Q3_K": 3}


def test_r1_iq1_s_experts(r1) -> None:  # type: ignore[no-untyped-def]
    plan = resolve(load_recipe("dyn-iq1_s"), r1)
    t = {p.info.name: p.qtype.name for p in plan.tensors}
    assert [t[f"blk.{i}.ffn_down_exps.weight"] for i in (3, 8, 9, 60)] == [
        "IQ2_XXS",
        "IQ2_XXS",
        "IQ1_S",
        "IQ1_S",
    ]
    assert t["blk.3.ffn_gate_inp.weight"] == "F32"
    assert t["blk.0.ffn_down.weight"] == "Q6_K"
    assert t["blk.10.ffn_up_shexp.weight"] == "Q6_K"
    assert (t["token_embd.weight"], t["output.weight"]) == ("Q4_K", "Q6_K")
    assert plan.census["IQ1_S"] == 168 and plan.census["IQ2_XXS"] == 6
    assert plan.by_class()[TensorClass.ROUTED_EXPERTS].bpw == pytest.approx(1.58, abs=0.01)


@pytest.mark.parametrize("inventory", inventory_names())
def test_every_preset_plans_on_every_inventory(inventory: str) -> None:
    inv = shape_inventory(inventory)
    sizes = {}
    for name in preset_names():
        plan = resolve(load_recipe(name), inv)
        assert len(plan.tensors) == len(inv.tensors)
        assert all(p.qtype.fits(p.info.row_length) for p in plan.tensors)
        sizes[name] = plan.total_bytes
    # the dynamic presets are ordered by size, and each is larger than the uniform type of its experts
    assert sizes["dyn-iq1_s"] < sizes["dyn-iq1_m"] < sizes["dyn-iq2_xxs"] < sizes["dyn-q2_k_xl"]
    assert sizes["uniform-iq1_s"] < sizes["dyn-iq1_s"]
    assert sizes["uniform-q2_k"] < sizes["dyn-q2_k_xl"] < sizes["q8_0"] < sizes["f16"] == sizes["bf16"]


def simulate_llama_quantize(command: str, plan: QuantPlan) -> dict[str, str]:
    """Which type llama-quantize would give each tensor under `command` (first --tensor-type match wins)."""
    args = shlex.split(command)
    overrides, embd, out = [], None, None
    for flag, value in itertools.pairwise(args):
        if flag == "--tensor-type":
            pattern, typ = value.rsplit("=", 1)
            overrides.append((re.compile(pattern), typ))
        elif flag == "--token-embedding-type":
            embd = value
        elif flag == "--output-tensor-type":
            out = value
    types = {}
    for t in plan.tensors:
        if t.kept:
            continue
        name = t.info.name
        if name == "token_embd.weight":
            types[name] = embd
        elif name == "output.weight":
            types[name] = out
        else:
            types[name] = next((typ for p, typ in overrides if p.search(name)), args[-1].lower())
    return types


@pytest.mark.parametrize("recipe", ["dyn-iq1_s", "dyn-iq2_xxs", "dyn-q2_k_xl", "uniform-iq2_xxs"])
def test_llama_args_reproduce_the_plan(r1, recipe: str) -> None:  # type: ignore[no-untyped-def]
    plan = resolve(load_recipe(recipe), r1)
    command = llama_quantize_command(plan, "R1-BF16.gguf", imatrix="r1.imatrix")
    assert command.startswith("llama-quantize --imatrix r1.imatrix ")
    simulated = simulate_llama_quantize(command, plan)
    assert simulated == {t.info.name: t.qtype.name.lower() for t in plan.tensors if not t.kept}
    assert len(command) < 6000  # grouped by block, not one option per tensor
