"""The commands README.md and docs/ show stay true: every `$ dynq ...` line names a command and options that exist,
and the ones that need no files (shape inventories, presets) are run, each table row shown found in today's output."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynq.cli import app
from test_cli_options import options

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ROOT_FLAGS = {"--verbose", "-v", "--help"}


def shown(page: Path) -> list[tuple[list[str], list[str]]]:
    """Each `$ dynq ...` command of the page's code blocks (as arguments, after `dynq`) and the output lines shown
    under it, up to the next command or the block's end."""
    found: list[tuple[list[str], list[str]]] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ dynq "):
                found.append((shlex.split(line[2:], comments=True)[1:], []))
            elif line.startswith("$ "):
                found.append(([], []))  # another program: its output is not dynq's
            elif found:
                found[-1][1].append(line)
    return [(args, out) for args, out in found if args]


def test_the_pages_show_commands() -> None:
    assert sum(len(shown(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_exists_with_its_options(page: Path) -> None:
    commands = options()
    for args, _ in shown(page):
        while args and args[0] in ROOT_FLAGS:
            args = args[1:]
        assert args and args[0] in commands, (page.name, args)
        flags = {f for fs in commands[args[0]].values() for f in fs} | {"--help"}
        unknown = [a.split("=")[0] for a in args[1:] if a.startswith("-") and a.split("=")[0] not in flags
                   and not re.fullmatch(r"-\d.*", a)]  # fmt: skip
        assert unknown == [], (page.name, args[0], unknown)


def file_free(args: list[str]) -> bool:
    return (
        bool(args)
        and args[0] in ("plan", "compare", "presets", "offload")
        and all(not a.endswith((".gguf", ".yaml", ".json", ".png")) and not a.startswith("zoo:") for a in args)
    )


def test_the_file_free_commands_print_what_the_pages_show() -> None:
    runner, checked = CliRunner(), 0
    for page in PAGES:
        for args, out in shown(page):
            rows = [line.rstrip() for line in out if line.startswith("│")]
            if not file_free(args) or not rows:
                continue
            ran = runner.invoke(app, args, env={"COLUMNS": "200"})
            assert ran.exit_code == 0, (page.name, args, ran.output)
            today = {line.rstrip() for line in ran.output.splitlines()}
            missing = [row for row in rows if row not in today]
            assert missing == [], (page.name, " ".join(args), missing)
            checked += 1
    assert checked >= 3
