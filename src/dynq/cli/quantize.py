"""The commands that plan and make quants: `inspect`, `plan`, `compare`, `quantize`, and the set-up around them
(`presets`, `fetch`, `build-tools`, `synthetic`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dynq import api
from dynq.cli.render import draw_comparison, draw_plan, draw_summary
from dynq.cli.shell import (
    THREADS,
    elsewhere,
    ensure_source,
    ensure_texts,
    err,
    out,
    print_json,
    progress_bar,
    run_context,
    say,
)
from dynq.cli.shell import fetch as fetch_with_bar
from dynq.cli.text import clean, data
from dynq.core.atomic import check_output_folder
from dynq.core.units import parse_size
from dynq.errors import DynqError, OutputExists


def inspect(
    file: Annotated[str, typer.Argument(help="GGUF file (any shard of a split model) or zoo:NAME")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Tensor count per type, size, bits per weight overall and per tensor class, key metadata."""
    summary = api.inspect(ensure_source(file))
    if as_json:
        print_json(summary.to_dict())
    else:
        draw_summary(out, summary)


def plan(
    source: Annotated[str, typer.Argument(help="GGUF file, zoo:NAME or shapes:NAME")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="preset name or YAML recipe file")],
    imatrix: Annotated[str | None, typer.Option(help="importance matrix (GGUF or .dat) to check coverage")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    llama_args: Annotated[bool, typer.Option("--llama-args", help="print the llama-quantize command")] = False,
    tensors: Annotated[bool, typer.Option(help="show the per-tensor table")] = True,
    plot: Annotated[
        Path | None,
        typer.Option(help="also draw bits per weight per block and tensor kind (PNG; replaced if it exists)"),
    ] = None,
) -> None:
    """Resolve every tensor to a type, with the reason, from names and shapes alone."""
    quant_plan = api.plan(ensure_source(source), recipe)
    coverage = None
    imx = None
    if imatrix is not None:
        imx = api.read_imatrix(imatrix)
        coverage = api.coverage(quant_plan, imx)
    if llama_args:
        requantize = any(not t.info.dtype.is_float for t in quant_plan.tensors)
        command = api.llama_quantize_command(quant_plan, source, imatrix=imatrix, requantize=requantize)
        sys.stdout.write(clean(command) + "\n")
        return
    if as_json:
        payload = quant_plan.to_dict()
        if coverage is not None and imx is not None:
            payload["imatrix"] = api.coverage_summary(coverage, imx, imatrix or "")
        print_json(payload)
        return
    draw_plan(out, quant_plan, coverage, tensors)
    if plot is not None:
        say("drew ", data(api.plot_plans([quant_plan], plot, title=source)))
    if coverage is not None and imx is not None:
        s = api.coverage_summary(coverage, imx, imatrix or "")
        say("imatrix ", data(imatrix), f": {s['covered']} tensors covered, {len(s['partial'])} partial, "
            f"{len(s['missing'])} missing ({len(s['missing_required'])} of them need one)")  # fmt: skip


def compare(
    source: Annotated[str, typer.Argument(help="GGUF file, zoo:NAME or shapes:NAME")],
    recipes: Annotated[list[str], typer.Option("--recipe", "-r", help="recipes to compare (repeat)")],
    plot: Annotated[
        Path | None,
        typer.Option(
            help="also draw each plan's bits per weight per block and tensor kind, side by side (PNG; replaced)"
        ),
    ] = None,
) -> None:
    """Plan several recipes on one model and compare sizes and bits per weight per tensor class."""
    plans = [api.plan(ensure_source(source), r) for r in recipes]
    draw_comparison(out, plans)
    if plot is not None:
        say("drew ", data(api.plot_plans(plans, plot, title=source)))


def quantize(
    source: Annotated[str, typer.Argument(help="GGUF file (any type; split shards too) or zoo:NAME")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .gguf (shards are named after it)")],
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="preset name or YAML recipe file")] = None,
    target: Annotated[
        str | None,
        typer.Option(help="instead of a recipe: a size (600MiB) or bpw (2.5bpw) to solve for from a cached profile"),
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(help="with --target: this profile (default: profile the source, or reuse the cache)")
    ] = None,
    imatrix: Annotated[str | None, typer.Option(help="importance matrix (GGUF or .dat)")] = None,
    gram: Annotated[
        Path | None,
        typer.Option(help="Gram file from `dynq imatrix --gram` (with its imatrix): encode with error feedback"),
    ] = None,
    threads: Annotated[int, typer.Option(help="encoder threads")] = THREADS,
    split_max_size: Annotated[str | None, typer.Option(help="split into shards of at most this size (e.g. 2G)")] = None,
    backend: Annotated[
        str | None, typer.Option(help="encoders: ggml (llama.cpp's) or torch (dynq's); default torch on a GPU")
    ] = None,
    device: Annotated[str | None, typer.Option(help="torch device: cpu or cuda (default: cuda when present)")] = None,
    reuse_encoded: Annotated[
        bool, typer.Option(help="cache encoded tensors on disk and reuse them across recipes of this model")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="continue an interrupted run of the same inputs from its last verified tensor")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    ray: Annotated[
        str | None, typer.Option(help="encode on a Ray cluster: auto, or its HOST:PORT (every node sees the files)")
    ] = None,
    processes: Annotated[int, typer.Option(help="encode in this many local worker processes")] = 0,
) -> None:
    """Quantize a model with a recipe, or for a size (--target: profile, cached, then solve), streaming one tensor at
    a time into GGUF."""
    check_output_folder(output)
    if output.exists() and not force:
        raise OutputExists(output)
    if (recipe is None) == (target is None):
        raise DynqError("give either --recipe or --target")
    max_size = parse_size(split_max_size) if split_max_size else 0
    with elsewhere(ray, processes) as executor:
        if target is not None:
            if profile is None:
                ensure_texts()
            with progress_bar("quantizing") as on_step:
                result = api.quantize_for(ensure_source(source), target, output, imatrix=imatrix, profile=profile,
                                          ctx=run_context(threads, device, on_step), backend=backend,
                                          split_max_size=max_size, reuse_encoded=reuse_encoded, resume=resume,
                                          overwrite=force, executor=executor, gram=gram).result  # fmt: skip
        else:
            assert recipe is not None
            opened = api.open_source(ensure_source(source))  # opened once: the plan and the quantize share it
            quant_plan = api.plan(opened, recipe)
            with progress_bar("quantizing") as on_step:
                result = api.quantize(quant_plan, output, imatrix=imatrix, ctx=run_context(threads, device, on_step),
                                      backend=backend, split_max_size=max_size, reuse_encoded=reuse_encoded,
                                      resume=resume, overwrite=force, executor=executor, source=opened,
                                      gram=gram)  # fmt: skip
    p = result.plan
    say("wrote ", data(", ".join(str(f) for f in result.files)),
        f": {p.total_bytes / 2**30:.3f} GiB, {p.bpw:.3f} bpw, {len(p.tensors)} tensors in {result.seconds:.1f} s "
        f"(peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB)")  # fmt: skip


def presets() -> None:
    """List the shipped recipes, shape inventories and zoo models."""
    table = Table(title="recipes", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for recipe in api.presets():
        table.add_row(data(recipe.name), data(recipe.description))
    out.print(table)
    say("shape inventories: " + ", ".join(api.shape_inventories()))
    say("zoo models: " + ", ".join(api.zoo_models()))


def synthetic(
    kind: Annotated[str, typer.Argument(help="deepseek2, qwen3moe or llama")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .gguf")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
) -> None:
    """Write a tiny random model of a real llama.cpp architecture (MoE code paths without MoE weights)."""
    path = api.write_synthetic(kind, output, seed, overwrite=force)
    say("wrote ", data(path), f" ({path.stat().st_size:,} bytes)")


def rotate(
    source: Annotated[Path, typer.Argument(help="float reference GGUF (F16/BF16/F32) of a llama-family model")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .gguf")],
    seed: Annotated[int, typer.Option(help="seed of the random orthogonal rotation")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
) -> None:
    """Rotate the residual stream by a random orthogonal matrix, fused into the weights: the same model, weights
    whose outliers are spread over every channel (an experiment for low-bit encoding; see docs/feedback.md)."""
    path = api.rotate(source, output, seed=seed, overwrite=force)
    say("wrote ", data(path), f" (rotated, seed {seed})")


def fetch(name: Annotated[str, typer.Argument(help="zoo:NAME, or 'texts' for the built-in texts")]) -> None:
    """Download a zoo model or the built-in calibration and evaluation texts into the cache; print where."""
    sys.stdout.write(clean(fetch_with_bar(name)) + "\n")


def build_tools() -> None:
    """Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity from the pinned source (once)."""
    with err.status("building llama.cpp's tools (about 4 minutes, once)"):
        path = api.build_tools(ctx=run_context())
    sys.stdout.write(clean(path) + "\n")


def register(app: typer.Typer) -> None:
    for command in (inspect, plan, compare, quantize, presets, synthetic, rotate, fetch):
        app.command()(command)
    app.command(name="build-tools")(build_tools)
