from __future__ import annotations

import json
import logging
import re
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynq.core.qtypes import qtype
from dynq.core.tensors import F8_E4M3, ModelInventory, TensorInfo, source_dtype
from dynq.errors import DynqError
from dynq.recipe import rules
from dynq.recipe.plan import ReasonKind, resolve
from dynq.recipe.presets import load_recipe
from dynq.recipe.rules import RECIPE_VERSION, BlockSpec, recipe_from_dict
from dynq.sources.shapes import DeepSeek2Config, deepseek2_tensors, shape_inventory

TINY_R1 = DeepSeek2Config(
    n_layer=6, n_embd=256, n_ff=512, n_ff_exp=256, n_expert=4, n_expert_used=2, n_expert_shared=1, n_dense_lead=2,
    n_vocab=512, n_head=2, q_lora_rank=256, kv_lora_rank=256, qk_nope=64, qk_rope=32, v_head=64,
    context_length=1024,
)  # fmt: skip


def tiny_moe() -> ModelInventory:
    tensors, meta = deepseek2_tensors(TINY_R1)
    return ModelInventory("tiny-moe", "deepseek2", tuple(tensors), meta)


def dense(n_blocks: int = 4, n_embd: int = 256) -> ModelInventory:
    bf16 = qtype("BF16")
    tensors = [TensorInfo("token_embd.weight", (n_embd, 1000), bf16)]
    for i in range(n_blocks):
        tensors += [
            TensorInfo(f"blk.{i}.attn_norm.weight", (n_embd,), qtype("F32")),
            TensorInfo(f"blk.{i}.attn_q.weight", (n_embd, n_embd), bf16),
            TensorInfo(f"blk.{i}.ffn_gate.weight", (n_embd, 4 * n_embd), bf16),
            TensorInfo(f"blk.{i}.ffn_up.weight", (n_embd, 4 * n_embd), bf16),
            TensorInfo(f"blk.{i}.ffn_down.weight", (4 * n_embd, n_embd), bf16),
        ]
    tensors.append(TensorInfo("output.weight", (n_embd, 1000), bf16))
    return ModelInventory("dense", "llama", tuple(tensors), {})


def types_of(plan_tensors: object) -> dict[str, str]:
    return {t.info.name: t.qtype.name for t in plan_tensors}  # type: ignore[attr-defined]


def test_first_match_wins() -> None:
    recipe = recipe_from_dict(
        {
            "rules": [{"match": "ffn_down", "type": "Q6_K"}, {"match": "ffn_", "type": "Q2_K"}],
            "default": "Q8_0",
        },
        "test",
    )
    t = types_of(resolve(recipe, dense()).tensors)
    assert t["blk.0.ffn_down.weight"] == "Q6_K"
    assert t["blk.0.ffn_up.weight"] == "Q2_K"
    assert t["blk.0.attn_q.weight"] == "Q8_0"
    assert t["blk.0.attn_norm.weight"] == "F32"


def test_absolute_and_relative_block_ranges() -> None:
    recipe = recipe_from_dict(
        {
            "rules": [
                {"match": "ffn_down_exps", "blocks": "first:2", "type": "IQ2_XXS"},
                {"match": "ffn_down_exps", "blocks": "last:1", "type": "IQ2_S"},
                {"match": "ffn_up_exps", "blocks": "2,5", "type": "Q4_K"},
                {"match": "_exps", "type": "IQ1_S"},
            ],
            "default": "Q8_0",
        },
        "test",
    )
    plan = resolve(recipe, tiny_moe())
    t = types_of(plan.tensors)
    # MoE blocks are 2..5 (two leading dense blocks): first:2 = blocks 2, 3; last:1 = block 5
    assert [t[f"blk.{i}.ffn_down_exps.weight"] for i in range(2, 6)] == [
        "IQ2_XXS",
        "IQ2_XXS",
        "IQ1_S",
        "IQ2_S",
    ]
    assert [t[f"blk.{i}.ffn_up_exps.weight"] for i in range(2, 6)] == ["Q4_K", "IQ1_S", "IQ1_S", "Q4_K"]
    reasons = {p.info.name: p.reason.text for p in plan.tensors}
    assert reasons["blk.2.ffn_down_exps.weight"] == "rule 1: ffn_down_exps blocks first:2"


def test_keep_list_and_one_dimensional_tensors_stay_f32() -> None:
    recipe = load_recipe("uniform-q4_k")
    plan = resolve(recipe, tiny_moe())
    t = types_of(plan.tensors)
    for name in ("blk.3.ffn_gate_inp.weight", "blk.3.exp_probs_b.bias", "blk.0.attn_kv_a_norm.weight",
                 "output_norm.weight"):  # fmt: skip
        assert t[name] == "F32"
    assert t["blk.3.ffn_up_exps.weight"] == "Q4_K"


def test_extra_keep_patterns() -> None:
    recipe = recipe_from_dict({"keep": ["attn_q"], "rules": [{"match": ".", "type": "Q4_K"}]}, "test")
    t = types_of(resolve(recipe, dense()).tensors)
    assert t["blk.1.attn_q.weight"] == "F32"
    assert t["blk.1.ffn_up.weight"] == "Q4_K"


def test_fallback_reason() -> None:
    recipe = load_recipe("uniform-iq1_s")
    inv = dense(n_embd=576)  # smollm2's hidden size: no 256-block type fits
    plan = resolve(recipe, inv)
    p = {t.info.name: t for t in plan.tensors}
    assert p["blk.0.attn_q.weight"].qtype.name == "IQ4_NL"
    assert p["blk.0.attn_q.weight"].requested.name == "IQ1_S"
    assert p["blk.0.attn_q.weight"].reason.text.startswith("fallback: row 576 % 256 != 0")
    # ffn_down rows are 4·576 = 2304 = 9·256: no fallback
    assert p["blk.0.ffn_down.weight"].qtype.name == "IQ1_S"


def test_when_moe_and_dense() -> None:
    recipe = recipe_from_dict(
        {
            "rules": [
                {"match": r"ffn_(gate|up|down)\.", "when": "moe", "type": "Q6_K"},
                {"match": r"ffn_(gate|up|down)\.", "when": "dense", "type": "IQ2_XXS"},
            ],
            "default": "Q8_0",
        },
        "test",
    )
    assert types_of(resolve(recipe, tiny_moe()).tensors)["blk.0.ffn_up.weight"] == "Q6_K"
    assert types_of(resolve(recipe, dense()).tensors)["blk.0.ffn_up.weight"] == "IQ2_XXS"


def test_rule_matching_nothing_warns(caplog: pytest.LogCaptureFixture) -> None:
    recipe = recipe_from_dict({"rules": [{"match": "no_such_tensor", "type": "Q4_K"}], "default": "Q8_0"}, "test")
    with caplog.at_level(logging.WARNING):
        plan = resolve(recipe, dense())
    assert len(plan.warnings) == 1
    assert "matches no tensor" in caplog.text


def test_no_rule_and_no_default_is_an_error() -> None:
    recipe = recipe_from_dict({"rules": [{"match": "ffn_", "type": "Q4_K"}]}, "test")
    with pytest.raises(DynqError, match=r"no rule matches tensor token_embd\.weight"):
        resolve(recipe, dense())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rules": [{"match": ".", "type": "Q4_K"}], "bogus": 1}, "unknown key\\(s\\) bogus"),
        ({"rules": [{"match": ".", "type": "Q4_K", "colour": "red"}]}, "rule 1: unknown key\\(s\\) colour"),
        ({"rules": [{"match": ".", "type": "Q9_K"}]}, "rule 1: unknown tensor type 'Q9_K'"),
        ({"rules": [{"match": ".", "type": "Q8_K"}]}, "not a target llama.cpp can quantize to"),
        ({"rules": [{"match": "ffn_(up", "type": "Q4_K"}]}, "bad regular expression 'ffn_\\(up'"),
        (
            {"rules": [{"match": ".", "type": "Q4_K", "blocks": "0-4,3-6"}]},
            "overlap \\(block 3, 4 given twice\\)",
        ),
        ({"rules": [{"match": ".", "type": "Q4_K", "blocks": "5-2"}]}, "empty block range '5-2'"),
        ({"rules": [{"match": ".", "type": "Q4_K", "blocks": "first:0"}]}, "empty block range 'first:0'"),
        ({"rules": [{"match": ".", "type": "Q4_K", "blocks": "a-b"}]}, "bad block range 'a-b'"),
        ({"rules": [{"match": ".", "type": "Q4_K", "when": "sometimes"}]}, "'when' must be 'moe' or 'dense'"),
        ({"rules": [{"type": "Q4_K"}]}, "rule 1: missing 'match'"),
        ({"rules": []}, "no rules and no default"),
        ({"rules": "everything"}, "'rules' must be a list"),
        (["not", "a", "mapping"], "a recipe is a mapping"),
    ],
)
def test_recipe_errors(data: object, message: str) -> None:
    with pytest.raises(DynqError, match=message):
        recipe_from_dict(data, "my.yaml")


def test_yaml_file_recipe(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nrules:\n  - match: 'ffn_'\n    type: q3_k\ndefault: q8_0\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine"
    assert recipe.rules[0].qtype.name == "Q3_K"
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(DynqError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(DynqError, match="no such recipe file"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(DynqError, match="unknown recipe 'dyn-iq9'"):
        load_recipe("dyn-iq9")


def test_block_ranges_are_counted_before_they_are_expanded() -> None:
    """The recipe's bound on selected blocks is checked from the ranges' bounds: a refused range allocates nothing."""
    tracemalloc.start()
    try:
        with pytest.raises(DynqError, match="more than 262,144 selected blocks"):
            BlockSpec.parse("70-65536,0-9", "r.yaml, rule 9", room=1000)
        with pytest.raises(DynqError, match=r"overlap \(block 0, 1, 2, 3, 4, 5, 6, 7, \.\.\. given twice\)"):
            BlockSpec.parse("0-65536,0-65536", "r.yaml, rule 9")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # what the rules before it selected counts against a rule: three full ranges fit, the fourth does not
    full = [{"match": f"z{i}", "type": "Q8_0", "blocks": "0-65536"} for i in range(4)]
    assert len(recipe_from_dict({"rules": full[:3]}, "ok").rules) == 3
    with pytest.raises(DynqError, match=r"many\.yaml, rule 4: block ranges '0-65536' bring the recipe to more than"):
        recipe_from_dict({"rules": full}, "many.yaml")


def test_recipe_round_trips_through_dict() -> None:
    recipe = load_recipe("dyn-iq1_s")
    again = recipe_from_dict(recipe.to_dict(), "again")
    assert again.to_dict() == recipe.to_dict()
    assert [p.pattern for p in again.keep] == [p.pattern for p in recipe.keep]


# --- property tests ---------------------------------------------------------------------------------------------

ranges = st.lists(st.tuples(st.integers(0, 80), st.integers(0, 10)), min_size=1, max_size=5)


@given(ranges)
def test_block_spec_selects_exactly_its_ranges(spans: list[tuple[int, int]]) -> None:
    text = ",".join(f"{a}-{a + n}" if n else str(a) for a, n in spans)
    sets = [set(range(a, a + n + 1)) for a, n in spans]
    overlapping = sum(len(s) for s in sets) != len(set().union(*sets))
    if overlapping:
        with pytest.raises(DynqError, match="overlap"):
            BlockSpec.parse(text, "prop")
    else:
        assert BlockSpec.parse(text, "prop").resolve([]) == frozenset(set().union(*sets))


@given(st.lists(st.integers(0, 200), unique=True, max_size=30), st.integers(1, 40), st.integers(1, 40))
def test_first_and_last_pick_from_present_blocks(present: list[int], k: int, j: int) -> None:
    present = sorted(present)
    spec = BlockSpec.parse(f"first:{k},last:{j}", "prop")
    assert spec.resolve(present) == frozenset(present[:k]) | frozenset(present[-j:] if present else [])


rule_st = st.fixed_dictionaries(
    {
        "match": st.sampled_from(["ffn_", "attn_", "exps", "shexp", "down", r"^token_embd\.", r"^output\.", "blk"]),
        "type": st.sampled_from(["Q4_K", "IQ1_S", "Q8_0", "Q2_K", "Q6_K", "IQ4_NL"]),
    },
    optional={"blocks": st.sampled_from(["0-1", "3", "first:2", "last:1", "2-4"])},
)


@given(st.lists(rule_st, min_size=1, max_size=8))
def test_resolution_is_first_applicable_rule_then_fallback(rules: list[dict[str, str]]) -> None:
    recipe = recipe_from_dict({"rules": rules, "default": "Q8_0"}, "prop")
    inv = tiny_moe()
    plan = resolve(recipe, inv)
    for p in plan.tensors:
        assert p.qtype.fits(p.info.row_length)
        if p.kept:
            assert p.qtype.name == "F32"
            continue
        # reference: the first rule whose regex and block set hold, computed independently of the resolver
        expected = "Q8_0"
        for r in recipe.rules:
            present = sorted({t.block for t in inv.tensors if t.block is not None and re.search(r.pattern, t.name)})
            chosen = r.blocks.resolve(present) if r.blocks else None
            if re.search(r.pattern, p.info.name) and (chosen is None or p.info.block in chosen):
                expected = r.qtype.name
                break
        assert p.requested.name == expected
    assert plan.total_bytes == sum(p.qtype.nbytes(p.info.shape) for p in plan.tensors)


@given(st.lists(rule_st, min_size=1, max_size=6), st.lists(rule_st, min_size=1, max_size=3))
def test_rules_after_a_catch_all_change_nothing(rules: list[dict[str, str]], tail: list[dict[str, str]]) -> None:
    head = [*rules, {"match": ".", "type": "Q5_K"}]
    a = resolve(recipe_from_dict({"rules": head}, "prop"), tiny_moe())
    b = resolve(recipe_from_dict({"rules": head + tail}, "prop"), tiny_moe())
    assert types_of(a.tensors) == types_of(b.tensors)


def test_recorded_recipe_is_complete_and_versioned(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a quantized file records reads back to the same plan even if a later dynq keeps other tensors by
    default; a recipe of an unknown version is refused in one line."""
    inventory = shape_inventory("shapes:deepseek-r1")
    recipe = load_recipe("dyn-iq1_s")
    recorded = json.loads(json.dumps(recipe.to_dict()))
    assert recorded["version"] == RECIPE_VERSION and recorded["default_keep"] is False
    monkeypatch.setattr(rules, "DEFAULT_KEEP", ())  # a future dynq with another keep-list
    again = resolve(recipe_from_dict(recorded, "file"), inventory)
    assert again.tensors == resolve(recipe, inventory).tensors
    with pytest.raises(DynqError, match="recipe version 2"):
        recipe_from_dict({**recorded, "version": 2}, "file")


def test_reasons_are_structured() -> None:
    plan = resolve(load_recipe("dyn-iq1_s"), shape_inventory("shapes:deepseek-r1"))
    kinds = {t.reason.kind for t in plan.tensors}
    assert kinds == {ReasonKind.KEEP, ReasonKind.RULE}
    for t in plan.tensors:
        assert (t.reason.rule is not None) == (t.reason.kind is ReasonKind.RULE)
        assert t.kept == (t.reason.kind is ReasonKind.KEEP)
    smol = resolve(load_recipe("uniform-q4_k"), dense(n_embd=576))
    fallback = [t for t in smol.tensors if t.reason.kind is ReasonKind.FALLBACK]
    assert fallback and all(t.reason.rule == 1 and t.requested.name == "Q4_K" for t in fallback)


def test_an_fp8_source_is_described_and_planned() -> None:
    """A checkpoint's FP8 weights have no GGML type; the inventory still says what they are and what they weigh."""
    assert source_dtype("F8_E4M3") is F8_E4M3 and source_dtype("bf16").name == "BF16"
    fp8 = TensorInfo("blk.0.ffn_up.weight", (7168, 2048), F8_E4M3)
    assert fp8.nbytes == 7168 * 2048
    inv = ModelInventory("fp8", "llama", (fp8, TensorInfo("blk.0.attn_norm.weight", (7168,), qtype("F32"))), {})
    plan = resolve(load_recipe("uniform-q2_k"), inv)
    assert [t.qtype.name for t in plan.tensors] == ["Q2_K", "F32"]
