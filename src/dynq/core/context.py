"""The run context: what a library call needs from its caller (threads, device, cache folder, progress, logger),
passed explicitly so that nothing in dynq reads or changes process-wide settings on its own."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dynq.paths import cache_dir


@dataclass(frozen=True)
class Progress:
    """One shape of progress for every long step: `done` of `total` `unit`s ("bytes", "chunks", "parts") in
    `stage` ("quantize", "imatrix", "reference", "eval", "copy", "fetch"); `detail` says what is being worked on."""

    stage: str
    done: int
    total: int | None
    unit: str
    detail: str = ""


ProgressFn = Callable[[Progress], None]


def default_threads() -> int:
    """Every CPU core: what a run uses when its caller names no thread count."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class RunContext:
    """Threads for llama.cpp and the encoders; the torch device (None: CUDA when present); where fetched models,
    texts, references and encoded tensors are cached; a progress callback; the logger run-level messages go to."""

    threads: int = field(default_factory=default_threads)
    device: str | None = None
    cache_dir: Path = field(default_factory=cache_dir)
    progress: ProgressFn | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("dynq"))

    def report(self, stage: str, done: int, total: int | None, unit: str, detail: str = "") -> None:
        if self.progress is not None:
            self.progress(Progress(stage, done, total, unit, detail))


def context(ctx: RunContext | None) -> RunContext:
    """`ctx`, or the defaults when the caller gave none."""
    return ctx if ctx is not None else RunContext()
