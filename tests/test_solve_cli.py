"""`dynq profile`, `dynq solve` and `dynq quantize --target` on a tiny real model: the recipe written reads back to
the solved plan, the budget holds, and bad inputs are one line with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import dynq
from dynq.cli import app
from dynq.core.units import parse_target
from dynq.errors import DynqError
from dynq.lab.synthetic import write_synthetic
from dynq.recipe.solved_recipe import recipe_yaml
from dynq.recipe.target import pinned_by
from tiny_solve import TYPES

runner = CliRunner()


def dynq_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def sizes(made: dict[str, Path]) -> tuple[int, int]:
    """The file sizes of the tiny model at uniform Q2_K and Q8_0: the range a solve can aim inside."""
    low = dynq.plan(made["tiny"], "uniform-q2_k").total_bytes
    high = dynq.plan(made["tiny"], "uniform-q8_0").total_bytes
    return low, high


def test_parse_target() -> None:
    assert parse_target("600MiB", 10**9) == 600 << 20
    assert parse_target("1.5G", 10**9) == 1_500_000_000
    assert parse_target("2.5bpw", 8 * 10**9) == 2_500_000_000
    with pytest.raises(DynqError, match="bad target"):
        parse_target("lots", 1)


def test_solve_writes_a_recipe_that_plans_to_the_budget(made: dict[str, Path]) -> None:
    low, high = sizes(made)
    target = (low + high) // 2
    recipe = made["dir"] / "solved.yaml"
    ran = runner.invoke(app, ["solve", str(made["tiny"]), "--profile", str(made["profile"]), "--target", str(target),
                              "-o", str(recipe), *[a for t in TYPES for a in ("--type", t)], "--imatrix",
                              str(made["imatrix"]), "--verify", "--text", str(made["text"])])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert "predicted KLD" in ran.output and "measured" in ran.output
    planned = runner.invoke(app, ["plan", str(made["tiny"]), "-r", str(recipe), "--json"])
    data = json.loads(planned.stdout)
    assert 0.99 * target <= data["total_bytes"] <= target
    assert {t["type"] for t in data["tensors"]} - {"F32"} <= set(TYPES)
    assert all("predicted cost" in r["note"] for r in dynq.recipe(str(recipe)).to_dict()["rules"])
    # the API gives the same plan as the file
    solved = dynq.solve(made["tiny"], made["profile"], target, has_imatrix=True, types=TYPES)
    assert [t.qtype for t in solved.plan.tensors] == [t.qtype for t in dynq.plan(made["tiny"], str(recipe)).tensors]
    assert solved.predicted_kld > 0 and solved.solution.nbytes <= target


def test_base_rules_pin_and_ties_tie(made: dict[str, Path]) -> None:
    low, high = sizes(made)
    base = made["dir"] / "base.yaml"
    base.write_text("rules:\n  - match: 'attn_v'\n    type: Q8_0\n  - match: '^output\\.'\n    type: Q6_K\n")
    solved = dynq.solve(made["tiny"], made["profile"], low + (high - low) // 3, has_imatrix=True, types=TYPES,
                        base=base, ties=[r"ffn_(gate|up)\."])  # fmt: skip
    got = {t.info.name: t.qtype.name for t in solved.plan.tensors}
    assert all(v == "Q8_0" for k, v in got.items() if "attn_v" in k)
    assert pinned_by(dynq.recipe(base), dynq.open_source(made["tiny"]).inventory())
    for b in range(dynq.open_source(made["tiny"]).inventory().n_blocks):
        assert got[f"blk.{b}.ffn_gate.weight"] == got[f"blk.{b}.ffn_up.weight"]


def test_a_base_recipes_keep_list_is_kept(made: dict[str, Path]) -> None:
    """A `--base` recipe's own keep-list holds in the solved plan and in the recipe written, instead of the default
    keep-list the solver starts from without a base."""
    low, high = sizes(made)
    base = made["dir"] / "keep.yaml"
    base.write_text("keep: ['attn_k\\.weight$']\nrules:\n  - match: '^output\\.'\n    type: Q6_K\n")
    solved = dynq.solve(made["tiny"], made["profile"], (low + high) // 2, has_imatrix=True, types=TYPES, base=base)
    kept = [t for t in solved.plan.tensors if t.info.name.endswith("attn_k.weight")]
    assert kept and all(t.kept and t.qtype.name == "F32" for t in kept)
    assert "attn_k\\.weight$" in solved.recipe.to_dict()["keep"]
    # without the base those tensors are the solver's to choose
    free = dynq.solve(made["tiny"], made["profile"], (low + high) // 2, has_imatrix=True, types=TYPES)
    assert not any(t.kept for t in free.plan.tensors if t.info.name.endswith("attn_k.weight"))


def test_quantize_for_one_call(made: dict[str, Path]) -> None:
    """`dynq.quantize_for` is `quantize --target` as one library call: the same bytes as the CLI's file, the
    imatrix's file named in the output as when a path is given, and an existing output refused by default."""
    low, high = sizes(made)
    target = (low + high) // 2
    cli_out, api_out = made["dir"] / "for-cli.gguf", made["dir"] / "for-api.gguf"
    ran = runner.invoke(app, ["quantize", str(made["tiny"]), "--target", str(target), "--profile", str(made["profile"]),
                              "--imatrix", str(made["imatrix"]), "-o", str(cli_out)])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    done = dynq.quantize_for(made["tiny"], target, api_out, imatrix=dynq.read_imatrix(made["imatrix"]),
                             profile=made["profile"])  # fmt: skip
    assert api_out.read_bytes() == cli_out.read_bytes()
    assert done.solved.plan.total_bytes <= target and done.result.files == [api_out]
    with pytest.raises(DynqError, match="already exists"):
        dynq.quantize(done.solved.plan, api_out, imatrix=made["imatrix"])


def test_quantize_to_a_target(made: dict[str, Path]) -> None:
    low, high = sizes(made)
    target = (low + high) // 2
    out = made["dir"] / "target.gguf"
    ran = runner.invoke(app, ["quantize", str(made["tiny"]), "--target", str(target), "--profile", str(made["profile"]),
                              "--imatrix", str(made["imatrix"]), "-o", str(out), "--threads", "2"])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    written = sum(t.nbytes for t in dynq.open_source(out).inventory().tensors)
    assert 0.99 * target <= written <= target


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "1000"], "below the smallest reachable size"),
        (["--target", "99MiB", "--type", "Q9_Z"], "unknown tensor type 'Q9_Z'"),
        (["--target", "99MiB", "--type", "IQ2_XXS"], "no candidate type"),  # no --imatrix: IQ2_XXS needs one
        (["--target", "99MiB", "--refine", "60"], "give the --imatrix"),  # refining quantizes the mixes it measures
        (["--target", "99MiB", "--tie", "attn", "--tie", "("], "tie 2: bad regular expression '('"),  # probe N11
    ],
)
def test_bad_solve_inputs(made: dict[str, Path], tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "r.yaml"
    done = dynq_cli("solve", made["tiny"], "--profile", made["profile"], "-o", out, *extra)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 200_000 + "]" * 200_000, "not a dynq profile (JSON nested deeper than any such file is)"),
        (None, "not a dynq profile (not a regular file)"),  # /dev/zero: read until MemoryError before
    ],
)
def test_a_crafted_profile_is_one_line(
    made: dict[str, Path], tmp_path: Path, content: str | None, message: str
) -> None:
    """Probe N11/N13 at the command line (every crafted case is in test_profile.py)."""
    profile = tmp_path / "p.json"
    if content is None:
        profile = Path("/dev/zero")
    else:
        profile.write_text(content)
    done = dynq_cli("solve", made["tiny"], "--profile", profile, "--target", "99MiB", "-o", tmp_path / "r.yaml")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r.yaml").exists()


def test_a_profile_of_another_model_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    other = write_synthetic("llama", tmp_path / "other.gguf", seed=1)
    done = dynq_cli("solve", other, "--profile", made["profile"], "--target", "99MiB", "-o", tmp_path / "r.yaml")
    assert done.returncode == 1
    assert "made for another model" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.model  # builds llama.cpp's tools
def test_bench_solver_rows_at_a_mix_size(made: dict[str, Path]) -> None:
    """A solver row takes exactly the tensor bytes of the llama.cpp mix it is named after, and is plotted; a recipe
    given as a file path is benched like a preset."""
    dynq.build_tools()
    out = made["dir"] / "bench"
    recipe = made["dir"] / "q4.yaml"
    recipe.write_text(recipe_yaml(dynq.recipe("uniform-q4_k")))
    ran = runner.invoke(app, ["bench", str(made["tiny"]), "-r", str(recipe), "--llama-mix", "Q4_K_M",
                              "--solve-at", "llama:Q4_K_M", "--profile", str(made["profile"]), "--imatrix",
                              str(made["imatrix"]), "--out-dir", str(out), "--ctx", "64", "--chunks", "1",
                              "--loop-tokens", "0", "--name", "tiny", "--threads", "2", "--keep",
                              str(made["dir"] / "kept")])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    kept = sorted((made["dir"] / "kept").iterdir())  # one quant per row, kept whole
    assert len(kept) == 3 and all(p.read_bytes()[:4] == b"GGUF" for p in kept), kept
    rows = {r["name"]: r for r in json.loads((out / "tiny.json").read_text())}
    assert set(rows) == {str(recipe), "Q4_K_M", "solved@Q4_K_M"}
    assert 0.99 * rows["Q4_K_M"]["bytes"] <= rows["solved@Q4_K_M"]["bytes"] <= rows["Q4_K_M"]["bytes"]
    assert "| solved@Q4_K_M | dynq |" in (out / "tiny.md").read_text()
    assert (out / "tiny.png").stat().st_size > 1000


def test_quantize_target_runs_every_step_on_the_threads_asked(
    made: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`quantize --target --threads 1`: the solve and the quantize each get one thread (the solve step used to get
    the default count)."""
    from dynq.budget import allocate

    seen: dict[str, int] = {}

    def spy(step: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def called(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.get("ctx") if "ctx" in kwargs else args[-1]
            seen[step] = ctx.threads
            return real(*args, **kwargs)

        return called

    monkeypatch.setattr(allocate, "_solver", spy("solve", allocate._solver))
    monkeypatch.setattr(allocate, "quantize", spy("quantize", allocate.quantize))
    low, high = sizes(made)
    out = made["dir"] / "threads.gguf"
    ran = runner.invoke(app, ["quantize", str(made["tiny"]), "--target", str((low + high) // 2), "--profile",
                              str(made["profile"]), "--imatrix", str(made["imatrix"]), "--threads", "1", "-o",
                              str(out)])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert seen == {"solve": 1, "quantize": 1}


def test_solve_keeps_what_its_base_recipe_pins(made: dict[str, Path], tmp_path: Path) -> None:
    low, high = sizes(made)
    base = tmp_path / "base.yaml"
    base.write_text("name: pinned\nrules:\n  - {match: attn_q, type: q8_0}\n")
    out = tmp_path / "r.yaml"
    done = dynq_cli("solve", made["tiny"], "--profile", made["profile"], "--target", str((low + high) // 2), "--base",
                    base, "--name", "with-base", "-o", out, "--plot", tmp_path / "mix.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mix.png").read_bytes()[:4] == b"\x89PNG"
    plan = dynq.plan(made["tiny"], out)
    assert plan.recipe.name == "with-base"
    assert {p.qtype.name for p in plan.tensors if p.info.kind == "attn_q.weight"} == {"Q8_0"}
