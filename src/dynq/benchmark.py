"""`dynq bench` as a library call: one model quantized with dynq recipes, with llama.cpp's own mixes
(llama-quantize, same imatrix) and with solved mixes at given sizes, each judged against the reference on the
evaluation text. The table, JSON and plot are rewritten after every row, so a long run that dies keeps what it
measured, and `resume` goes on from them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynq.budget.allocate import ProfileLike, as_profile, quantize_for
from dynq.budget.profile import profile as measure_profile
from dynq.calib.text import Text, calibration_text, evaluation_text
from dynq.core.context import RunContext, context
from dynq.core.units import parse_target
from dynq.errors import DynqError
from dynq.eval.bench import SOLVED, BenchRow, markdown_table, plot, read_bench, rows_as_dicts
from dynq.eval.evaluate import evaluate
from dynq.eval.loops import generate, loop_rate
from dynq.gguf_io.imatrix import as_imatrix
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import summarize
from dynq.llamacpp.tools import tool
from dynq.quantize import quantize
from dynq.recipe.plan import resolve
from dynq.recipe.presets import load_recipe
from dynq.sources.described import describe

LLAMA = "llama:"  # a solve target named by a llama.cpp mix: that mix's size
_UNSAFE = re.compile(r"[^\w.@-]")  # in a work file's name: a recipe may be given as a path


@dataclass(frozen=True)
class BenchJob:
    """One row to measure: a dynq recipe, a llama.cpp mix, or a solve at a size (`600MiB`, `2.5bpw`, `llama:MIX`)."""

    maker: str  # "dynq" or "llama.cpp"
    name: str  # the row's name
    recipe: str | None = None
    mix: str | None = None
    solve_at: str | None = None


def bench_jobs(recipes: Sequence[str], llama_mixes: Sequence[str], solve_at: Sequence[str]) -> list[BenchJob]:
    """The rows in the order they are measured: the solves come after the mixes whose sizes they take."""
    return ([BenchJob("dynq", r, recipe=r) for r in recipes] + [BenchJob("llama.cpp", m, mix=m) for m in llama_mixes]
            + [BenchJob("dynq", SOLVED + s.removeprefix(LLAMA), solve_at=s) for s in solve_at])  # fmt: skip


@dataclass(frozen=True)
class BenchResult:
    """Every row (the first `kept` from a resumed run, then those measured), and the files written: table, JSON and
    plot."""

    rows: list[BenchRow]
    kept: int
    table: Path
    json: Path
    plot: Path
    markdown: str


def bench(
    ref: str | Path,
    *,
    recipes: Sequence[str] = (),
    llama_mixes: Sequence[str] = (),
    solve_at: Sequence[str] = (),
    imatrix: str | Path | None = None,
    profile: ProfileLike | None = None,
    out_dir: str | Path = Path("bench/results"),
    name: str | None = None,
    text: Text | None = None,
    n_ctx: int = 512,
    chunks: int | None = None,
    loop_tokens: int = 256,
    resume: bool = False,
    keep: str | Path | None = None,
    ctx: RunContext | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
) -> BenchResult:
    """Measure every recipe, llama.cpp mix and solve target on the reference `ref` (F16/BF16) with the same
    imatrix; write OUT_DIR/NAME.md, .json and .png after every row. Solve targets use `profile` (default: the
    reference's profile on the built-in calibration text, from the cache or measured). `resume` keeps the rows
    of OUT_DIR/NAME.json (made with the same settings) and measures only the others. Each quant is deleted after
    its row unless `keep` names a folder to move it to (as NAME-ROW.gguf)."""
    ctx = context(ctx)
    ref, out = Path(ref), Path(out_dir)
    stem = name or ref.stem
    out.mkdir(parents=True, exist_ok=True)
    if keep is not None:
        Path(keep).mkdir(parents=True, exist_ok=True)
    files = (out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png")
    title = f"{stem}: dynq recipes and llama.cpp mixes against the reference"
    settings = (
        f"Reference {ref.name}; every quant with the imatrix {Path(imatrix).name if imatrix else '(none)'}. "
        f"Evaluation: {chunks or 'all'} chunks of {n_ctx} tokens of the built-in evaluation text. Loops: the fixed "
        f"prompts, greedy and sampled, {loop_tokens} tokens each. {ctx.threads} threads; quantize is wall time."
    )
    rows = read_bench(files[1]) if resume and files[1].exists() else []
    kept = len(rows)
    measured = {(r.maker, r.name) for r in rows}
    jobs = [j for j in bench_jobs(recipes, llama_mixes, solve_at) if (j.maker, j.name) not in measured]
    if rows:
        ctx.logger.info("bench %s: %d rows kept from %s", stem, len(rows), files[1])
    judged = text if text is not None else evaluation_text(ctx.cache_dir)
    imx = as_imatrix(imatrix)
    chosen = None
    if any(j.solve_at is not None for j in jobs):
        chosen = as_profile(profile) if profile is not None else measure_profile(
            ref, imx, calibration_text(ctx.cache_dir), ctx=ctx)  # fmt: skip
    inventory = describe(ref, str(ref), ctx.cache_dir).inventory()  # remembered: no second parse of the header
    quiet = dataclasses.replace(ctx, progress=None)
    with tempfile.TemporaryDirectory(prefix="dynq-bench-", dir=out) as tmp:
        for job in jobs:
            work = Path(tmp) / f"{ref.stem}-{job.maker}-{_UNSAFE.sub('_', job.name)}.gguf"
            started = time.perf_counter()
            if job.solve_at is not None:
                target = _target_bytes(job.solve_at, rows, inventory.n_parameters)
                quantize_for(ref, target, work, imatrix=imx, profile=chosen, name=job.name, ctx=quiet)
            elif job.recipe is not None:
                # No encoding cache: the time column must be what a user waits for.
                quantize(resolve(load_recipe(job.recipe), inventory), work, imatrix=imx, ctx=quiet)
            else:
                assert job.mix is not None
                _llama_quantize(ref, job.mix, work, Path(imatrix) if imatrix is not None else None, ctx)
            seconds = time.perf_counter() - started
            scores = evaluate(work, ref, judged.text, judged.provenance, n_ctx=n_ctx, n_chunks=chunks, ctx=quiet)
            loops = loop_rate(generate(work, loop_tokens, ctx.threads)) if loop_tokens else float("nan")
            summary = summarize(GGUFModel(work))
            row = BenchRow(job.name, job.maker, summary.total_bytes, summary.bpw, scores.ppl, scores.kld_mean,
                           scores.kld_p99, scores.top1, loops, seconds, scores.kld_p999, scores.kld_max,
                           scores.kld_over_1)  # fmt: skip
            if keep is not None:
                shutil.move(work, kept_path(keep, stem, job.name))
            else:
                work.unlink()
            rows.append(row)
            _write(files, rows, title, settings)
            if on_row is not None:
                on_row(row)
    markdown = markdown_table(rows, title, settings)
    plot(rows, files[2], stem)
    return BenchResult(rows, kept, *files, markdown)


def kept_path(keep: str | Path, stem: str, row: str) -> Path:
    """Where `bench(keep=)` puts the quant of row `row`."""
    return Path(keep) / f"{stem}-{_UNSAFE.sub('_', row)}.gguf"


def _write(files: tuple[Path, Path, Path], rows: Sequence[BenchRow], title: str, settings: str) -> None:
    files[0].write_text(markdown_table(rows, title, settings))
    files[1].write_text(json.dumps(rows_as_dicts(rows), indent=2) + "\n")


def _llama_quantize(ref: Path, mix: str, out: Path, imatrix: Path | None, ctx: RunContext) -> None:
    cmd = [str(tool("llama-quantize", ctx.cache_dir))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(ref), str(out), mix, str(ctx.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DynqError(f"llama-quantize {mix} failed: {done.stderr.strip().splitlines()[-1:]}")


def _target_bytes(spec: str, rows: Sequence[BenchRow], n_parameters: int) -> int:
    """`llama:MIX`: the tensor bytes of that llama.cpp mix as measured here (equal size, byte for byte); otherwise
    a size or bpw."""
    if not spec.startswith(LLAMA):
        return parse_target(spec, n_parameters)
    mix = spec.removeprefix(LLAMA)
    found = [r.bytes for r in rows if r.maker == "llama.cpp" and r.name == mix]
    if not found:
        raise DynqError(f"the solve at {spec} takes the size of llama.cpp's {mix} mix: bench that mix too")
    return found[0]
