"""Text is data, never markup: hostile names, paths, metadata and completions reach the terminal verbatim-visible,
never as rich markup and never as raw control characters."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
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

from dynq import api, cli_deploy
from dynq.cli_offload import draw_offload
from dynq.cli_render import draw_comparison, draw_imatrix_coverage, draw_plan, draw_summary
from dynq.cli_text import clean, data, line
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.deploy.memory import GIB
from dynq.deploy.offload import Hardware, offload
from dynq.deploy.ollama import Modelfile, OllamaExport
from dynq.deploy.run import Generation, Offload
from dynq.deploy.shards import ShardsWritten
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
]
NAME = "[/]\x1b[31mred[link=http://evil]x"  # general.name
RULE = "[/]\x1b?|\\[link="  # a rule's regex, which the plan quotes as the reason
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
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


# --- cli_deploy: streamed completions, paths, template problems ---------------------------------------------

PIECES = ["Hello [/] ", "\x1b", "[31mred", "\x1b]8;;http://x", "\x07 \u202e", "\x9b2J", "[link=https://x]y[/link]\r"]


class FakeRunner:
    """A model that answers with hostile text, token piece by token piece."""

    def __init__(self, path: Path, *args: object, **kwargs: object) -> None:
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
    monkeypatch.setattr(cli_deploy, "Runner", FakeRunner)
    monkeypatch.setattr(cli_deploy, "_model_file", lambda spec: Path("/m/[/x]") / spec)
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


def test_merge_split_and_export_print_paths_as_data(
    deploy_app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "[/x]"
    folder.mkdir(parents=True)
    files = [folder / f"m[bold]\x1b[31m-0000{i}-of-00002.gguf" for i in (1, 2)]
    for f in files:
        f.write_bytes(b"GGUF")
    monkeypatch.setattr(cli_deploy, "merge", lambda *a, **k: ShardsWritten(files[:1], 3, 100))
    monkeypatch.setattr(cli_deploy, "split", lambda *a, **k: ShardsWritten(files, 3, 100))
    problem = "[/]the template says \x1b[31m[link=https://x]y[/link]"
    modelfile = Modelfile("", None, problems=[problem])
    monkeypatch.setattr(
        cli_deploy, "export_ollama", lambda *a, **k: OllamaExport(files[0], folder / "Model[/]file", modelfile)
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
