"""Short ways for tests to drive the public API the way a user's script does."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dynq
from dynq.executors import Serial

T = TypeVar("T")
R = TypeVar("R")

TWO_THREADS = dynq.RunContext(threads=2)


def quantize_to(source: str | Path, recipe: str, output: Path, **options: Any) -> dynq.QuantizeResult:
    """Plan `recipe` on `source` and quantize it into `output` on two threads (options go to dynq.quantize)."""
    options.setdefault("ctx", TWO_THREADS)
    return dynq.quantize(dynq.plan(str(source), recipe), output, **options)


def measurements(profile_file: Path) -> dict[str, Any]:
    """A saved profile without its timings: what two runs of the same profile must agree on."""
    data: dict[str, Any] = json.loads(profile_file.read_text())
    data.pop("seconds")
    for p in data["probes"]:
        p.pop("seconds")
    return data


class OneThreadTasks(Serial):
    """Runs tasks here, one after another, as an executor that gives each task one CPU (as Ray does); records the
    tasks it ran, as they would travel."""

    name = "one thread per task"
    task_threads = 1

    def __init__(self) -> None:
        self.tasks: list[object] = []

    def ordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        for task in tasks:
            self.tasks.append(task)
            yield fn(task)
