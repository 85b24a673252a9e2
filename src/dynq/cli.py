"""The `dynq` command: a thin typer shell over `dynq.api`."""

from __future__ import annotations

import json
import logging
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from dynq import api, cli_deploy, cli_offload, cli_solve
from dynq.calib.text import read_texts
from dynq.cli_render import draw_comparison, draw_imatrix_coverage, draw_plan, draw_summary
from dynq.cli_shell import (
    THREADS,
    elsewhere,
    ensure_source,
    ensure_texts,
    err,
    out,
    progress_bar,
    run_context,
    say,
    setup_logging,
)
from dynq.cli_shell import fetch as fetch_with_bar
from dynq.cli_text import clean, data
from dynq.core.units import parse_size
from dynq.errors import DynqError, OutputExists, ResumeRequired
from dynq.eval.bench import BenchRow
from dynq.eval.loops import generate, loop_rate
from dynq.gguf_io.imatrix import read_imatrix
from dynq.gguf_io.writer import check_output_folder
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.tools import tools_built
from dynq.paths import cache_dir
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
    summary = api.inspect(ensure_source(file))
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
    quant_plan = api.plan(ensure_source(source), recipe)
    coverage = None
    imx = None
    if imatrix is not None:
        imx = read_imatrix(imatrix)
        coverage = imatrix_coverage(quant_plan, imx, imatrix)
    if llama_args:
        requantize = any(not t.info.dtype.is_float for t in quant_plan.tensors)
        sys.stdout.write(
            clean(llama_quantize_command(quant_plan, source, imatrix=imatrix, requantize=requantize)) + "\n"
        )
        return
    if as_json:
        payload = quant_plan.to_dict()
        if coverage is not None and imx is not None:
            payload["imatrix"] = coverage_summary(coverage, imx, imatrix or "")
        _print_json(payload)
        return
    draw_plan(out, quant_plan, coverage, tensors)
    if coverage is not None and imx is not None:
        s = coverage_summary(coverage, imx, imatrix or "")
        say("imatrix ", data(imatrix), f": {s['covered']} tensors covered, {len(s['partial'])} partial, "
            f"{len(s['missing'])} missing ({len(s['missing_required'])} of them need one)")  # fmt: skip


@app.command()
def compare(
    source: Annotated[str, typer.Argument(help="GGUF file, zoo:NAME or shapes:NAME")],
    recipes: Annotated[list[str], typer.Option("--recipe", "-r", help="recipes to compare (repeat)")],
) -> None:
    """Plan several recipes on one model and compare sizes and bits per weight per tensor class."""
    plans = [api.plan(ensure_source(source), r) for r in recipes]
    draw_comparison(out, plans)


@app.command()
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
        raise DynqError(f"{output}: already exists; remove it or pass --force")
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
                                          overwrite=force, executor=executor).result  # fmt: skip
        else:
            assert recipe is not None
            opened = api.open_source(ensure_source(source))  # opened once: the plan and the quantize share it
            quant_plan = api.plan(opened, recipe)
            with progress_bar("quantizing") as on_step:
                result = api.quantize(quant_plan, output, imatrix=imatrix, ctx=run_context(threads, device, on_step),
                                      backend=backend, split_max_size=max_size, reuse_encoded=reuse_encoded,
                                      resume=resume, overwrite=force, executor=executor, source=opened)  # fmt: skip
    p = result.plan
    say("wrote ", data(", ".join(str(f) for f in result.files)),
        f": {p.total_bytes / 2**30:.3f} GiB, {p.bpw:.3f} bpw, {len(p.tensors)} tensors in {result.seconds:.1f} s "
        f"(peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB)")  # fmt: skip


@app.command()
def imatrix(
    source: Annotated[str, typer.Argument(help="GGUF file or zoo:NAME (ideally the full-precision reference)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output imatrix (.gguf, or .dat for legacy)")],
    text: Annotated[list[Path] | None, typer.Option(help="calibration text file(s); default: the built-in set")] = None,
    ctx: Annotated[int, typer.Option(help="tokens per chunk")] = 512,
    chunks: Annotated[int | None, typer.Option(help="at most this many chunks")] = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    all_experts: Annotated[bool, typer.Option(help="route every token through every expert (MoE)")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted collection after its kept chunks")] = False,
) -> None:
    """Collect an importance matrix on llama.cpp's runtime (the format llama-quantize reads)."""
    check_output_folder(output)
    if not text:
        ensure_texts()
    calib = read_texts(text) if text else api.calibration()
    with progress_bar("imatrix") as on_step:
        imx = api.collect_imatrix(ensure_source(source), text=calib, n_ctx=ctx, chunks=chunks,
                                  all_experts=all_experts, ctx=run_context(threads, progress=on_step), output=output,
                                  resume=resume)  # fmt: skip
    api.save_imatrix(imx, output)
    draw_imatrix_coverage(out, imx, full=False)
    say("wrote ", data(output), f": {len(imx.entries)} tensors, {imx.chunk_count} chunks of {ctx} tokens (",
        data(calib.provenance), ")")  # fmt: skip


@app.command(name="eval")
def eval_command(
    quant: Annotated[Path, typer.Argument(help="quantized GGUF to judge")],
    ref: Annotated[Path, typer.Option("--ref", help="reference GGUF (F16/BF16/Q8_0) of the same model")],
    text: Annotated[list[Path] | None, typer.Option(help="evaluation text file(s); default: the built-in set")] = None,
    ctx: Annotated[int, typer.Option(help="tokens per chunk (the second half of each is scored)")] = 512,
    chunks: Annotated[int | None, typer.Option(help="at most this many chunks")] = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Perplexity, KL divergence, top-1 agreement and RMS Δp of a quant against its reference."""
    if not text:
        ensure_texts()
    judged = read_texts(text) if text else api.evaluation()
    with progress_bar("eval") as on_step:
        result = api.evaluate(quant, ref, text=judged, n_ctx=ctx, chunks=chunks,
                              ctx=run_context(threads, progress=on_step))  # fmt: skip
    if as_json:
        _print_json(result.to_dict())
        return
    title = Text.assemble(data(quant.name), " against ", data(ref.name), f" ({result.tokens} tokens)")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ppl", "ref_ppl", "kld_mean", "kld_median", "kld_p90", "kld_p99", "kld_p999", "kld_max", "top1",
                "dp_rms"):  # fmt: skip
        table.add_row(key, f"{getattr(result, key):.6f}")
    out.print(table)


@app.command()
def loops(
    model: Annotated[Path, typer.Argument(help="GGUF model")],
    tokens: Annotated[int, typer.Option(help="tokens per continuation")] = 256,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Greedy and sampled continuations of fixed prompts: how many end in endless repetition."""
    runs = generate(model, tokens, threads)
    if as_json:
        _print_json({"loop_rate": loop_rate(runs), "continuations": [asdict(c) | {"looped": c.looped} for c in runs]})
        return
    title = Text.assemble(data(model.name), f": loop rate {loop_rate(runs):.0%}")
    table = Table(title=title, title_justify="left")
    for col in ("kind", "mode", "tokens", "end", "continuation"):
        table.add_column(col, overflow="fold")
    for c in runs:
        end = "stop" if c.stopped else f"loop (period {c.period})" if c.looped else "budget"
        table.add_row(c.kind, c.mode, str(c.n_tokens), end, data(c.text.strip()[:160]))
    out.print(table)


@app.command()
def bench(
    ref: Annotated[Path, typer.Argument(help="reference GGUF (F16/BF16) of the model")],
    recipes: Annotated[list[str], typer.Option("--recipe", "-r", help="dynq recipes (repeat)")],
    llama_mix: Annotated[list[str] | None, typer.Option(help="llama-quantize types, e.g. IQ1_S, Q4_K_M")] = None,
    imatrix: Annotated[Path | None, typer.Option(help="importance matrix used by every quant")] = None,
    out_dir: Annotated[Path, typer.Option(help="where the table, plot and JSON go")] = Path("bench/results"),
    name: Annotated[str | None, typer.Option(help="result file stem (default: the reference's name)")] = None,
    ctx: Annotated[int, typer.Option(help="tokens per evaluation chunk")] = 512,
    chunks: Annotated[int | None, typer.Option(help="evaluation chunks")] = None,
    loop_tokens: Annotated[int, typer.Option(help="tokens per loop-check continuation (0: skip)")] = 256,
    threads: Annotated[int, typer.Option(help="threads")] = THREADS,
    resume: Annotated[
        bool, typer.Option(help="keep the rows already in OUT_DIR/NAME.json (same settings!) and measure the rest")
    ] = False,
    solve_at: Annotated[
        list[str] | None,
        typer.Option(help="a solver row at this size: llama:MIX (that mix's bytes), 600MiB or 2.5bpw (repeat)"),
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(help="profile the solver rows use (default: profile the reference, cached)")
    ] = None,
) -> None:
    """Quantize one model with dynq recipes, llama.cpp mixes and solved mixes at given sizes, judge all against the
    reference, tabulate."""
    ensure_texts()
    if llama_mix and not tools_built(cache_dir()):
        with err.status("building llama.cpp's tools (about 4 minutes, once)"):
            api.build_tools(ctx=run_context())
    made: api.Profile | Path | None = profile
    if solve_at and profile is None:
        with progress_bar("profiling") as on_step:
            made = api.profile(ref, imatrix=imatrix, ctx=run_context(threads, progress=on_step))

    def on_row(r: BenchRow) -> None:
        say(data(f"{r.maker} {r.name}"), f": {r.bytes / 2**20:.1f} MiB, KLD {r.kld_mean:.4f}, top-1 {r.top1:.1%}, "
            f"loops {r.loop_rate:.0%}, {r.quantize_seconds:.0f} s")  # fmt: skip

    result = api.bench(ref, recipes=recipes, llama_mixes=llama_mix or [], solve_at=solve_at or [], imatrix=imatrix,
                       profile=made, out_dir=out_dir, name=name, n_ctx=ctx, chunks=chunks, loop_tokens=loop_tokens,
                       resume=resume, ctx=run_context(threads), on_row=on_row)  # fmt: skip
    if result.kept:
        measured = len(result.rows) - result.kept
        say(f"resumed: {result.kept} rows kept from ", data(result.json), f", {measured} measured")
    sys.stdout.write(clean(result.markdown))  # a markdown table: unwrapped, as in the file


@app.command()
def presets() -> None:
    """List the shipped recipes and shape inventories."""
    table = Table(title="recipes", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name in preset_names():
        table.add_row(data(name), data(load_recipe(name).description))
    out.print(table)
    say("shape inventories: " + ", ".join(shapes.PREFIX + n for n in shapes.inventory_names()))
    say("zoo models: " + ", ".join(zoo.PREFIX + n for n in zoo.names()))


@app.command()
def synthetic(
    kind: Annotated[str, typer.Argument(help="deepseek2, qwen3moe or llama")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .gguf")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a tiny random model of a real llama.cpp architecture (MoE code paths without MoE weights)."""
    path = write_synthetic(kind, output, seed)
    say("wrote ", data(path), f" ({path.stat().st_size:,} bytes)")


@app.command()
def fetch(name: Annotated[str, typer.Argument(help="zoo:NAME, or 'texts' for the built-in texts")]) -> None:
    """Download a zoo model or the built-in calibration and evaluation texts into the cache; print where."""
    sys.stdout.write(clean(fetch_with_bar(name)) + "\n")


@app.command(name="build-tools")
def build_tools() -> None:
    """Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity from the pinned source (once)."""
    with err.status("building llama.cpp's tools (about 4 minutes, once)"):
        path = api.build_tools(ctx=run_context())
    sys.stdout.write(clean(path) + "\n")


cli_offload.register(app)
cli_solve.register(app)
cli_deploy.register(app)


def _terminated(signum: int, frame: FrameType | None) -> None:
    # A `kill` ends the run as Ctrl-C does: outputs are closed, an interrupted quantize is kept for --resume.
    raise KeyboardInterrupt


def in_flags(e: DynqError) -> str:
    """The library's message, with what a caller may do said in the command's own options."""
    if isinstance(e, OutputExists):
        return f"{e.path}: already exists; remove it or pass --force"
    if isinstance(e, ResumeRequired):
        return f"{e.subject}: {e.left} in {e.folder}; add --resume to continue it, or delete that folder to start over"
    return str(e)


def main() -> None:
    setup_logging()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except DynqError as e:
        err.print(Text.assemble(("error:", "bold red"), " ", data(in_flags(e))), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
