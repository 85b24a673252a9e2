"""Every `dynq` command and every option in its --help is run by some test (a test file that names the command
and the option), or listed in NOT_RUN with the reason; and the options nothing else ran are run here, each checked
for the effect it promises."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import dynq
from dynq.cli import app
from dynq.lab.synthetic import write_synthetic
from test_deploy import CHATML, with_chat_template

TESTS = Path(__file__).parent
# (command, option's parameter name): why no test runs it
NOT_RUN = {
    ("quantize", "device"): "cuda needs a GPU: tests/test_gpu.py runs the same through the API (RunContext.device)",
}


def dynq_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def options() -> dict[str, dict[str, set[str]]]:
    """Each command's options: parameter name -> its flags."""
    found = {}
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        found[name] = {p.name: {*p.opts, *p.secondary_opts} for p in command.params
                       if p.param_type_name == "option" and p.name != "help"}  # fmt: skip
    return found


def named_in_tests(folder: Path = TESTS) -> dict[str, set[str]]:
    """For each command, the options that a test file naming the command (as a string) also names (this one
    included: it runs the options nothing else did)."""
    commands = options()
    seen: dict[str, set[str]] = {name: set() for name in commands}
    for path in folder.glob("test_*.py"):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}  # fmt: skip
        for name in commands.keys() & strings:
            seen[name] |= {p for p, flags in commands[name].items() if flags & strings}
    return seen


def test_every_command_and_option_is_run_or_said_why_not() -> None:
    seen = named_in_tests()
    missing = [f"{name} {sorted(flags)[-1]}" for name, params in options().items() for param, flags in params.items()
               if param not in seen[name] and (name, param) not in NOT_RUN]  # fmt: skip
    assert missing == [], f"no test runs: {missing}"


def test_the_rule_sees_an_option_no_test_names(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text('ARGS = ["plan", "m.gguf", "--json", "--no-tensors"]\nOTHER = ["--force"]\n')
    seen = named_in_tests(tmp_path)
    assert seen["plan"] == {"as_json", "tensors"}  # --force is not a plan option; --llama-args is not named
    assert seen["quantize"] == set()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("options")
    llama = write_synthetic("llama", folder / "tiny.gguf")
    return {"llama": llama, "chat": with_chat_template(llama, folder / "chat.gguf", CHATML),
            "moe": write_synthetic("deepseek2", folder / "moe.gguf"), "dir": folder}  # fmt: skip


def test_offload_takes_every_hardware_option() -> None:
    done = dynq_cli("offload", "shapes:deepseek-r1", "-r", "dyn-iq1_s", "--vram", "24GB", "--gpus", "2", "--ram",
                    "256GB", "--kv-type", "q8_0", "--ubatch", "256", "--gpu-bw", "900", "--cpu-bw", "200",
                    "--no-op-offload", "--ctx", "8192", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    said = " ".join(plan["assumptions"])
    for words in ("2 x GPU with 24 GiB", "bandwidth given (900 GB/s)", "bandwidth 200 GB/s", "RAM 256 GiB",
                  "KV cache q8_0", "context 8192", "ubatch 256"):  # fmt: skip
        assert words in said, (words, said)
    assert "-ts " in plan["command"] and "--no-op-offload" in plan["command"] and "-ctk q8_0" in plan["command"]


def test_run_takes_every_sampling_option(models: dict[str, Path]) -> None:
    common = ["run", models["chat"], "--chat", "-p", "hi", "-n", "6", "--threads", "1", "--ctx", "256", "-ngl", "0"]
    cut = ["--top-p", "0.5", "--top-k", "1", "--repeat-penalty", "1.3", "--min-p", "0.2", "--temperature", "0.9"]
    runs = [dynq_cli(*common, *cut, "--seed", str(seed)) for seed in (1, 2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
        assert "GPU layers 0 (as asked)" in done.stderr
        assert "temperature 0.9, min_p 0.2, top_p 0.5, top_k 1, repeat_penalty 1.3" in done.stderr, done.stderr
    assert runs[0].stdout == runs[1].stdout  # top_k 1: the seed has nothing left to choose
    plain = dynq_cli(*common, "--seed", "1")
    system = dynq_cli(*common, "--seed", "1", "--system", "answer in one word")

    def prompt_tokens(done: subprocess.CompletedProcess[str]) -> int:
        return int(next(line for line in done.stderr.splitlines() if "prompt tokens" in line).split()[0])

    # the template's default system prompt (SmolLM's) gave way to the one asked for
    assert prompt_tokens(system) != prompt_tokens(plain)


def test_export_ollama_writes_its_parameters_and_links(models: dict[str, Path]) -> None:
    out = models["dir"] / "ollama"
    done = dynq_cli("export-ollama", models["chat"], "-o", out, "--temperature", "0.3", "--min-p", "0.1", "--link")
    assert done.returncode == 0, done.stderr
    modelfile = next(out.glob("*Modelfile*")).read_text()
    assert "PARAMETER temperature 0.3" in modelfile and "PARAMETER min_p 0.1" in modelfile
    assert os.path.samefile(next(out.glob("*.gguf")), models["chat"])


def test_plan_without_the_tensor_table(models: dict[str, Path]) -> None:
    full, short = (dynq_cli("plan", models["llama"], "-r", "uniform-q4_k", *extra) for extra in ([], ["--no-tensors"]))
    assert full.returncode == short.returncode == 0
    assert "blk.0.attn_q.weight" in full.stdout and "blk.0.attn_q.weight" not in short.stdout


def test_split_by_max_size(models: dict[str, Path]) -> None:
    (models["dir"] / "parts").mkdir()
    done = dynq_cli("split", models["llama"], "-o", models["dir"] / "parts" / "tiny.gguf", "--max-size", "1M")
    assert done.returncode == 0, done.stderr
    shards = sorted((models["dir"] / "parts").glob("tiny-*-of-*.gguf"))
    assert len(shards) == 3  # 2.7 MB of tensors, at most 1 MB each


def test_rotate_seed_and_force(models: dict[str, Path]) -> None:
    out = models["dir"] / "rot.gguf"
    first = dynq_cli("rotate", models["llama"], "-o", out, "--seed", "3")
    assert first.returncode == 0, first.stderr
    a = out.read_bytes()
    assert dynq_cli("rotate", models["llama"], "-o", out, "--seed", "3").returncode == 1  # exists: needs --force
    assert dynq_cli("rotate", models["llama"], "-o", out, "--seed", "3", "--force").returncode == 0
    assert out.read_bytes() == a
    assert dynq_cli("rotate", models["llama"], "-o", out, "--seed", "4", "--force").returncode == 0
    assert out.read_bytes() != a


def test_synthetic_seed(models: dict[str, Path]) -> None:
    paths = [models["dir"] / f"s{seed}.gguf" for seed in (1, 1, 2)]
    for path, seed in zip(paths, ("1", "1", "2"), strict=True):
        done = dynq_cli("synthetic", "llama", "-o", path, "--seed", seed, "--force")
        assert done.returncode == 0, done.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()  # the same path twice: written again, the same
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_imatrix_all_experts_and_eval_loops_threads(models: dict[str, Path]) -> None:
    text = models["dir"] / "calib.txt"
    text.write_text("the of and to in def return " * 60)
    counts = {}
    for flag in ("--no-all-experts", "--all-experts"):
        out = models["dir"] / f"imx{flag}.gguf"
        done = dynq_cli("imatrix", models["moe"], "--text", text, "-o", out, "--ctx", "32", "--chunks", "1",
                        "--threads", "1", flag)  # fmt: skip
        assert done.returncode == 0, done.stderr
        entry = dynq.read_imatrix(out).entries["blk.1.ffn_down_exps.weight"]
        counts[flag] = entry.counts.tolist()
    # routed, each token reaches 2 of the 8 experts; with all of them, every expert sees every token
    assert len(set(counts["--all-experts"])) == 1 and sum(counts["--all-experts"]) == 4 * sum(
        counts["--no-all-experts"]
    )
    done = dynq_cli("eval", models["llama"], "--ref", models["llama"], "--text", text, "--ctx", "32", "--chunks", "1",
                    "--threads", "1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kld_mean"] < 1e-4
    done = dynq_cli("loops", models["llama"], "--tokens", "8", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)


def test_profile_probe_type_processes_and_gram(models: dict[str, Path]) -> None:
    text = models["dir"] / "calib.txt"
    text.write_text("the of and to in def return " * 60)
    env = os.environ | {"DYNQ_CACHE_DIR": str(models["dir"] / "cache")}
    common = ["profile", models["llama"], "--text", text, "--ctx", "32", "--chunks", "1", "--rows", "16",
              "--group-blocks", "2"]  # fmt: skip
    pooled = dynq_cli("--verbose", *common, "-o", models["dir"] / "a.json", "--probe-type", "Q3_K", "--processes", "2",
                      env=env)  # fmt: skip
    assert pooled.returncode == 0, pooled.stderr
    assert "2 local processes" in pooled.stderr
    assert json.loads((models["dir"] / "a.json").read_text())["method"]["probe_type"] == "Q3_K"
    imatrix, gram = models["dir"] / "g.imatrix.gguf", models["dir"] / "g.gram.gguf"
    done = dynq_cli("imatrix", models["llama"], "--text", text, "-o", imatrix, "--gram", gram, "--ctx", "32",
                    "--chunks", "1", "--threads", "1", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = dynq_cli(*common, "-o", models["dir"] / "c.json", "--imatrix", imatrix, "--gram", gram, "--threads", "1",
                    env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((models["dir"] / "c.json").read_text())["method"]["encoder"].startswith("feedback")


@pytest.mark.model
def test_fetch_and_build_tools_commands() -> None:
    done = dynq_cli("fetch", "zoo:smollm2-135m")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).is_file()
    done = dynq_cli("build-tools")
    assert done.returncode == 0, done.stderr


def test_help_groups_every_command_and_each_shows_an_example() -> None:
    from dynq.cli import PANELS

    done = dynq_cli("--help")
    assert done.returncode == 0
    panels = [line.split("─ ")[1].split(" ")[0] for line in done.stdout.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", "Plan", "Make", "Judge", "Run", "Scale"]
    assert set(PANELS) == set(options())
    runner = CliRunner()
    for name, (_, example) in PANELS.items():
        assert example.split()[:2] == ["dynq", name]
        shown = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"})  # the example on one line
        assert f"Example: {example}" in " ".join(shown.output.split()), shown.output


@pytest.mark.parametrize("name", ["presets", "plan", "compare", "offload"])
def test_the_help_examples_that_need_no_files_run(name: str) -> None:
    from dynq.cli import PANELS

    done = CliRunner().invoke(app, shlex.split(PANELS[name][1])[1:])
    assert done.exit_code == 0, done.output
    assert done.output.strip()
