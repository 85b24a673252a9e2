from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynq.cli import app

runner = CliRunner()


def dynq(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "dynq.cli", *args], capture_output=True, text=True, timeout=600)


def test_plan_json_on_a_shape_inventory() -> None:
    result = runner.invoke(app, ["plan", "shapes:deepseek-r1", "--recipe", "dyn-iq1_s", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"total_bytes", "bpw", "census", "tensors", "classes"} <= set(data)
    assert data["census"]["IQ1_S"] == 168
    first = data["tensors"][0]
    assert set(first) >= {"name", "shape", "type", "bytes", "reason"}
    assert sum(t["bytes"] for t in data["tensors"]) == data["total_bytes"]


def test_plan_table_and_llama_args() -> None:
    result = runner.invoke(app, ["plan", "shapes:mixtral-8x7b", "--recipe", "dyn-q2_k_xl"])
    assert result.exit_code == 0, result.output
    assert "blk.31.ffn_down_exps.weight" in result.stdout
    assert "per tensor class" in result.stdout
    result = runner.invoke(app, ["plan", "shapes:mixtral-8x7b", "-r", "dyn-q2_k_xl", "--llama-args"])
    assert result.exit_code == 0
    assert result.stdout.startswith("llama-quantize ")
    assert "--tensor-type" in result.stdout


def test_inspect_json(tiny_gguf: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tiny_gguf), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_tensors"] == 21 and data["arch"] == "llama"


def test_compare_and_presets() -> None:
    result = runner.invoke(app, ["compare", "shapes:qwen3-235b-a22b", "-r", "uniform-iq1_s", "-r", "dyn-iq1_s"])
    assert result.exit_code == 0, result.output
    assert "dyn-iq1_s" in result.stdout and "experts" in result.stdout
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "uniform-tq1_0" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "shapes:gpt-9", "-r", "dyn-iq1_s"], "unknown shape inventory 'shapes:gpt-9'"),
        (["plan", "shapes:deepseek-r1", "-r", "dyn-iq9"], "unknown recipe 'dyn-iq9'"),
        (["inspect", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such file"),
        (["plan", "zoo:gpt-9", "-r", "f16"], "unknown zoo model 'zoo:gpt-9'"),
    ],
)
def test_errors_are_one_line_and_exit_non_zero(args: list[str], message: str) -> None:
    done = dynq(*args)
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_unmatched_rule_warns(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - match: 'ffn_.*_shexp'\n    type: Q6_K\ndefault: Q4_K\n")
    done = dynq("plan", "shapes:mixtral-8x7b", "-r", str(recipe), "--json")
    assert done.returncode == 0
    assert "matches no tensor" in done.stderr
    assert json.loads(done.stdout)["warnings"]


def test_the_docs_recipe_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "docs" / "plan.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = tmp_path / "my-mix.yaml"
    recipe.write_text(example)
    result = runner.invoke(app, ["plan", "shapes:deepseek-r1", "-r", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["census"]["IQ2_XXS"] == 3 and data["census"]["IQ1_S"] == 171
