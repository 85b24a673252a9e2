from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import llama_tensors, write_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, llama_tensors())
    return path


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model in shards of 8 tensors; returns the first shard."""
    folder = tmp_path_factory.mktemp("split")
    write_gguf(folder / "tiny.gguf", llama_tensors(), split_max_tensors=8)
    shards = sorted(folder.glob("tiny-*-of-*.gguf"))
    assert len(shards) > 1
    return shards[0]
