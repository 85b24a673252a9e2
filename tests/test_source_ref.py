"""Worker tasks name their source by a SourceRef: it pickles, reopens the same source in a worker, refuses a file that
changed since the driver read it, and the three task types (encode, errors, probe) built on it still give what a run
in one process gives."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import dynq
from dynq.budget.distortion import ErrorsTask
from dynq.budget.profile import ProbeTask, profile
from dynq.calib.text import Text
from dynq.errors import DynqError
from dynq.executors import LocalProcesses, Serial
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from dynq.quantize import EncodeTask
from dynq.sources.described import describe
from dynq.sources.ref import SourceRef
from tiny_models import llama_tensors, write_gguf

T = TypeVar("T")
R = TypeVar("R")
TEXT = Text(" ".join(f"the {w} of and to in def return" for w in "abcdefghijklmnopqrstuvwxyz" * 20), "test-calib")


class Pickled(Serial):
    """Runs each task here after a round trip through pickle, as a worker process or Ray would get it; keeps them."""

    name = "pickled"

    def __init__(self) -> None:
        self.tasks: list[object] = []

    def ordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        for task in tasks:
            copy = pickle.loads(pickle.dumps(task))
            assert copy == task or isinstance(task, EncodeTask)  # an EncodeTask holds arrays: no == for it
            self.tasks.append(copy)
            yield fn(copy)


def test_a_reference_pickles_and_reopens_the_same_source(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_gguf.parent)  # a relative spec: the reference holds the absolute path a worker can open
    source = describe(Path(tiny_gguf.name), tiny_gguf.name, tmp_path)
    ref = SourceRef.of(source, tmp_path)
    assert ref == SourceRef(str(tiny_gguf.resolve()), GGUFModel(tiny_gguf).fingerprint(), str(tmp_path))
    again = pickle.loads(pickle.dumps(ref))
    assert again == ref and again.reopen().inventory().tensors == source.inventory().tensors
    assert again.reopen() is again.reopen()  # opened once per worker
    assert isinstance(again.reopen_gguf(), GGUFModel)


def test_a_file_changed_since_the_driver_read_it_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_gguf(path, llama_tensors(seed=0))
    ref = SourceRef.of(describe(path, str(path), tmp_path / "cache"), tmp_path / "cache")
    other = tmp_path / "other.gguf"
    write_gguf(other, llama_tensors(seed=1))
    other.replace(path)  # the same name and size, other weights
    with pytest.raises(DynqError, match="this worker's copy differs from the driver's") as caught:
        ref.reopen()
    assert "\n" not in str(caught.value)
    with pytest.raises(DynqError, match="not a GGUF file"):
        SourceRef.of(dynq.open_source("shapes:mixtral-8x7b"), tmp_path).reopen_gguf()


def test_encode_tasks_pickle_and_give_the_same_bytes(tiny_gguf: Path, tmp_path: Path) -> None:
    ctx = dynq.RunContext(threads=1, cache_dir=tmp_path / "cache")
    plan = dynq.plan(str(tiny_gguf), "uniform-q4_k")
    here = dynq.quantize(plan, tmp_path / "here.gguf", ctx=ctx).files[0]
    pool = Pickled()
    there = dynq.quantize(plan, tmp_path / "there.gguf", ctx=ctx, executor=pool).files[0]
    assert pool.tasks and all(isinstance(t, EncodeTask) for t in pool.tasks)
    assert there.read_bytes() == here.read_bytes()
    workers = LocalProcesses(1)  # a real worker process: spawned, so it reopens the source by the reference
    try:
        local = dynq.quantize(plan, tmp_path / "local.gguf", ctx=ctx, executor=workers).files[0]
    finally:
        workers.close()
    assert local.read_bytes() == here.read_bytes()


def run_profile(model: Path, cache: Path, executor: Serial | None = None) -> dynq.Profile:
    ctx = dynq.RunContext(threads=1, cache_dir=cache)
    return profile(model, None, TEXT, types=("Q4_K", "Q8_0"), rows=32, group_blocks=8, n_ctx=64, chunks=1, ctx=ctx,
                   executor=executor)  # fmt: skip


def test_errors_and_probe_tasks_pickle_and_measure(tmp_path: Path) -> None:
    model = write_synthetic("llama", tmp_path / "tiny.gguf")
    pool = Pickled()
    there = run_profile(model, tmp_path / "a", pool)
    assert {type(t) for t in pool.tasks} == {ErrorsTask, ProbeTask}
    specs = {t.source.spec for t in pool.tasks if isinstance(t, ErrorsTask | ProbeTask)}
    assert specs == {str(model.resolve())}
    here = run_profile(model, tmp_path / "b")
    assert {n: t.errors for n, t in there.tensors.items()} == {n: t.errors for n, t in here.tensors.items()}
    assert [p.kld for p in there.probes] == pytest.approx([p.kld for p in here.probes], rel=1e-6)
