"""Errors are typed: a caller tells "output exists", "resume or delete", "not fetched yet" and "bad input" apart by
type and data, library messages name no CLI flag, and the CLI words them in its own options."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dynq
from dynq.cli import in_flags
from dynq.lab.synthetic import write_synthetic

SRC = Path(__file__).resolve().parents[1] / "src" / "dynq"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_no_library_message_names_a_cli_flag() -> None:
    """Every string inside a `raise` outside the CLI modules is free of `--option` words (a command quoted in
    backticks, or pip's, aside)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise):
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        text = re.sub(r"`[^`]*`", "", const.value)
                        if FLAG.search(text) and "pip " not in text:
                            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {text}")
    assert found == []


def test_an_existing_output_is_refused_by_type(tmp_path: Path) -> None:
    model = write_synthetic("llama", tmp_path / "tiny.gguf")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"someone else's")
    with pytest.raises(dynq.OutputExists) as caught:
        dynq.quantize(dynq.plan(model, "q8_0"), out)
    assert caught.value.path == out and out.read_bytes() == b"someone else's"
    assert "--force" not in str(caught.value) and "pass --force" in in_flags(caught.value)


def test_the_cli_words_a_resume_in_its_option() -> None:
    e = dynq.ResumeRequired("out.gguf", "an interrupted run left 3 written tensors", Path("out.gguf.partial"))
    assert "resume=True" in str(e) and "--resume" not in str(e)
    assert in_flags(e) == ("out.gguf: an interrupted run left 3 written tensors in out.gguf.partial; add --resume to "
                           "continue it, or delete that folder to start over")  # fmt: skip


def test_missing_cache_and_bad_recipes_are_typed(tmp_path: Path) -> None:
    with pytest.raises(dynq.NotCached) as caught:
        dynq.open_source("zoo:smollm2-135m", ctx=dynq.RunContext(cache_dir=tmp_path))
    assert caught.value.fetch == "zoo:smollm2-135m"
    with pytest.raises(dynq.VersionMismatch):
        dynq.recipe_from_dict({"version": 99, "name": "x", "default": "Q8_0"}, "test")
    with pytest.raises(dynq.BadInput, match="rules"):
        dynq.recipe_from_dict({"name": "x", "rules": "no"}, "test")
