from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dynq.core.tensors import TensorClass
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import summarize
from tiny_models import llama_tensors

EXPECTED = {name: (values, qtype) for name, values, qtype in llama_tensors()}
# worst-case absolute error of the stored type on unit-normal values
TOLERANCE = {"F32": 0.0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_0": 0.5}


def check_model(model: GGUFModel) -> None:
    assert model.arch == "llama"
    assert model.metadata["general.name"] == "tiny-test"
    assert model.metadata["llama.block_count"] == 2
    assert {t.name for t in model.tensors} == set(EXPECTED)
    for info in model.tensors:
        values, qtype = EXPECTED[info.name]
        assert info.dtype.name == qtype.name
        assert info.shape == tuple(reversed(values.shape))  # GGUF order: row length first
        got = model.load(info.name)
        assert got.dtype == np.float32 and got.shape == values.shape
        assert np.abs(got - values).max() <= TOLERANCE[info.dtype.name] * max(1.0, np.abs(values).max())


def test_single_file(tiny_gguf: Path) -> None:
    model = GGUFModel(tiny_gguf)
    assert model.shards == [tiny_gguf]
    check_model(model)


def test_split_file_reads_as_one_model(tiny_split: Path) -> None:
    model = GGUFModel(tiny_split)
    assert len(model.shards) > 1
    assert "split.count" not in model.metadata
    check_model(model)
    # any shard names the whole model
    assert {t.name for t in GGUFModel(model.shards[-1]).tensors} == set(EXPECTED)


def test_missing_shard(tiny_split: Path, tmp_path: Path) -> None:
    for shard in GGUFModel(tiny_split).shards[:-1]:
        shutil.copy(shard, tmp_path / shard.name)
    with pytest.raises(DynqError, match="missing shard"):
        GGUFModel(tmp_path / tiny_split.name)


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(DynqError, match="not a GGUF file"):
        GGUFModel(path)
    with pytest.raises(DynqError, match="no such file"):
        GGUFModel(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_truncated(tiny_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DynqError, match="truncated"):
        GGUFModel(path)


def test_summary(tiny_gguf: Path) -> None:
    s = summarize(GGUFModel(tiny_gguf))
    assert s.n_tensors == len(EXPECTED)
    assert s.type_counts["F32"] == 5
    assert s.n_parameters == sum(v.size for v, _ in EXPECTED.values())
    assert s.total_bytes < s.file_bytes
    assert set(s.classes) == {TensorClass.ATTENTION, TensorClass.DENSE_FFN, TensorClass.EMBEDDINGS,
                              TensorClass.OUTPUT, TensorClass.OTHER}  # fmt: skip
    assert s.classes[TensorClass.EMBEDDINGS].bpw == 8.5
    assert s.metadata["llama.block_count"] == 2
