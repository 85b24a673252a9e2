"""The `dynq` command: a typer shell over the public API. It parses options, fetches what a command needs before it
calls the library (the library never downloads), draws, and says the library's typed errors in its own flags. It
imports nothing but `dynq`'s public API, `dynq.errors` and the `dynq.core` vocabulary (tests/test_layers.py)."""

from __future__ import annotations

import inspect
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

# `dynq --help` in groups, each command's help ending with one example.
PANELS: dict[str, tuple[str, str]] = {
    "inspect": ("Plan", "dynq inspect zoo:smollm2-135m"),
    "presets": ("Plan", "dynq presets"),
    "plan": ("Plan", "dynq plan shapes:deepseek-r1 -r dyn-iq1_s --no-tensors"),
    "compare": ("Plan", "dynq compare shapes:deepseek-r1 -r uniform-iq1_s -r dyn-iq1_s"),
    "profile": ("Plan", "dynq profile model-f16.gguf --imatrix model.imatrix.gguf -o model.profile"),
    "solve": ("Plan", "dynq solve model-f16.gguf --profile model.profile --target 600MiB -o mix.yaml"),
    "fetch": ("Make", "dynq fetch zoo:qwen2.5-coder-1.5b"),
    "imatrix": ("Make", "dynq imatrix model-f16.gguf -o model.imatrix.gguf --chunks 32"),
    "quantize": ("Make", "dynq quantize model-f16.gguf --target 600MiB --imatrix model.imatrix.gguf -o model.gguf"),
    "rotate": ("Make", "dynq rotate model-f16.gguf -o model-rot-f16.gguf"),
    "synthetic": ("Make", "dynq synthetic deepseek2 -o tiny-deepseek2.gguf"),
    "build-tools": ("Make", "dynq build-tools"),
    "eval": ("Judge", "dynq eval model.gguf --ref model-f16.gguf --chunks 8"),
    "bench": ("Judge", "dynq bench model-f16.gguf -r dyn-iq1_s --llama-mix IQ1_S --solve-at llama:IQ1_S"),
    "loops": ("Judge", "dynq loops model.gguf --tokens 128"),
    "run": ("Run", 'dynq run model.gguf --chat -p "Write fizzbuzz in Python"'),
    "export-ollama": ("Run", "dynq export-ollama model.gguf -o ollama/"),
    "card": ("Run", "dynq card model.gguf -o README.md"),
    "offload": ("Scale", "dynq offload shapes:deepseek-r1 -r dyn-iq1_s --vram 24GB --ram 192GB"),
    "split": ("Scale", "dynq split model.gguf --max-size 40G -o parts/model.gguf"),
    "merge": ("Scale", "dynq merge parts/model-00001-of-00003.gguf -o model.gguf"),
}
ORDER = ("Plan", "Make", "Judge", "Run", "Scale")


def _name(info: typer.models.CommandInfo) -> str:
    return info.name or (info.callback.__name__ if info.callback else "")


app.registered_commands.sort(key=lambda info: ORDER.index(PANELS[_name(info)][0]))  # groups in ORDER, stable inside
for _info in app.registered_commands:
    _info.rich_help_panel, _example = PANELS[_name(_info)]
    # paragraphs reflowed to the terminal's width (rich keeps a docstring's line breaks), the first one as the summary
    _paragraphs = [" ".join(p.split()) for p in (inspect.getdoc(_info.callback) or "").split("\n\n")]
    _info.short_help = _paragraphs[0]
    _info.help = "\n\n".join([*_paragraphs, f"Example: {_example}"])


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
