"""Text is data, never markup: hostile names, paths, metadata and completions reach the terminal verbatim-visible,
never as rich markup and never as raw control characters."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pytest
import typer
import yaml
from gguf import GGMLQuantizationType, GGUFWriter
from rich.console import Console, RenderableType
from rich.text import Text
from typer.testing import CliRunner

from dynq import api
from dynq.cli import deploy as cli_deploy
from dynq.cli.offload import draw_offload
from dynq.cli.render import draw_comparison, draw_imatrix_coverage, draw_plan, draw_summary
from dynq.cli.text import clean, data, line
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.core.units import GIB
from dynq.core.visible import one_line
from dynq.deploy.offload import Hardware, offload
from dynq.deploy.ollama import Modelfile, OllamaExport, ollama_name
from dynq.deploy.run import Generation, Offload
from dynq.deploy.shards import ShardsWritten
from dynq.eval.loops import Continuation
from dynq.lab.synthetic import write_synthetic
from tiny_models import llama_tensors

T = GGMLQuantizationType

# Markup rich would parse (or choke on), terminal escapes (CSI colour, OSC 8 hyperlink, OSC title), cursor and
# overwrite controls, a C1 CSI, DEL and the bidi overrides that reorder what is read.
HOSTILE = [
    "[/]",
    "[/x]",
    "[link=https://x]y[/link]",
    "[bold]b",
    ":smile:",
    "\x1b[31mred",
    "\x1b]8;;http://x\x07link",
    "\x1b]0;title\x1b\\",
    "a\rb\x08c\x00d\x7f",
    "\x9b2J\x85",
    "\u202eevil\u202c\u2066i\u2069",
    "mark\u200fs\u200e \u061c",  # the bidi marks flip neutral characters around them (probe N16)
]
NAME = "[/]\x1b[31mred[link=http://evil]x"  # general.name
RULE = "[/]\x1b?|\\[link="  # a rule's regex, which the plan quotes as the reason
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
RICH_SGR = re.compile("\x1b\\[[0-9;]*m")  # the only escapes rich itself writes for styles


def render(*items: RenderableType, terminal: bool = False) -> str:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=terminal, color_system="truecolor" if terminal else None, width=400)
    for item in items:
        console.print(item)
    return buf.getvalue()


def render_with(draw: Any, *args: Any) -> str:
    """What `draw(console, *args)` writes, checked on a plain console and on a colour terminal."""
    outputs = []
    for terminal in (False, True):
        buf = io.StringIO()
        draw(Console(file=buf, force_terminal=terminal, color_system="truecolor", width=400), *args)
        assert_only_rich_escapes(buf.getvalue())
        outputs.append(RICH_SGR.sub("", buf.getvalue()))
    assert outputs[0] == outputs[1]
    return outputs[0]


def assert_inert(output: str) -> None:
    """No control character but newline (and tab) in what a non-terminal console writes."""
    assert not CONTROL.findall(output), CONTROL.findall(output)


def assert_only_rich_escapes(output: str) -> None:
    """Every ESC in a terminal console's output starts one of rich's own colour sequences; no hyperlinks."""
    assert "\x1b]" not in output
    assert_inert(RICH_SGR.sub("", output))


# --- clean, data, line -----------------------------------------------------------------------------------------


def test_clean_shows_every_control_character_as_an_escape() -> None:
    assert clean("\x1b[31mred") == "\\x1b[31mred"
    assert clean("\x1b]8;;http://x\x07") == "\\x1b]8;;http://x\\x07"
    assert clean("a\rb\x08c\x00\x7f") == "a\\x0db\\x08c\\x00\\x7f"
    assert clean("\x9b\x85\x80\x9f") == "\\x9b\\x85\\x80\\x9f"
    assert clean("\u202a\u202e\u2066\u2069") == "\\u202a\\u202e\\u2066\\u2069"
    assert clean("\u200e\u200f\u061c") == "\\u200e\\u200f\\u061c"
    assert one_line("a\nb\x1b") == "a\\nb\\x1b" and "\n" not in one_line("\n".join(HOSTILE))
    assert clean("tab\tnew\nline é ü 中 [/]") == "tab\tnew\nline é ü 中 [/]"
    assert clean(42) == "42" and clean(Path("/a/[/x]")) == "/a/[/x]"
    for text in HOSTILE:
        assert not CONTROL.search(clean(text))


def test_clean_piece_by_piece_is_clean_whole() -> None:
    text = "".join(HOSTILE)
    for cut in range(len(text) + 1):
        assert clean(text[:cut]) + clean(text[cut:]) == clean(text)


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("terminal", [False, True])
def test_data_is_never_markup(text: str, terminal: bool) -> None:
    cell = data(text, "bold")
    assert isinstance(cell, Text) and cell.plain == clean(text) and cell.style == "bold"
    output = render(cell, line("label [bold]: ", data(text)), terminal=terminal)
    plain = RICH_SGR.sub("", output)
    assert plain.splitlines() == [clean(text), "label [bold]: " + clean(text)]
    assert_only_rich_escapes(output)


def test_the_datas_escape_is_text_rich_styles_are_escapes() -> None:
    output = render(line("name: ", data("\x1b[31mred", "bold")), terminal=True)
    assert "\\x1b[31mred" in output
    assert output.count("\x1b[") == len(RICH_SGR.findall(output))  # every real ESC is rich's
    assert RICH_SGR.findall(output), "bold is drawn by rich's own escape"
    assert "\x1b[31m" not in output


def test_line_keeps_styles_and_cleans_labels() -> None:
    text = line("a\x1b[2J ", data("b", "bold"), " c", style="dim")
    assert text.plain == "a\\x1b[2J b c" and text.style == "dim"
    assert [(s.start, s.end, s.style) for s in text.spans] == [(9, 10, "bold")]
    assert line(Text("\x1b[2J", style="red")).plain == "\\x1b[2J"  # a Text not made by `data` is cleaned too


# --- the drawing functions, on a tiny GGUF full of hostile text ---------------------------------------------


def write_hostile_gguf(path: Path) -> Path:
    """The tiny llama model plus tensors and metadata whose names and values are hostile; llama.cpp would not load
    it, but inspect and plan read names and shapes only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(2)
    # what the offload planner sizes the KV cache and compute buffers from
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_name(NAME)
    writer.add_string("dynq.note", "".join(HOSTILE))
    writer.add_string("dynq.\x1b[2J[/]key", "value")
    rng = np.random.default_rng(0)
    for name, values, qtype in llama_tensors():
        writer.add_tensor(name, values if qtype == T.F32 else values.astype(np.float16))
    writer.add_tensor("[link=https://x]y[/link]\x1b[31m.weight", rng.standard_normal((64, 64)).astype(np.float16))
    writer.add_tensor("[/]\u202eevil\x9b2J\r.weight", rng.standard_normal(64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def hostile_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a folder named `[/x]` (the folder `[` holding `x]`): the path itself is markup
    return write_hostile_gguf(tmp_path_factory.mktemp("hostile") / "[/x]" / "m[bold]\x1b[31m.gguf")


@pytest.fixture(scope="module")
def hostile_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe = {"name": "[/]bad", "rules": [{"match": RULE, "type": "Q8_0", "note": "[bold]\x1b[31mnote[/]"}],
              "default": "Q8_0"}  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_draw_summary(hostile_gguf: Path) -> None:
    output = render_with(draw_summary, api.inspect(str(hostile_gguf)))
    for text in (str(hostile_gguf), NAME, "".join(HOSTILE), "dynq.\x1b[2J[/]key"):
        assert clean(text) in output


def test_draw_plan(hostile_gguf: Path, hostile_recipe: Path) -> None:
    output = render_with(draw_plan, api.plan(str(hostile_gguf), str(hostile_recipe)), None, True)
    for text in (str(hostile_gguf), "[/]bad", "[link=https://x]y[/link]\x1b[31m.weight", "[/]\u202eevil\x9b2J\r.weight",
                 "rule 1: " + RULE):  # fmt: skip
        assert clean(text) in output


def test_draw_comparison(hostile_gguf: Path, hostile_recipe: Path) -> None:
    plans = [api.plan(str(hostile_gguf), str(hostile_recipe)), api.plan(str(hostile_gguf), "uniform-q8_0")]
    output = render_with(draw_comparison, plans)
    assert clean(str(hostile_gguf)) in output and "[/]bad" in output and "uniform-q8_0" in output


def test_draw_imatrix_coverage() -> None:
    names = ["[link=https://x]y[/link]\x1b[31m.weight", "blk.0.[/]\x9b2J.weight"]
    entries = {n: ImatrixEntry(np.ones((2, 8), np.float32), np.array([0, 5], np.float32)) for n in names}
    output = render_with(draw_imatrix_coverage, Imatrix(entries), True)
    for name in names:
        assert clean(name) in output
    assert "2 tensors; 4 expert matrices, 2 of them without data" in output


def test_draw_offload(hostile_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = offload(str(hostile_gguf), Hardware(vram=8 * GIB))
    output = render_with(draw_offload, plan)
    command = capsys.readouterr().out  # printed plain, so it is never wrapped
    assert clean(str(hostile_gguf)) in output
    assert command.startswith("llama-cli -m ") and clean(str(hostile_gguf)) in command
    assert_inert(command)


# --- cli/deploy: streamed completions, paths, template problems ---------------------------------------------

PIECES = ["Hello [/] ", "\x1b", "[31mred", "\x1b]8;;http://x", "\x07 \u202e", "\x9b2J", "[link=https://x]y[/link]\r"]


class FakeRunner:
    """A model that answers with hostile text, token piece by token piece."""

    def __init__(self, model: str, **kwargs: object) -> None:
        self.path = Path(model)
        self.offload = Offload(0, "[/]reason\x1b[31m")

    def __enter__(self) -> FakeRunner:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        pass

    def _answer(self, on_piece: Any) -> Generation:
        for piece in PIECES:
            on_piece(piece)
        return Generation("".join(PIECES), 3, len(PIECES), 0.1, 0.2, True)

    def complete(self, prompt: str, sampling: object, on_piece: Any) -> Generation:
        return self._answer(on_piece)

    def chat(self, messages: object, sampling: object, on_piece: Any) -> Generation:
        return self._answer(on_piece)


@pytest.fixture
def deploy_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[typer.Typer]:
    monkeypatch.setattr(api, "runner", FakeRunner)
    monkeypatch.setattr(api, "gguf_file", lambda spec: Path("/m/[/x]") / spec)
    app = typer.Typer()
    cli_deploy.register(app)
    yield app


@pytest.mark.parametrize("chat", [[], ["--chat"]])
def test_run_streams_completions_cleaned(deploy_app: typer.Typer, chat: list[str]) -> None:
    result = CliRunner().invoke(deploy_app, ["run", "m\x1b[31m.gguf", "-p", "[/]prompt\x1b[2J", *chat])
    assert result.exit_code == 0, result.output
    assert clean("".join(PIECES)) in result.stdout
    assert ("[/]prompt\\x1b[2J" in result.stdout) == (not chat)  # a completion echoes its prompt
    assert clean("m\x1b[31m.gguf") in result.output and clean("[/]reason\x1b[31m") in result.output
    assert_inert(result.output)


def test_chat_on_stdin(deploy_app: typer.Typer) -> None:
    result = CliRunner().invoke(deploy_app, ["run", "m.gguf", "--chat"], input="hi [/]\x1b[2J\n\n")
    assert result.exit_code == 0, result.output
    assert clean("".join(PIECES)) in result.stdout and ">>>" in result.output
    assert_inert(result.output)


@pytest.mark.parametrize(
    ("gguf", "modelfile", "expected"),
    [
        ("o/--insecure.gguf", "o/Modelfile", "ollama create insecure -f o/Modelfile"),
        ("-o/-x.gguf", "-o/Modelfile", "ollama create x -f ./-o/Modelfile"),
        ("/abs/-_.gguf", "/abs/Modelfile", "ollama create model -f /abs/Modelfile"),
    ],
)
def test_the_ollama_create_hint_passes_no_option(gguf: str, modelfile: str, expected: str) -> None:
    """Probe N16: a model file named `--insecure.gguf` made the printed command `ollama create --insecure -f ...`."""
    hint = cli_deploy.ollama_create_hint(Path(gguf), Path(modelfile))
    assert hint == expected
    args = shlex.split(hint)
    assert [a for a in args if a.startswith("-")] == ["-f"]


def test_merge_split_and_export_print_paths_as_data(
    deploy_app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "[/x]"
    folder.mkdir(parents=True)
    files = [folder / f"m[bold]\x1b[31m-0000{i}-of-00002.gguf" for i in (1, 2)]
    for f in files:
        f.write_bytes(b"GGUF")
    monkeypatch.setattr(api, "merge", lambda *a, **k: ShardsWritten(files[:1], 3, 100))
    monkeypatch.setattr(api, "split", lambda *a, **k: ShardsWritten(files, 3, 100))
    problem = "[/]the template says \x1b[31m[link=https://x]y[/link]"
    modelfile = Modelfile("", None, problems=[problem])
    monkeypatch.setattr(
        api, "export_ollama", lambda *a, **k: OllamaExport(files[0], folder / "Model[/]file", modelfile)
    )
    runner = CliRunner()
    for args in (
        ["merge", str(files[0])],
        ["split", str(files[0]), "--shards", "2"],
        ["export-ollama", "m", "-o", "o"],
    ):
        result = runner.invoke(deploy_app, args)
        assert result.exit_code == 0, result.output
        assert clean(str(files[0])) in result.output
        assert_inert(result.output)
    assert clean(problem) in result.output and clean(str(folder / "Model[/]file")) in result.output


# --- end to end: `dynq inspect` and `dynq plan` on the hostile file ----------------------------------------------


def cli_output(args: list[str]) -> str:
    from dynq.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)
    return result.stdout


def test_cli_inspect(hostile_gguf: Path) -> None:
    output = cli_output(["inspect", str(hostile_gguf)])
    assert clean(str(hostile_gguf)) in output and clean(NAME) in output


def test_cli_plan(hostile_gguf: Path) -> None:
    output = cli_output(["plan", str(hostile_gguf), "-r", "uniform-q8_0"])
    assert clean(str(hostile_gguf)) in output
    assert clean("[link=https://x]y[/link]\x1b[31m.weight") in output


# --- end to end: every other command that prints text from a model, a file or a user ----------------------------


def cli(args: list[str], code: int = 0) -> Any:
    """`dynq ARGS` in-process: the exit code, no exception but the exit, nothing raw in stdout or stderr."""
    from dynq.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    return result


def dynq(*args: str | Path, terminal: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m dynq.cli ARGS` as a user runs it, with real stdout and stderr; `terminal` makes rich draw as on a
    colour terminal (its own escapes only)."""
    extra = {"FORCE_COLOR": "1", "COLUMNS": "200"} if terminal else {"NO_COLOR": "1"}
    environ = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TERM")}
    return subprocess.run([sys.executable, "-m", "dynq.cli", *map(str, args)], capture_output=True, text=True,
                          env=environ | extra, timeout=120)  # fmt: skip


# what rich writes on a terminal to draw a live progress bar: styles, hide/show the cursor, erase a line, go up one
RICH_LIVE = re.compile("\x1b\\[[0-9;]*m|\x1b\\[\\?25[lh]|\x1b\\[2K|\x1b\\[1A|\r")


def squash(text: str) -> str:
    """`text` without whitespace: what a table title or a folded cell shows, wherever rich wrapped it."""
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose path is markup (`[/x]`) and escapes: CSI colour, C1 CSI, bidi override, carriage return."""
    folder = tmp_path_factory.mktemp("cli") / "[/x]" / "d\x1b[31m[link=https:]y\u202e\x9b\r"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(hostile_dir: Path) -> Path:
    """A tiny model llama.cpp loads, under a hostile name in the hostile folder."""
    return write_synthetic("llama", hostile_dir / "m[bold]\x1b]8;;x\x07.gguf")


@pytest.fixture(scope="module")
def hostile_text(hostile_dir: Path) -> Path:
    path = hostile_dir / "t[bold]\x1b[31m[link=x]\u202e.txt"
    path.write_text(" ".join(f"the {c} of {c}{c} and to in def return" for c in "abcdefghijklmnopqrstuvwxyz" * 4))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """References and other cached runs go to a scratch folder, not the user's cache."""
    monkeypatch.setenv("DYNQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cli_synthetic(hostile_dir: Path) -> None:
    path = hostile_dir / "s[bold]\x1b[31m\u202e.gguf"
    output = cli(["synthetic", "llama", "-o", str(path)]).stdout
    assert output.startswith("wrote " + clean(path) + " (") and path.exists()
    assert "[/x]" in output and "\\x1b[31m" in output and "\\u202e" in output and "\\x9b\\x0d" in output


def test_cli_compare(hostile_gguf: Path, tmp_path: Path) -> None:
    name = "[/]bad\x1b[31m[link=https://x]y\u202e"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": name, "rules": [{"match": RULE, "type": "Q8_0"}], "default": "Q8_0"}))
    output = cli(["compare", str(hostile_gguf), "-r", "uniform-q8_0", "-r", str(recipe)]).stdout
    assert clean(name) in output and "[/]bad\\x1b[31m[link=https://x]y\\u202e" in output
    assert clean(hostile_gguf) in output and "uniform-q8_0" in output


def test_cli_quantize_and_inspect_the_result(hostile_dir: Path) -> None:
    source = write_hostile_gguf(hostile_dir / "h[bold]\x1b[31m.gguf")
    output = hostile_dir / "q[red]\x9b2J\r.gguf"
    stdout = cli(["quantize", str(source), "-r", "uniform-q8_0", "-o", str(output)]).stdout
    assert stdout.startswith("wrote " + clean(output) + ": ") and output.exists()
    assert "[/x]" in stdout and "\\x1b[31m" in stdout and "\\x9b2J\\x0d.gguf" in stdout
    summary = cli(["inspect", str(output)]).stdout  # the hostile metadata travelled into the quant
    assert clean(output) in summary and clean(NAME) in summary
    tensors = cli(["plan", str(output), "-r", "uniform-q8_0"]).stdout
    assert clean("[link=https://x]y[/link]\x1b[31m.weight") in tensors


def test_cli_quantize_progress_on_a_terminal(hostile_dir: Path) -> None:
    """The progress bar names each tensor (hostile here) while it runs: only rich's own escapes reach stderr."""
    source = write_hostile_gguf(hostile_dir / "p[bold]\x1b[31m.gguf")
    output = hostile_dir / "pq\x1b]8;;x\x07.gguf"
    result = dynq("quantize", source, "-r", "uniform-q8_0", "-o", output, terminal=True)
    assert result.returncode == 0, result.stderr
    assert "\x1b]" not in result.stderr
    assert_inert(RICH_LIVE.sub("", result.stderr))
    assert_only_rich_escapes(result.stdout)
    assert RICH_SGR.sub("", result.stdout).startswith("wrote " + clean(output) + ": ")


def test_cli_imatrix(tiny_llama: Path, hostile_text: Path, hostile_dir: Path, cache: Path) -> None:
    output = hostile_dir / "i[bold]\x07\u202e.gguf"
    args = ["imatrix", str(tiny_llama), "--text", str(hostile_text), "-o", str(output), "--ctx", "32", "--chunks", "1"]
    stdout = cli(args).stdout
    assert output.exists()
    assert "wrote " + clean(output) + ": " in stdout
    assert "(" + clean(hostile_text.name) + ")" in stdout  # the provenance: the text file's name
    assert "t[bold]\\x1b[31m[link=x]\\u202e.txt" in stdout


def test_cli_eval(tiny_llama: Path, hostile_text: Path, hostile_dir: Path, cache: Path) -> None:
    quant = hostile_dir / "q[red]\x1b[31m\x9b2J.gguf"
    shutil.copyfile(tiny_llama, quant)  # the same weights under another hostile name: names are what is checked
    args = ["eval", str(quant), "--ref", str(tiny_llama), "--text", str(hostile_text), "--ctx", "32", "--chunks", "1"]
    stdout = cli(args).stdout
    title = squash(stdout)  # the title wraps at the table's width
    assert squash(clean(quant.name) + " against " + clean(tiny_llama.name)) in title
    assert "q[red]\\x1b[31m\\x9b2J.gguf" in title and "m[bold]\\x1b]8;;x\\x07.gguf" in title
    assert "kld_mean" in stdout


LOOP_TEXTS = [*HOSTILE, "  [/]\x1b[31m[link=https://x]y\n", "x\x1b]8;;http://x\x07y\u202e"]


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_loops(hostile_dir: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    """A tiny model's output cannot be steered: `generate` answers with hostile continuations instead."""
    model = hostile_dir / "m[bold]\x1b]8;;x\x07.gguf"
    runs = [Continuation("prose", "[/]p\x1b[2J", mode, text, 4, i % 3 == 0, 1 if i % 3 == 1 else None)
            for i, text in enumerate(LOOP_TEXTS) for mode in ("greedy", "sampled")]  # fmt: skip
    seen: list[Path] = []
    monkeypatch.setattr(api, "loops", lambda path, *a, **k: seen.append(path) or runs)
    stdout = cli(["loops", str(model), "--tokens", "4", *(["--json"] if as_json else [])]).stdout
    assert seen == [model]
    if as_json:
        back = json.loads(stdout)["continuations"]
        assert [c["text"] for c in back] == [c.text for c in runs]
        return
    assert stdout.startswith(clean(model.name) + ": loop rate ")
    for text in LOOP_TEXTS:
        assert clean(text.strip()[:160]) in stdout
    assert "[/]\\x1b[31m[link=https://x]y" in stdout and ":smile:" in stdout


def test_cli_offload(hostile_gguf: Path) -> None:
    output = cli(["offload", str(hostile_gguf), "--vram", "8GB"]).stdout
    assert output.startswith(clean(hostile_gguf) + " (llama): ")
    command = output.splitlines()[-1]
    assert command.startswith("llama-cli -m ") and clean(hostile_gguf) in command


def test_cli_split_and_merge(hostile_dir: Path) -> None:
    source = write_hostile_gguf(hostile_dir / "w[bold]\x1b[31m.gguf")
    stem = hostile_dir / "s[/]\x1b[31m\u202e"  # `[/]` splits the name into the folder `s[` and `]...`
    stem.parent.mkdir(exist_ok=True)
    output = cli(["split", str(source), "--shards", "2", "-o", str(stem) + ".gguf"]).stdout
    shards = sorted(stem.parent.glob(stem.name + "-*-of-00002.gguf"))
    assert len(shards) == 2
    for shard in shards:
        assert "wrote " + clean(shard) + " (" in output
    assert "[/]\\x1b[31m\\u202e-00001-of-00002.gguf" in output
    merged = hostile_dir / "merged\x9b\r.gguf"
    output = cli(["merge", str(shards[0]), "-o", str(merged)]).stdout
    assert output.startswith("wrote " + clean(merged) + ": ") and merged.exists()
    assert clean(NAME) in cli(["inspect", str(merged)]).stdout


def test_cli_export_ollama(tiny_llama: Path, hostile_dir: Path) -> None:
    folder = hostile_dir / "o[bold]\x1b[31m\u202e"
    result = cli(["export-ollama", str(tiny_llama), "-o", str(folder)])
    # the model file is named for Ollama (letters, digits, . _ -): a name cannot reach the Modelfile as markup
    gguf, modelfile = folder / f"{ollama_name(tiny_llama.stem)}.gguf", folder / "Modelfile"
    assert gguf.exists() and modelfile.exists()
    # these lines wrap at the console's width (160 columns when piped): compared without whitespace
    assert squash(f"wrote {clean(gguf)} and {clean(modelfile)} (template: ") in squash(result.stdout)
    assert squash(clean(shlex.join(["ollama", "create", gguf.stem, "-f", str(modelfile)]))) in squash(result.stdout)


def test_cli_run_a_real_model(tiny_llama: Path) -> None:
    prompt = "[/]hi\x1b[31m[link=https://x]y\u202e"
    result = cli(["run", str(tiny_llama), "-p", prompt, "-n", "2", "--seed", "1", "--ctx", "64"])
    assert result.stdout.startswith(clean(prompt))  # a completion echoes its prompt, then the model's pieces
    assert clean(tiny_llama.name) + ": GPU layers " in result.stderr


# --- the error path: one line on stderr, the path escaped ----------------------------------------------------------

# a path component (what follows `[/` is a file under the folder `[`); its line break must not split the error line
BAD = "[/]\x1b[31m[link=https:x]y\u202e\u200f\nFROM ./evil"


# id, the command line, and which placeholder names the path the error must show.
# {missing}: a file under a folder `[` that does not exist; {nodir}: an output file in a folder that does not exist.
ERRORS: list[tuple[str, list[str], str]] = [
    ("inspect", ["inspect", "{missing}.gguf"], "{missing}.gguf"),
    ("plan", ["plan", "{missing}.gguf", "-r", "uniform-q8_0"], "{missing}.gguf"),
    ("plan --imatrix", ["plan", "{model}", "-r", "uniform-q8_0", "--imatrix", "{missing}.gguf"], "{missing}.gguf"),
    ("compare", ["compare", "{model}", "-r", "uniform-q8_0", "-r", "{missing}.yaml"], "{missing}.yaml"),
    ("quantize", ["quantize", "{missing}.gguf", "-r", "uniform-q8_0", "-o", "{out}"], "{missing}.gguf"),
    ("quantize -o", ["quantize", "{model}", "-r", "uniform-q8_0", "-o", "{nodir}"], "{nodir}"),
    ("offload", ["offload", "{missing}.gguf", "--vram", "8GB"], "{missing}.gguf"),
    ("imatrix --text", ["imatrix", "{model}", "--text", "{missing}.txt", "-o", "{out}"], "{missing}.txt"),
    ("eval --ref", ["eval", "{model}", "--ref", "{missing}.gguf", "--text", "{text}", "--ctx", "32"], "{missing}.gguf"),
    ("run", ["run", "{missing}.gguf", "-p", "hi"], "{missing}.gguf"),
    ("split", ["split", "{missing}.gguf", "--shards", "2"], "{missing}.gguf"),
    ("merge", ["merge", "{missing}.gguf"], "{missing}.gguf"),
    ("export-ollama", ["export-ollama", "{missing}.gguf", "-o", "{out}"], "{missing}.gguf"),
    ("loops", ["loops", "{missing}.gguf", "--tokens", "4"], "{missing}.gguf"),
    ("loops unloadable", ["loops", "{unloadable}", "--tokens", "4"], "{unloadable}"),
    ("synthetic -o", ["synthetic", "llama", "-o", "{nodir}"], "{nodir}"),
    ("imatrix -o", ["imatrix", "{model}", "--text", "{text}", "-o", "{nodir}", "--ctx", "32", "--chunks", "1"],
     "{nodir}"),
]  # fmt: skip


@pytest.fixture(scope="module")
def error_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, hostile_text: Path, hostile_gguf: Path
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every command of ERRORS, run side by side, each a real `python -m dynq.cli` (they take a second each, mostly
    imports): id -> (the finished process, the path its error must name)."""
    root = tmp_path_factory.mktemp("errors")
    values = {"{missing}": str(root / BAD), "{nodir}": str(root / "no[/]\x1b[31m" / "out.gguf"),
              "{model}": str(tiny_llama), "{text}": str(hostile_text), "{unloadable}": str(hostile_gguf)}  # fmt: skip

    def fill(arg: str, i: int) -> str:
        for key, value in values.items():
            arg = arg.replace(key, value)
        return arg.replace("{out}", str(root / f"out-{i}.gguf"))

    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TERM")}
    env |= {"NO_COLOR": "1", "DYNQ_CACHE_DIR": str(root / "cache")}

    def run(i: int) -> tuple[subprocess.CompletedProcess[str], Path]:
        _, args, bad = ERRORS[i]
        cmd = [sys.executable, "-m", "dynq.cli", *(fill(a, i) for a in args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120), Path(fill(bad, i))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip((e[0] for e in ERRORS), pool.map(run, range(len(ERRORS))), strict=True))


@pytest.mark.parametrize("case", [name for name, _, _ in ERRORS])
def test_cli_error_names_the_path_escaped_on_one_line(
    case: str, error_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    result, bad = error_runs[case]
    assert_inert(result.stderr)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert one_line(bad) in result.stderr  # visible as text: `[/]`, `\x1b[31m`, `[link=...]`, `\u202e`, `\n`
    assert "\\x1b[31m" in result.stderr and "[/" in result.stderr


@pytest.mark.parametrize("terminal", [False, True])
def test_cli_error_on_a_terminal(tmp_path: Path, terminal: bool) -> None:
    bad = tmp_path / (BAD + ".gguf")
    result = dynq("inspect", bad, terminal=terminal)
    assert result.returncode == 1 and result.stdout == ""
    assert_only_rich_escapes(result.stderr)
    assert RICH_SGR.sub("", result.stderr) == f"error: {one_line(bad)}: no such file\n"
    assert (RICH_SGR.sub("", result.stderr) != result.stderr) == terminal  # `error:` is drawn in bold red


# --- file names that are not UTF-8 ---------------------------------------------------------------------------------


# A file name that is not UTF-8 reaches Python as lone surrogates (surrogateescape); unescaped, stdout would write the
# raw byte (0x9b: a C1 CSI on an 8-bit terminal) or, with a strict encoder, the command would die with
# UnicodeEncodeError.
UNDECODABLE = os.fsdecode(b"u\x9b2J\xff.gguf")


def test_clean_escapes_undecodable_bytes() -> None:
    assert not re.search("[\ud800-\udfff]", clean(UNDECODABLE))


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_cli_undecodable_file_name(errors: str, tmp_path: Path) -> None:
    path = write_synthetic("llama", tmp_path / UNDECODABLE)
    args = ["synthetic", "llama", "-o", os.fsencode(path), "--force"]  # the file is there: written again
    result = subprocess.run([sys.executable, "-m", "dynq.cli", *args], capture_output=True,
                            env=os.environ | {"PYTHONIOENCODING": f"utf-8:{errors}"}, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    stdout = result.stdout.decode("utf-8")  # valid UTF-8: no raw byte from the name
    assert_inert(stdout)
    assert stdout.startswith("wrote ") and "2J" in stdout
