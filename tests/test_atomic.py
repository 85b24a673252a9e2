"""core/atomic: the whole new file or the old one, and no temporary file left behind either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynq.core.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_writes_replace_the_file_and_leave_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    assert atomic_write_text(target, "new ü\n") == target
    assert target.read_bytes() == "new ü\n".encode()
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name != target.name
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
