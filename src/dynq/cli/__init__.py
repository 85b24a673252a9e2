"""The `dynq` command: a typer shell over the public API. It parses options, fetches what a command needs before it
calls the library (the library never downloads), draws, and says the library's typed errors in its own flags. It
imports nothing but `dynq`'s public API, `dynq.errors` and the `dynq.core` vocabulary (tests/test_layers.py)."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Annotated

import typer
from rich.text import Text

from dynq.cli import budget, deploy, measure, offload, quantize
from dynq.cli.shell import err, setup_logging
from dynq.core.visible import one_line
from dynq.errors import DynqError, LeftoverRun, OutputExists, ResumeRequired

app = typer.Typer(
    help="Dynamic low-bit GGUF quantization: plan every tensor's type, then quantize, evaluate and deploy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    logging.getLogger("dynq").setLevel(logging.INFO if verbose else logging.WARNING)


for _commands in (quantize, measure, budget, offload, deploy):
    _commands.register(app)


def _terminated(signum: int, frame: FrameType | None) -> None:
    # A `kill` ends the run as Ctrl-C does: outputs are closed, an interrupted quantize is kept for --resume.
    raise KeyboardInterrupt


def in_flags(e: DynqError) -> str:
    """The library's message, with what a caller may do said in the command's own options."""
    if isinstance(e, OutputExists):
        return f"{e.path}: already exists; remove it or pass --force"
    if isinstance(e, ResumeRequired):
        return f"{e.subject}: {e.left} in {e.folder}; add --resume to continue it, or delete that folder to start over"
    if isinstance(e, LeftoverRun):
        return f"{e.subject}: {e.left} in {e.folder}; pass --force to start over, or delete that folder"
    return str(e)


def main() -> None:
    setup_logging()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except DynqError as e:
        shown = Text(one_line(in_flags(e)))  # one line, even when a path in it holds a newline
        err.print(Text.assemble(("error:", "bold red"), " ", shown), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
