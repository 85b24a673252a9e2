"""`dynq profile` and `dynq solve`: measure what each tensor costs at each type, then choose types for a size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynq import api
from dynq.cli.shell import THREADS, elsewhere, ensure_source, ensure_texts, err, progress_bar, run_context, say
from dynq.cli.text import data
from dynq.core.atomic import check_new_output
from dynq.core.units import GIB, MIB
from dynq.errors import DynqError

DEFAULTS = api.PROFILE_DEFAULTS


def profile_command(
    source: Annotated[str, typer.Argument(help="float reference GGUF (F16/BF16/F32) of the model")],
    output: Annotated[Path, typer.Option("--output", "-o", help="profile file to write (JSON)")],
    imatrix: Annotated[str | None, typer.Option(help="importance matrix of the model (GGUF or .dat)")] = None,
    gram: Annotated[
        Path | None, typer.Option(help="Gram file of the imatrix's pass: measure the error-feedback encoder")
    ] = None,
    text: Annotated[list[Path] | None, typer.Option(help="calibration text file(s); default: the built-in set")] = None,
    n_ctx: Annotated[int, typer.Option("--ctx", help="tokens per probe chunk")] = DEFAULTS["n_ctx"],
    chunks: Annotated[int, typer.Option(help="chunks each probe is judged on")] = DEFAULTS["chunks"],
    rows: Annotated[int, typer.Option(help="rows sampled per tensor for the encode errors")] = DEFAULTS["rows"],
    group_blocks: Annotated[int, typer.Option(help="blocks probed together per tensor kind")] = DEFAULTS[
        "group_blocks"
    ],
    probe_type: Annotated[str, typer.Option(help="the type a probe puts its tensors at")] = DEFAULTS["probe_type"],
    threads: Annotated[int, typer.Option(help="threads")] = THREADS,
    resume: Annotated[bool, typer.Option(help="continue an interrupted profile from what it had measured")] = False,
    ray: Annotated[
        str | None, typer.Option(help="measure on a Ray cluster: auto, or its HOST:PORT (every node sees the files)")
    ] = None,
    processes: Annotated[int, typer.Option(help="measure in this many local worker processes")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="also draw each tensor's sensitivity per block and error against bits (PNG; replaced if it exists)"
        ),
    ] = None,
) -> None:
    """Measure how much each tensor hurts the output at each candidate type, on calibration text only: encode
    errors on sampled rows, scaled per tensor group by the KL divergence a probe of that group really causes.
    Cached: a second run with the same model, imatrix, text and settings reads the cache."""
    check_new_output(output, force)  # before hours of measuring, not after
    if not text:
        ensure_texts()
    calib = api.read_texts(text) if text else api.calibration()
    with elsewhere(ray, processes) as executor, progress_bar("profiling") as on_step:
        result = api.profile(ensure_source(source), imatrix=imatrix, text=calib, rows=rows, group_blocks=group_blocks,
                             probe_type=probe_type, n_ctx=n_ctx, chunks=chunks, resume=resume, executor=executor,
                             ctx=run_context(threads, progress=on_step), gram=gram)  # fmt: skip
    result.save(output, overwrite=force)
    seconds = result.seconds
    say("wrote ", data(output), f": {len(result.tensors)} tensors, {len(result.probes)} probes "
        f"(errors {seconds.get('errors', 0):.0f} s, probes {seconds.get('probes', 0):.0f} s)")  # fmt: skip
    if plot is not None:
        say("drew ", data(api.plot_profile(result, plot)))


def solve_command(
    source: Annotated[str, typer.Argument(help="the model the profile was made for (GGUF file or zoo:NAME)")],
    profile: Annotated[Path, typer.Option(help="profile from `dynq profile`")],
    target: Annotated[str, typer.Option(help="file size (600MiB, 1.2G, bytes) or bits per weight (2.5bpw)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="recipe to write (YAML)")],
    imatrix: Annotated[
        Path | None, typer.Option(help="the imatrix the quantize will use (without one, IQ1/IQ2 types are left out)")
    ] = None,
    base: Annotated[str | None, typer.Option(help="recipe whose rules pin the tensors they match")] = None,
    types: Annotated[
        list[str] | None, typer.Option("--type", help="candidate types (repeat); default: profiled")
    ] = None,
    tie: Annotated[list[str] | None, typer.Option(help="regex; its matches in one block share a type (repeat)")] = None,
    name: Annotated[str | None, typer.Option(help="recipe name")] = None,
    verify: Annotated[
        bool, typer.Option(help="quantize the solution and measure its KLD beside the prediction (calibration text)")
    ] = False,
    refine: Annotated[
        float,
        typer.Option(help="seconds to improve the mix against measured KLD (calibration text; needs --imatrix)"),
    ] = 0.0,
    refine_chunks: Annotated[int, typer.Option(help="with --refine: calibration chunks each mix is judged on")] = 4,
    text: Annotated[
        list[Path] | None, typer.Option(help="with --verify or --refine: the profile's calibration text")
    ] = None,
    threads: Annotated[int, typer.Option(help="threads (--verify, --refine)")] = THREADS,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="also draw the mix's bits per weight per block and tensor kind (PNG; replaced if it exists)"),
    ] = None,
) -> None:
    """Choose every tensor's type for a size: the least predicted damage whose file is at most the target. Writes an
    ordinary recipe (one rule per tensor kind and type, each with its predicted cost and bytes). --verify measures
    the mix; --refine SECONDS also tries mixes that weigh each tensor kind up or down and keeps the one that
    measures best on calibration text."""
    check_new_output(output, force)
    if refine > 0 and imatrix is None:
        raise DynqError("--refine quantizes the mixes it measures: give the --imatrix they will be made with")
    if (verify or refine > 0) and not text:
        ensure_texts()
    calib = api.read_texts(text) if text else None
    if refine > 0:
        with progress_bar("refining") as on_step:
            refined = api.refine(ensure_source(source), profile, target, imatrix=imatrix, text=calib, seconds=refine,
                                 chunks=refine_chunks, base=base, types=types, ties=tie or (), name=name,
                                 ctx=run_context(threads, progress=on_step))  # fmt: skip
        solved, search = refined.solved, refined.search
        say(f"refined in {search.seconds:.0f} s: {len(search.trials)} mixes measured on {refine_chunks} chunks of "
            f"calibration text, KLD {search.first:.4f} (as solved) -> {search.best:.4f}")  # fmt: skip
    else:
        solved = api.solve(ensure_source(source), profile, target, has_imatrix=imatrix is not None, base=base,
                           types=types, ties=tie or (), name=name, ctx=run_context())  # fmt: skip
    solved.save(output, overwrite=force)
    plan, s = solved.plan, solved.solution
    proof = "optimal" if s.exact else f"within {s.gap:.3g} of the optimum"
    proof += " for the refined kind weights" if refine > 0 else ""
    say("wrote ", data(output), f": {len(solved.recipe.rules)} rules; {plan.total_bytes / MIB:.1f} MiB "
        f"({plan.total_bytes:,} B, {plan.bpw:.3f} bpw) for a target of {solved.target_bytes / MIB:.1f} MiB; "
        f"predicted KLD {solved.predicted_kld:.4f} ({proof})")  # fmt: skip
    if plot is not None:
        say("drew ", data(api.plot_plans([plan], plot, title=f"{Path(source).name}: solved for {target}")))
    if verify:
        with progress_bar("verifying") as on_step:
            checked = api.verify(solved, profile, imatrix=imatrix, text=calib,
                                 ctx=run_context(threads, progress=on_step))  # fmt: skip
        m = checked.measured
        say(f"verified on {m.tokens} tokens of calibration text: predicted KLD {checked.predicted_kld:.4f}, measured "
            f"{m.kld_mean:.4f} (p99 {m.kld_p99:.4f}, top-1 {m.top1:.1%}) in {checked.seconds:.0f} s")  # fmt: skip
    if plan.total_bytes < 0.99 * solved.target_bytes:
        say(f"nothing larger fits these types and pins ({plan.total_bytes / GIB:.3f} GiB): the target is above what "
            "they reach", console=err)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command(name="profile")(profile_command)
    app.command(name="solve")(solve_command)
