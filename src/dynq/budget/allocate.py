"""Choosing types for a size from a profile: solve (the exact knapsack over the profile's predicted costs), refine
(the kind weights searched against measured KL divergence), verify (the prediction beside a measurement) and
`quantize_for` (profile, solve and quantize in one call). The pure choosing is recipe/'s (solve.py,
solved_recipe.py, refine.py, target.py); this module runs it on a model and measures what it chose.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dynq.budget.profile import profile as measure_profile
from dynq.budget.profile_file import Profile, ProfileSettings, text_ref
from dynq.calib.text import Text, calibration_text
from dynq.core.atomic import atomic_write_text, check_new_output
from dynq.core.context import RunContext, context
from dynq.core.qtypes import QType, qtype
from dynq.core.tensors import kind_of
from dynq.core.units import parse_target
from dynq.errors import DynqError
from dynq.eval.evaluate import EvalResult, evaluate
from dynq.executors import Executor
from dynq.gguf_io.gram import GramFile, GramLike, as_gram
from dynq.gguf_io.imatrix import ImatrixLike, as_imatrix
from dynq.quantize import QuantizeResult, encoder_name, quantize
from dynq.recipe.plan import QuantPlan
from dynq.recipe.presets import RecipeLike, as_recipe
from dynq.recipe.refine import Refined, choice_key, scaled_costs
from dynq.recipe.refine import refine as search_weights
from dynq.recipe.rules import Recipe, compile_pattern
from dynq.recipe.solve import Solution
from dynq.recipe.solved_recipe import recipe_yaml, solve_plan
from dynq.recipe.target import pinned_by, solver_start
from dynq.runnable import runnable_file
from dynq.sources.checkpoint import HFCheckpoint
from dynq.sources.open import SourceLike, open_source

ProfileLike = Profile | str | os.PathLike[str]


@dataclass(frozen=True)
class Solved:
    """A solved allocation: the plan (quantize it), the recipe that writes it down, the solver's answer."""

    plan: QuantPlan
    recipe: Recipe
    solution: Solution
    target_bytes: int
    predicted_kld: float

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the recipe as YAML (atomically); `dynq.recipe(path)` reads it back to the same recipe. An existing
        file is replaced only with `overwrite`."""
        check_new_output(Path(path), overwrite)
        return atomic_write_text(path, recipe_yaml(self.recipe))


@dataclass(frozen=True)
class SolveRequest:
    """What a solve is asked beyond the model and the profile: the size, whether the quantize has an imatrix (types
    that need one are left out otherwise), the tensors a `base` recipe pins (its keep-list is kept), the candidate
    types (default: the profiled ones), tie patterns (their matches in one block share a type), the recipe's name."""

    target: int | str
    has_imatrix: bool
    base: RecipeLike | None = None
    types: Sequence[str] | None = None
    ties: Sequence[str] = ()
    name: str | None = None


def as_profile(profile: ProfileLike) -> Profile:
    return profile if isinstance(profile, Profile) else Profile.load(profile)


def solve(
    source: SourceLike,
    profile: ProfileLike,
    target: int | str,
    *,
    has_imatrix: bool,
    base: RecipeLike | None = None,
    types: Sequence[str] | None = None,
    ties: Sequence[str] = (),
    name: str | None = None,
    ctx: RunContext | None = None,
) -> Solved:
    """The types of least predicted damage whose file is at most `target` (bytes, or '600MiB', '2.5bpw') and within
    1% of it where reachable. `has_imatrix` says whether the quantize will have one (types that need it are left out
    otherwise); `base` rules pin the tensors they match and its keep-list is kept; `ties` are regexes whose matches
    in one block share a type."""
    request = SolveRequest(target, has_imatrix, base, types, ties, name)
    return _solver(source, as_profile(profile), request, context(ctx))({})


def _solver(source: SourceLike, prof: Profile, request: SolveRequest, ctx: RunContext) -> Callable[
        [Mapping[str, float]], Solved]:  # fmt: skip
    """The solve for one model and request, as a function of per-kind weights on the profile's costs (a kind left
    out weighs 1)."""
    patterns = [compile_pattern(t, f"tie {i + 1}") for i, t in enumerate(request.ties)]  # before any work
    opened = open_source(source, ctx.cache_dir)  # no weights are read: the description is enough
    # A checkpoint was profiled as the F16 GGUF it converts to (what llama.cpp runs): check against that one.
    checked = open_source(runnable_file(opened, ctx), ctx.cache_dir) if isinstance(opened, HFCheckpoint) else opened
    prof.check_model(checked)  # the conversion's fingerprint from its memo, not from a second parse
    inventory = opened.inventory()
    target = request.target
    target_bytes = target if isinstance(target, int) else parse_target(target, inventory.n_parameters)
    base = as_recipe(request.base) if request.base is not None else None
    start = solver_start(inventory, base)
    pinned = pinned_by(base, inventory) if base is not None else {}
    wanted = [qtype(t) for t in (request.types if request.types is not None else prof.method.types)]
    label = request.name or f"solved-{target if isinstance(target, str) else target_bytes}"
    measured = prof.costs()

    def solve_for(weights: Mapping[str, float]) -> Solved:
        costs = scaled_costs(measured, kind_of, weights) if weights else measured
        plan, solution = solve_plan(start, costs, wanted, target_bytes, has_imatrix=request.has_imatrix,
                                    pinned=pinned, ties=patterns, name=label, reported=measured)  # fmt: skip
        predicted = prof.predicted_kld({t.info.name: t.qtype.name for t in plan.tensors if not t.kept})
        return Solved(plan, plan.recipe, solution, target_bytes, predicted)

    return solve_for


@dataclass(frozen=True)
class RefinedSolve:
    """A solution improved against measured KL divergence: the refined Solved (its predicted_kld is the profile's,
    unweighted) and the search's record (measured KLD before and after, every mix tried)."""

    solved: Solved
    search: Refined


def refine(
    source: SourceLike,
    profile: ProfileLike,
    target: int | str,
    *,
    imatrix: ImatrixLike | None,
    text: Text | None = None,
    seconds: float = 600.0,
    chunks: int = 4,
    base: RecipeLike | None = None,
    types: Sequence[str] | None = None,
    ties: Sequence[str] = (),
    name: str | None = None,
    ctx: RunContext | None = None,
) -> RefinedSolve:
    """`solve`, then a search that weighs each tensor kind's predicted costs up or down and keeps the mix that
    measures best (recipe/refine.py), for about `seconds`. Each mix is quantized (encoded tensors are cached, so
    later mixes mostly reuse them) and judged on `chunks` chunks of the profile's own calibration text."""
    ctx = context(ctx)
    prof = as_profile(profile)
    calib = _profile_text(prof, text, ctx)
    imx = as_imatrix(imatrix)
    solve_for = _solver(source, prof, SolveRequest(target, imx is not None, base, types, ties, name), ctx)
    kinds = sorted({kind_of(n) for n in prof.tensors})
    solved: dict[tuple[tuple[str, str], ...], Solved] = {}

    def choose(weights: Mapping[str, float]) -> Mapping[str, QType]:
        found = solve_for(weights)
        solved.setdefault(choice_key(found.solution.choice), found)
        return found.solution.choice

    def measure(choice: Mapping[str, QType]) -> float:
        plan = solved[choice_key(choice)].plan
        with _scratch(ctx, plan.recipe.name) as out:
            quantize(plan, out, imatrix=imx, ctx=ctx, reuse_encoded=True)
            scores = evaluate(out, runnable_file(plan.source, ctx), calib.text, calib.provenance,
                              n_ctx=prof.method.n_ctx, n_chunks=chunks,
                              ctx=dataclasses.replace(ctx, progress=None))  # fmt: skip
        ctx.logger.info("refine: %s measured KLD %.4f", plan.recipe.name, scores.kld_mean)
        return scores.kld_mean

    search = search_weights(kinds, choose, measure, seconds=seconds)
    return RefinedSolve(solved[choice_key(search.choice)], search)


def _profile_text(prof: Profile, text: Text | None, ctx: RunContext) -> Text:
    """The calibration text the profile was measured on (the built-in one unless given); another text is refused."""
    calib = text if text is not None else calibration_text(ctx.cache_dir)
    if text_ref(calib.text, calib.provenance).sha256 != prof.text.sha256:
        raise DynqError(f"the profile was measured on another text ({prof.text.provenance}); use the same text")
    return calib


@contextmanager
def _scratch(ctx: RunContext, label: str) -> Iterator[Path]:
    """A temporary GGUF path in the cache, removed afterwards."""
    work = ctx.cache_dir / "verify"
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{os.getpid()}-{label.replace('/', '_')}.gguf"
    try:
        yield out
    finally:
        out.unlink(missing_ok=True)


@dataclass(frozen=True)
class Verified:
    """A solved plan quantized and measured: the profile's prediction beside the KL divergence it really has, on the
    profile's own calibration text and settings."""

    predicted_kld: float
    measured: EvalResult
    seconds: float


def verify(
    solved: Solved,
    profile: ProfileLike,
    *,
    imatrix: ImatrixLike | None = None,
    text: Text | None = None,
    ctx: RunContext | None = None,
) -> Verified:
    """Check the error model instead of trusting it: quantize `solved.plan` (into the cache, removed afterwards) and
    measure its KL divergence to the reference on the calibration text the profile was measured on."""
    ctx = context(ctx)
    prof = as_profile(profile)
    calib = _profile_text(prof, text, ctx)
    started = time.perf_counter()
    with _scratch(ctx, solved.plan.recipe.name) as out:
        quantize(solved.plan, out, imatrix=imatrix, ctx=ctx)
        measured = evaluate(out, runnable_file(solved.plan.source, ctx), calib.text, calib.provenance,
                            n_ctx=prof.method.n_ctx, n_chunks=prof.method.chunks, ctx=ctx)  # fmt: skip
    return Verified(solved.predicted_kld, measured, time.perf_counter() - started)


@dataclass(frozen=True)
class QuantizedFor:
    """A model quantized for a size: the profile it was solved from, the solution, and the quantize's result."""

    profile: Profile
    solved: Solved
    result: QuantizeResult


def quantize_for(
    source: SourceLike,
    target: int | str,
    output: str | os.PathLike[str],
    *,
    imatrix: ImatrixLike | None = None,
    profile: ProfileLike | None = None,
    text: Text | None = None,
    base: RecipeLike | None = None,
    types: Sequence[str] | None = None,
    ties: Sequence[str] = (),
    name: str | None = None,
    ctx: RunContext | None = None,
    executor: Executor | None = None,
    resume: bool = False,
    backend: str | None = None,
    split_max_size: int = 0,
    reuse_encoded: bool = False,
    overwrite: bool = False,
    measure: ProfileSettings | None = None,
    gram: GramLike | None = None,
) -> QuantizedFor:
    """Quantize `source` into a file of at most `target` bytes ('600MiB', '2.5bpw'): the profile (measured on
    `text`, default the built-in calibration text, or taken from the cache, unless `profile` is given), the solve,
    then the quantize of the solved plan. The imatrix is read once and serves all three; `ctx` (threads, device,
    progress) and `executor` serve every step; `resume` continues an interrupted profile or quantize. `measure`
    holds the profile's settings (dynq.profile's), `types` the solve's candidates. With `gram` the profile and the
    quantize both use the error-feedback encoder; a given profile must have been measured with that encoder."""
    ctx = context(ctx)
    imx = as_imatrix(imatrix)
    grams = as_gram(gram)
    opened = open_source(source, ctx.cache_dir)  # once, for all three steps: one parse, one fingerprint
    if profile is None:
        calib = text if text is not None else calibration_text(ctx.cache_dir)
        chosen = measure_profile(runnable_file(opened, ctx), imx, calib, ctx=ctx, resume=resume, executor=executor,
                                 gram=grams, **(measure or {}))  # fmt: skip
    else:
        chosen = as_profile(profile)
    check_profile_encoder(chosen, grams)
    request = SolveRequest(target, imx is not None, base, types, ties, name)
    solved = _solver(opened, chosen, request, ctx)({})
    result = quantize(solved.plan, output, imatrix=imx, ctx=ctx, backend=backend, split_max_size=split_max_size,
                      reuse_encoded=reuse_encoded, resume=resume, overwrite=overwrite, executor=executor,
                      source=opened, gram=grams)  # fmt: skip
    return QuantizedFor(chosen, solved, result)


def check_profile_encoder(profile: Profile, gram: GramFile | None) -> None:
    """A mix is chosen for one encoder: the profile's errors must be those of the encoder that will write it."""
    wanted = encoder_name("ggml", "cpu", gram) if gram is not None else ""
    if profile.method.encoder != wanted:
        measured = profile.method.encoder or "llama.cpp's encoders"
        writing = wanted or "llama.cpp's encoders"
        raise DynqError(f"the profile measured {measured} but the quantize would write with {writing}; profile with "
                        "the same Gram file, or quantize without one")  # fmt: skip
