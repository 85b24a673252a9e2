"""What every command shares: the two consoles, one progress bar for the one progress shape, the run context, and
the explicit set-up steps (fetching a zoo model or the texts) a command performs before it calls the library."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dynq import api
from dynq.cli.text import clean, line
from dynq.core.context import Progress as Step
from dynq.core.context import ProgressFn, RunContext, default_threads

THREADS = default_threads()
# Piped output (files, CI logs) gets a wide table instead of rich's 80-column default.
out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


class _CleanFormatter(logging.Formatter):
    """Log records carry names and paths from files: shown cleaned, like every other piece of data."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record))


def setup_logging() -> None:
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    handler.setFormatter(_CleanFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """A transient bar on stderr fed by dynq's one progress shape; byte counts show as sizes, other units as N/M.
    Off a terminal (logs, pipes) there is no bar: it would only leave an empty line behind."""
    if not err.is_terminal:
        yield lambda step: None
        return
    # Columns render their text as plain text (markup=False): stages and details hold tensor names and paths.
    columns: tuple[ProgressColumn, ...] = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[amount]}", markup=False),
        TextColumn("{task.fields[detail]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    sizes, counts = DownloadColumn(), MofNCompleteColumn()
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(clean(description), total=None, detail="", amount="")

        def on_step(step: Step) -> None:
            bar.update(task, total=step.total, completed=step.done)
            shown = bar.tasks[task]
            amount = sizes.render(shown) if step.unit == "bytes" else counts.render(shown)
            bar.update(task, description=clean(step.stage), detail=clean(step.detail),
                       amount=f"{amount.plain} {'' if step.unit == 'bytes' else step.unit}".rstrip())  # fmt: skip

        yield on_step


@contextmanager
def elsewhere(ray: str | None, processes: int) -> Iterator[api.Executor | None]:
    """The executor `--ray ADDRESS` or `--processes N` ask for (None: this process), closed afterwards."""
    if not ray and processes <= 1:
        yield None
        return
    chosen = api.executor(ray=ray, processes=processes)
    err.print(Text.assemble("encoding on ", clean(chosen.name)), highlight=False)
    try:
        yield chosen
    finally:
        chosen.close()


def run_context(threads: int = THREADS, device: str | None = None, progress: ProgressFn | None = None) -> RunContext:
    return RunContext(threads=threads, device=device, progress=progress)


def ensure_source(spec: str) -> str:
    """A zoo model is fetched before the library opens it (the library never downloads); others pass through."""
    if api.needs_fetch(spec):
        fetch(spec)
    return spec


def ensure_texts() -> None:
    if api.needs_fetch(api.TEXTS):
        with err.status("fetching the built-in calibration and evaluation texts"):
            api.fetch(api.TEXTS, ctx=run_context())


def fetch(name: str) -> Path:
    with progress_bar(f"fetching {name}") as on_step:
        return api.fetch(name, ctx=run_context(progress=on_step))


def say(*parts: str | Text, console: Console = out) -> None:
    """One line of the program's words (str) and data pieces (`data(...)`): all of it plain text, never markup."""
    console.print(line(*parts), highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
