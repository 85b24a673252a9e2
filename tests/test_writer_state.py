"""The streaming writer is an explicit state machine (declare, begin, write or keep, then finish or abort): a call out
of order is refused with a WriterStateError, a programmer's error, before it touches a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from dynq.core.qtypes import qtype
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.writer import StreamingWriter, WriterState, WriterStateError

TENSORS = [TensorInfo(f"blk.{i}.attn_norm.weight", (8,), qtype("F32")) for i in range(3)]


def data(i: int) -> np.ndarray:
    return np.full(8, i, dtype=np.float32).view(np.uint8)


def declared(out: Path, resume: bool = False) -> StreamingWriter:
    w = StreamingWriter(out, "llama", resume=resume)
    for t in TENSORS:
        w.declare(t, 32, GGMLQuantizationType.F32)
    return w


def test_calls_out_of_order_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    w = declared(out)
    assert w.state is WriterState.DECLARING
    for early in (lambda: w.write(data(0)), w.keep, w.finish):
        with pytest.raises(WriterStateError, match=r"while DECLARING; it is allowed while WRITING"):
            early()
    w.begin()
    assert w.state is WriterState.WRITING
    with pytest.raises(WriterStateError, match=r"declare\(\) while WRITING"):
        w.declare(TensorInfo("late.weight", (8,), qtype("F32")), 32, GGMLQuantizationType.F32)
    with pytest.raises(WriterStateError, match=r"begin\(\) while WRITING"):
        w.begin()
    with pytest.raises(WriterStateError, match=r"keep\(\) of tensor 1, but 0 were kept"):
        w.keep()
    w.write(data(0))
    with pytest.raises(WriterStateError, match=r"finish\(\) after 1 of 3 tensors"):
        w.finish()
    w.write(data(1))
    w.write(data(2))
    with pytest.raises(WriterStateError, match=r"write\(\) of tensor 4; 0 kept, 3 declared"):
        w.write(data(3))
    assert w.finish() == [out]
    assert w.state is WriterState.FINISHED
    for late in (lambda: w.write(data(0)), w.finish, lambda: w.abort(keep=True)):
        with pytest.raises(WriterStateError, match="while FINISHED"):
            late()
    model = GGUFModel(out)  # the refused calls changed nothing in what was written
    assert [t.name for t in model.inventory().tensors] == [t.name for t in TENSORS]
    assert np.array_equal(model.load(TENSORS[2].name), np.full(8, 2, dtype=np.float32))
    assert issubclass(WriterStateError, RuntimeError) and not issubclass(WriterStateError, DynqError)


def test_an_aborted_writer_refuses_everything(tmp_path: Path) -> None:
    w = declared(tmp_path / "out.gguf")
    w.begin()
    w.write(data(0))
    assert w.abort(keep=False) == 0
    assert w.state is WriterState.ABORTED and not any(tmp_path.iterdir())
    for late in (lambda: w.write(data(1)), w.finish, lambda: w.abort(keep=False), w.begin):
        with pytest.raises(WriterStateError, match="while ABORTED"):
            late()


def test_a_resumed_writer_keeps_before_it_writes(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    first = declared(out)
    first.begin()
    first.write(data(0))
    first.write(data(1))
    assert first.abort(keep=True) == 2
    w = declared(out, resume=True)
    w.begin()
    assert w.resumed == 2
    with pytest.raises(WriterStateError, match=r"write\(\) of tensor 1; 2 kept"):
        w.write(data(0))  # over a kept tensor: the journal would record it twice
    w.keep()
    w.keep()
    with pytest.raises(WriterStateError, match=r"keep\(\) of tensor 3, but 2 were kept"):
        w.keep()
    w.write(data(2))
    w.finish()
    assert np.array_equal(GGUFModel(out).load(TENSORS[1].name), np.full(8, 1, dtype=np.float32))
