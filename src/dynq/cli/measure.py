"""The commands that measure: `imatrix` (importance on calibration text), `eval` (a quant against its reference on
evaluation text), `loops` (endless repetition) and `bench` (recipes, llama.cpp mixes and solved mixes side by side)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from dynq import api
from dynq.cli.render import draw_imatrix_coverage
from dynq.cli.shell import THREADS, ensure_source, ensure_texts, err, out, print_json, progress_bar, run_context, say
from dynq.cli.text import clean, data
from dynq.core.atomic import check_new_output
from dynq.errors import DynqError


def imatrix(
    source: Annotated[str, typer.Argument(help="GGUF file or zoo:NAME (ideally the full-precision reference)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output imatrix (.gguf, or .dat for legacy)")],
    text: Annotated[list[Path] | None, typer.Option(help="calibration text file(s); default: the built-in set")] = None,
    n_ctx: Annotated[int, typer.Option("--ctx", help="tokens per chunk")] = 512,
    chunks: Annotated[int | None, typer.Option(help="at most this many chunks")] = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    all_experts: Annotated[bool, typer.Option(help="route every token through every expert (MoE)")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted collection after its kept chunks")] = False,
    gram: Annotated[
        Path | None,
        typer.Option(help="also write the Gram matrices of the weights' inputs here, for quantize --gram"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
) -> None:
    """Collect an importance matrix on llama.cpp's runtime (the format llama-quantize reads)."""
    check_new_output(output, force)  # before hours of collecting, not after
    if gram is not None:
        check_new_output(gram, force)
        if resume or all_experts:
            raise DynqError("--gram collects in one uninterrupted pass of the routed model: leave out "
                            "--resume and --all-experts")  # fmt: skip
    if not text:
        ensure_texts()
    calib = api.read_texts(text) if text else api.calibration()
    with progress_bar("imatrix") as on_step:
        run = run_context(threads, progress=on_step)
        if gram is not None:
            imx, grams = api.collect_gram(ensure_source(source), text=calib, n_ctx=n_ctx, chunks=chunks, ctx=run)
            api.save_gram(grams, gram, overwrite=force)
            say("wrote ", data(gram), f": {len(grams.matrices)} Gram matrices for {len(grams.inputs)} weights")
        else:
            imx = api.collect_imatrix(ensure_source(source), text=calib, n_ctx=n_ctx, chunks=chunks,
                                      all_experts=all_experts, ctx=run, output=output, resume=resume)  # fmt: skip
    api.save_imatrix(imx, output, overwrite=force)
    draw_imatrix_coverage(out, imx, full=False)
    say("wrote ", data(output), f": {len(imx.entries)} tensors, {imx.chunk_count} chunks of {n_ctx} tokens (",
        data(calib.provenance), ")")  # fmt: skip


def eval_command(
    quant: Annotated[Path, typer.Argument(help="quantized GGUF to judge")],
    ref: Annotated[Path, typer.Option("--ref", help="reference GGUF (F16/BF16/Q8_0) of the same model")],
    text: Annotated[list[Path] | None, typer.Option(help="evaluation text file(s); default: the built-in set")] = None,
    n_ctx: Annotated[int, typer.Option("--ctx", help="tokens per chunk (the second half of each is scored)")] = 512,
    chunks: Annotated[int | None, typer.Option(help="at most this many chunks")] = None,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Perplexity, KL divergence, top-1 agreement and RMS Δp of a quant against its reference."""
    if not text:
        ensure_texts()
    judged = api.read_texts(text) if text else api.evaluation()
    with progress_bar("eval") as on_step:
        result = api.evaluate(quant, ref, text=judged, n_ctx=n_ctx, chunks=chunks,
                              ctx=run_context(threads, progress=on_step))  # fmt: skip
    if as_json:
        print_json(result.to_dict())
        return
    title = Text.assemble(data(quant.name), " against ", data(ref.name), f" ({result.tokens} tokens)")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ppl", "ref_ppl", "kld_mean", "kld_median", "kld_p90", "kld_p99", "kld_p999", "kld_max",
                "kld_over_1", "top1", "dp_rms"):  # fmt: skip
        table.add_row(key, f"{getattr(result, key):.6f}")
    out.print(table)


def loops(
    model: Annotated[Path, typer.Argument(help="GGUF model")],
    tokens: Annotated[int, typer.Option(help="tokens per continuation")] = 256,
    threads: Annotated[int, typer.Option(help="llama.cpp threads")] = THREADS,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Greedy and sampled continuations of fixed prompts: how many end in endless repetition."""
    runs = api.loops(model, tokens=tokens, ctx=run_context(threads))
    rate = api.loop_rate(runs)
    if as_json:
        print_json({"loop_rate": rate, "continuations": [asdict(c) | {"looped": c.looped} for c in runs]})
        return
    table = Table(title=Text.assemble(data(model.name), f": loop rate {rate:.0%}"), title_justify="left")
    for col in ("kind", "mode", "tokens", "end", "continuation"):
        table.add_column(col, overflow="fold")
    for c in runs:
        end = "stop" if c.stopped else f"loop (period {c.period})" if c.looped else "budget"
        table.add_row(c.kind, c.mode, str(c.n_tokens), end, data(c.text.strip()[:160]))
    out.print(table)


def bench(
    ref: Annotated[Path, typer.Argument(help="reference GGUF (F16/BF16) of the model")],
    recipes: Annotated[list[str], typer.Option("--recipe", "-r", help="dynq recipes (repeat)")],
    llama_mix: Annotated[list[str] | None, typer.Option(help="llama-quantize types, e.g. IQ1_S, Q4_K_M")] = None,
    imatrix: Annotated[Path | None, typer.Option(help="importance matrix used by every quant")] = None,
    out_dir: Annotated[Path, typer.Option(help="where the table, plot and JSON go")] = Path("bench/results"),
    name: Annotated[str | None, typer.Option(help="result file stem (default: the reference's name)")] = None,
    n_ctx: Annotated[int, typer.Option("--ctx", help="tokens per evaluation chunk")] = 512,
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
    keep: Annotated[Path | None, typer.Option(help="keep each quant in this folder (default: deleted)")] = None,
) -> None:
    """Quantize one model with dynq recipes, llama.cpp mixes and solved mixes at given sizes, judge all against the
    reference, tabulate."""
    ensure_texts()
    if llama_mix and not api.tools_built():
        with err.status("building llama.cpp's tools (about 4 minutes, once)"):
            api.build_tools(ctx=run_context())
    made: api.Profile | Path | None = profile
    if solve_at and profile is None:
        with progress_bar("profiling") as on_step:
            made = api.profile(ref, imatrix=imatrix, ctx=run_context(threads, progress=on_step))

    def on_row(r: api.BenchRow) -> None:
        say(data(f"{r.maker} {r.name}"), f": {r.bytes / 2**20:.1f} MiB, KLD {r.kld_mean:.4f}, top-1 {r.top1:.1%}, "
            f"loops {r.loop_rate:.0%}, {r.quantize_seconds:.0f} s")  # fmt: skip

    result = api.bench(ref, recipes=recipes, llama_mixes=llama_mix or [], solve_at=solve_at or [], imatrix=imatrix,
                       profile=made, out_dir=out_dir, name=name, n_ctx=n_ctx, chunks=chunks, loop_tokens=loop_tokens,
                       resume=resume, keep=keep, ctx=run_context(threads), on_row=on_row)  # fmt: skip
    if result.kept:
        measured = len(result.rows) - result.kept
        say(f"resumed: {result.kept} rows kept from ", data(result.json), f", {measured} measured")
    sys.stdout.write(clean(result.markdown))  # a markdown table: unwrapped, as in the file


def register(app: typer.Typer) -> None:
    for command in (imatrix, loops, bench):
        app.command()(command)
    app.command(name="eval")(eval_command)
