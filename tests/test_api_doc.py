"""docs/api.md's session runs as written: its python blocks in order, in one namespace, in a fresh folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.model  # the session fetches smollm2-135m
DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_a_session() -> None:
    assert len(blocks()) >= 4


def test_the_session_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
    assert (tmp_path / "smollm2-edited.gguf").stat().st_size > 0
