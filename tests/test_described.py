"""A GGUF file's remembered description plans exactly like the file itself, and is never trusted once the file
changes or the memo is damaged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

import dynq
from dynq.gguf_io.reader import GGUFModel
from dynq.sources.described import describe


def _memos(cache: Path) -> list[Path]:
    return sorted((cache / "described").glob("*.json"))


def test_description_plans_like_the_file(tiny_gguf: Path, tmp_path: Path) -> None:
    model = GGUFModel(tiny_gguf)
    first = describe(tiny_gguf, str(tiny_gguf), tmp_path)
    again = describe(tiny_gguf, str(tiny_gguf), tmp_path)
    assert len(_memos(tmp_path)) == 1
    assert "model" not in again.__dict__  # read from the memo: the GGUF was not parsed again
    for d in (first, again):
        assert d.inventory() == model.inventory()
        assert d.fingerprint() == model.fingerprint()
    name = model.tensors[0].name
    assert np.array_equal(again.load(name), model.load(name))  # weights still come from the file
    assert again.metadata_fields() == model.metadata_fields()


def test_split_model_is_described_whole(tiny_split: Path, tmp_path: Path) -> None:
    assert describe(tiny_split, str(tiny_split), tmp_path).inventory() == GGUFModel(tiny_split).inventory()


def test_changed_file_is_described_again(tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, path)
    cache = tmp_path / "cache"
    describe(path, str(path), cache)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert "model" in describe(path, str(path), cache).__dict__  # parsed again, not taken from the old memo
    assert len(_memos(cache)) == 2


def test_damaged_memo_is_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    describe(tiny_gguf, str(tiny_gguf), tmp_path)
    (memo,) = _memos(tmp_path)
    memo.write_text('{"version": 1, "tensors": [')
    d = describe(tiny_gguf, str(tiny_gguf), tmp_path)
    assert d.inventory() == GGUFModel(tiny_gguf).inventory()
    assert "model" not in describe(tiny_gguf, str(tiny_gguf), tmp_path).__dict__


def test_plan_uses_the_description(tiny_gguf: Path, tmp_path: Path) -> None:
    ctx = dynq.RunContext(cache_dir=tmp_path)
    assert dynq.plan(tiny_gguf, "uniform-q4_0", ctx=ctx) == dynq.plan(GGUFModel(tiny_gguf), "uniform-q4_0")
    assert len(_memos(tmp_path)) == 1
