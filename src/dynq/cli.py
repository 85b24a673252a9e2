"""The `dynq` command: a thin typer shell over `dynq.api`."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from dynq import api
from dynq.cli_render import draw_comparison, draw_plan, draw_summary
from dynq.errors import DynqError
from dynq.gguf_io.imatrix import read_imatrix
from dynq.recipe.coverage import coverage_summary, imatrix_coverage
from dynq.recipe.llama_args import llama_quantize_command
from dynq.recipe.presets import load_recipe, preset_names
from dynq.sources import shapes, zoo

app = typer.Typer(
    help="Dynamic low-bit GGUF quantization: plan every tensor's type, then quantize, evaluate and deploy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output (files, CI logs) gets a wide table instead of rich's 80-column default.
out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    logging.getLogger("dynq").setLevel(logging.INFO if verbose else logging.WARNING)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
def inspect(
    file: Annotated[str, typer.Argument(help="GGUF file (any shard of a split model) or zoo:NAME")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Tensor count per type, size, bits per weight overall and per tensor class, key metadata."""
    summary = api.inspect(file)
    if as_json:
        _print_json(summary.to_dict())
    else:
        draw_summary(out, summary)


@app.command()
def plan(
    source: Annotated[str, typer.Argument(help="GGUF file, zoo:NAME or shapes:NAME")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="preset name or YAML recipe file")],
    imatrix: Annotated[str | None, typer.Option(help="importance matrix (GGUF or .dat) to check coverage")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    llama_args: Annotated[bool, typer.Option("--llama-args", help="print the llama-quantize command")] = False,
    tensors: Annotated[bool, typer.Option(help="show the per-tensor table")] = True,
) -> None:
    """Resolve every tensor to a type, with the reason, from names and shapes alone."""
    quant_plan = api.plan(source, recipe)
    coverage = None
    imx = None
    if imatrix is not None:
        imx = read_imatrix(imatrix)
        coverage = imatrix_coverage(quant_plan, imx, imatrix)
    if llama_args:
        requantize = any(not t.info.dtype.is_float for t in quant_plan.tensors)
        print(llama_quantize_command(quant_plan, source, imatrix=imatrix, requantize=requantize))
        return
    if as_json:
        data = quant_plan.to_dict()
        if coverage is not None and imx is not None:
            data["imatrix"] = coverage_summary(coverage, imx, imatrix or "")
        _print_json(data)
        return
    draw_plan(out, quant_plan, coverage, tensors)
    if coverage is not None and imx is not None:
        s = coverage_summary(coverage, imx, imatrix or "")
        out.print(
            f"imatrix {imatrix}: {s['covered']} tensors covered, {len(s['partial'])} partial, "
            f"{len(s['missing'])} missing ({len(s['missing_required'])} of them need one)"
        )


@app.command()
def compare(
    source: Annotated[str, typer.Argument(help="GGUF file, zoo:NAME or shapes:NAME")],
    recipes: Annotated[list[str], typer.Option("--recipe", "-r", help="recipes to compare (repeat)")],
) -> None:
    """Plan several recipes on one model and compare sizes and bits per weight per tensor class."""
    plans = [api.plan(source, r) for r in recipes]
    draw_comparison(out, plans)


@app.command()
def presets() -> None:
    """List the shipped recipes and shape inventories."""
    table = Table(title="recipes", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name in preset_names():
        table.add_row(name, load_recipe(name).description)
    out.print(table)
    out.print("shape inventories: " + ", ".join(shapes.PREFIX + n for n in shapes.inventory_names()))
    out.print("zoo models: " + ", ".join(zoo.PREFIX + n for n in zoo.MODELS))


@app.command()
def fetch(name: Annotated[str, typer.Argument(help="zoo:NAME")]) -> None:
    """Fetch a zoo model into the cache and print its path."""
    with out.status(f"fetching {name}") as status:
        path = zoo.fetch(name, lambda done, total: status.update(f"fetching {name}: part {done}/{total}"))
    print(path)


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_time=False, show_path=False)],
    )
    try:
        app()
    except DynqError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
