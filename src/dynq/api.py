"""The public Python API, re-exported by the `dynq` package. The CLI only parses options, asks for what must be
fetched or built, and draws. `quantize` (quantize.py), `offload` (deploy/offload.py) and `card` (deploy/card.py) are
exported as they are.

Every call takes keyword-only options and an optional `RunContext` (threads, device, cache folder, progress
callback, logger); none of them touches the network or a compiler except `fetch` and `build_tools`, which exist
for exactly that.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from dynq.calib.collector import collect_imatrix as _collect
from dynq.calib.profile import kind_of
from dynq.calib.profile_file import Profile, ProfileSettings, text_ref
from dynq.calib.text import Text, calibration_text, evaluation_text, fetch_texts
from dynq.card import ModelCard, card
from dynq.core.context import Progress, RunContext, context
from dynq.core.importance import Imatrix
from dynq.core.qtypes import QType, qtype
from dynq.core.source import TensorSource
from dynq.deploy.offload import Hardware, OffloadPlan, Settings, offload
from dynq.errors import DynqError
from dynq.eval.evaluate import EvalResult
from dynq.eval.evaluate import evaluate as _evaluate
from dynq.eval.probe import profile as _profile
from dynq.executors import Executor, executor
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_dat, write_imatrix_gguf
from dynq.gguf_io.partial import partial_dir
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import FileSummary, summarize
from dynq.llamacpp_tools import build_tools as _build_tools
from dynq.llamacpp_tools import tools_dir
from dynq.quantize import ImatrixLike, QuantizeResult, quantize
from dynq.recipe.budget import parse_target, pinned_by
from dynq.recipe.coverage import TensorCoverage, imatrix_coverage
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import RecipeLike, as_recipe
from dynq.recipe.refine import Refined, choice_key, scaled_costs
from dynq.recipe.refine import refine as _refine
from dynq.recipe.rules import Recipe, recipe_from_dict
from dynq.recipe.solve import Solution
from dynq.recipe.solved_recipe import solve_plan
from dynq.sources import zoo
from dynq.sources.checkpoint import HFCheckpoint
from dynq.sources.open import SourceLike, gguf_path, open_described
from dynq.sources.open import open_source as _open_source
from dynq.version import __version__

TEXTS = "texts"  # what `fetch` takes for the built-in calibration and evaluation texts


def open_source(source: SourceLike, *, ctx: RunContext | None = None) -> TensorSource:
    """A model to plan or quantize: a GGUF path (any shard of a split), `zoo:NAME` (fetched before), `shapes:NAME`,
    or an already opened source."""
    return _open_source(source, context(ctx).cache_dir)


def fetch(name: str, *, ctx: RunContext | None = None) -> Path:
    """Download `zoo:NAME` (returns the cached GGUF) or `texts` (the built-in texts; returns their folder) into the
    cache. The one API call that uses the network, besides `build_tools`."""
    ctx = context(ctx)
    if name == TEXTS:
        fetch_texts(ctx.cache_dir)
        return ctx.cache_dir / "texts"
    if not name.startswith(zoo.PREFIX):
        raise DynqError(f"cannot fetch '{name}'; fetch zoo:NAME (one of {', '.join(zoo.names())}) or {TEXTS}")
    model = zoo.zoo_model(name)
    if isinstance(model, zoo.DerivedModel):
        from dynq.moe.zoo_build import build_derived

        return build_derived(model, ctx)
    return zoo.fetch(name, ctx.cache_dir, ctx.progress)


def build_tools(*, ctx: RunContext | None = None) -> Path:
    """Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity from the pinned sdist (~4 min), once."""
    ctx = context(ctx)
    _build_tools(ctx.cache_dir)
    return tools_dir(ctx.cache_dir)


def plan(source: SourceLike, recipe: RecipeLike, *, ctx: RunContext | None = None) -> QuantPlan:
    """Every tensor's type and the reason, from names and shapes alone. `recipe` is a preset name, a YAML file or a
    Recipe. The plan is data: edit it (dataclasses.replace) and hand it to `quantize`."""
    return resolve(as_recipe(recipe), open_described(source, context(ctx).cache_dir).inventory())


def recipe(spec: RecipeLike) -> Recipe:
    """A recipe by preset name or YAML file; `recipe.to_dict()` is its data, `recipe_from_dict` builds one back."""
    return as_recipe(spec)


def calibration(*, ctx: RunContext | None = None) -> Text:
    """The built-in calibration text (fetched before with `fetch("texts")`)."""
    return calibration_text(context(ctx).cache_dir)


def evaluation(*, ctx: RunContext | None = None) -> Text:
    """The built-in evaluation text, disjoint from the calibration text."""
    return evaluation_text(context(ctx).cache_dir)


def collect_imatrix(
    source: SourceLike,
    *,
    text: Text | None = None,
    n_ctx: int = 512,
    chunks: int | None = None,
    all_experts: bool = False,
    ctx: RunContext | None = None,
    output: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> Imatrix:
    """An importance matrix of `source` (a GGUF llama.cpp runs) on `text` (default: the built-in calibration).
    With `output` (where `save_imatrix` will write it), completed chunks are kept beside it while collecting, and
    `resume` continues an interrupted collection after them (same bytes as an uninterrupted one)."""
    ctx = context(ctx)
    calib = text if text is not None else calibration(ctx=ctx)
    return _collect(_weights_file(source, ctx), calib.text, [calib.provenance], n_ctx=n_ctx, n_chunks=chunks,
                    all_experts=all_experts, ctx=ctx, output=Path(output) if output is not None else None,
                    resume=resume)  # fmt: skip


def evaluate(
    quant: SourceLike,
    ref: SourceLike,
    *,
    text: Text | None = None,
    n_ctx: int = 512,
    chunks: int | None = None,
    ctx: RunContext | None = None,
) -> EvalResult:
    """PPL, KL divergence, top-1 agreement and RMS Δp of `quant` against `ref` on `text` (default: the built-in
    evaluation text, which calibration never sees)."""
    ctx = context(ctx)
    judged = text if text is not None else evaluation(ctx=ctx)
    return _evaluate(_weights_file(quant, ctx), _weights_file(ref, ctx), judged.text, judged.provenance,
                     n_ctx=n_ctx, n_chunks=chunks, ctx=ctx)  # fmt: skip


def save_imatrix(imatrix: Imatrix, path: str | os.PathLike[str]) -> Path:
    """Write `imatrix` in llama.cpp's GGUF format, or the legacy format for a `.dat` name; `read_imatrix` reads
    either. Removes the chunks `collect_imatrix(output=path)` kept for it."""
    out = Path(path)
    (write_imatrix_dat if out.suffix == ".dat" else write_imatrix_gguf)(imatrix, out)
    shutil.rmtree(partial_dir(out), ignore_errors=True)  # the chunks a collection kept for it are done with
    return out


def profile(
    source: SourceLike,
    *,
    imatrix: Imatrix | str | os.PathLike[str] | None = None,
    text: Text | None = None,
    ctx: RunContext | None = None,
    resume: bool = False,
    executor: Executor | None = None,
    **settings: Unpack[ProfileSettings],
) -> Profile:
    """How much each tensor of a float reference hurts the output at each candidate type, measured on calibration
    text (default: the built-in calibration text, never the evaluation text); cached and reused across budgets.
    `settings`: types, rows, group_blocks, probe_type, n_ctx, chunks (defaults: dynq.eval.probe.profile's).
    `resume` continues an interrupted profile of the same inputs from what it had measured. `executor`
    (`dynq.executor(ray=...)`, local processes or a Ray cluster) measures the errors and the probes there."""
    ctx = context(ctx)
    imx = imatrix if imatrix is None or isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
    calib = text if text is not None else calibration(ctx=ctx)
    return _profile(_weights_file(source, ctx), imx, calib, ctx=ctx, resume=resume, executor=executor, **settings)


@dataclass(frozen=True)
class Solved:
    """A solved allocation: the plan (quantize it), the recipe that writes it down, the solver's answer."""

    plan: QuantPlan
    recipe: Recipe
    solution: Solution
    target_bytes: int
    predicted_kld: float


def solve(
    source: SourceLike,
    profile: Profile | str | os.PathLike[str],
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
    otherwise); `base` rules pin the tensors they match; `ties` are regexes whose matches in one block share a type."""
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    return _solver(source, prof, target, has_imatrix, base, types, ties, name, context(ctx))({})


def _solver(
    source: SourceLike,
    prof: Profile,
    target: int | str,
    has_imatrix: bool,
    base: RecipeLike | None,
    types: Sequence[str] | None,
    ties: Sequence[str],
    name: str | None,
    ctx: RunContext,
) -> Callable[[Mapping[str, float]], Solved]:
    """The solve for one model, size and set of constraints, as a function of per-kind weights on the profile's
    costs (a kind left out weighs 1)."""
    opened = open_described(source, ctx.cache_dir)  # no weights are read: the description is enough
    # A checkpoint was profiled as the F16 GGUF it converts to (what llama.cpp runs): check against that one.
    prof.check_model(f16_conversion(opened, ctx=ctx) if isinstance(opened, HFCheckpoint) else opened)
    inventory = opened.inventory()
    target_bytes = target if isinstance(target, int) else parse_target(target, inventory.n_parameters)
    start = resolve(as_recipe("uniform-q8_0"), inventory)  # any plan: the solver keeps its keep-list, types all
    pinned = pinned_by(as_recipe(base), inventory) if base is not None else {}
    wanted = [qtype(t) for t in (types if types is not None else prof.method.types)]
    label = name or f"solved-{target if isinstance(target, str) else target_bytes}"
    patterns = [re.compile(t) for t in ties]
    measured = prof.costs()

    def solve_for(weights: Mapping[str, float]) -> Solved:
        costs = scaled_costs(measured, kind_of, weights) if weights else measured
        plan, solution = solve_plan(start, costs, wanted, target_bytes, has_imatrix=has_imatrix, pinned=pinned,
                                    ties=patterns, name=label, reported=measured)  # fmt: skip
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
    profile: Profile | str | os.PathLike[str],
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
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    calib = _profile_text(prof, text, ctx)
    solve_for = _solver(source, prof, target, imatrix is not None, base, types, ties, name, ctx)
    kinds = sorted({kind_of(n) for n in prof.tensors})
    solved: dict[tuple[tuple[str, str], ...], Solved] = {}

    def choose(weights: Mapping[str, float]) -> Mapping[str, QType]:
        found = solve_for(weights)
        solved.setdefault(choice_key(found.solution.choice), found)
        return found.solution.choice

    def measure(choice: Mapping[str, QType]) -> float:
        plan = solved[choice_key(choice)].plan
        with _scratch(ctx, plan.recipe.name) as out:
            quantize(plan, out, imatrix=imatrix, ctx=ctx, reuse_encoded=True)
            ref = _weights_file(plan.source, ctx)
            scores = _evaluate(out, ref, calib.text, calib.provenance, n_ctx=prof.method.n_ctx, n_chunks=chunks,
                               ctx=dataclasses.replace(ctx, progress=None))  # fmt: skip
        ctx.logger.info("refine: %s measured KLD %.4f", plan.recipe.name, scores.kld_mean)
        return scores.kld_mean

    search = _refine(kinds, choose, measure, seconds=seconds)
    return RefinedSolve(solved[choice_key(search.choice)], search)


def _profile_text(prof: Profile, text: Text | None, ctx: RunContext) -> Text:
    """The calibration text the profile was measured on (the built-in one unless given); another text is refused."""
    calib = text if text is not None else calibration(ctx=ctx)
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
    profile: Profile | str | os.PathLike[str],
    *,
    imatrix: ImatrixLike | None = None,
    text: Text | None = None,
    ctx: RunContext | None = None,
) -> Verified:
    """Check the error model instead of trusting it: quantize `solved.plan` (into the cache, removed afterwards) and
    measure its KL divergence to the reference on the calibration text the profile was measured on."""
    ctx = context(ctx)
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    calib = _profile_text(prof, text, ctx)
    started = time.perf_counter()
    with _scratch(ctx, solved.plan.recipe.name) as out:
        quantize(solved.plan, out, imatrix=imatrix, ctx=ctx)
        ref = _weights_file(solved.plan.source, ctx)
        measured = _evaluate(out, ref, calib.text, calib.provenance, n_ctx=prof.method.n_ctx,
                             n_chunks=prof.method.chunks, ctx=ctx)  # fmt: skip
    return Verified(solved.predicted_kld, measured, time.perf_counter() - started)


def coverage(quant_plan: QuantPlan, imatrix: Imatrix | str | os.PathLike[str]) -> list[TensorCoverage]:
    """What `imatrix` covers of `quant_plan`; raises DynqError if it was made for another model."""
    imx = imatrix if isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
    return imatrix_coverage(quant_plan, imx, "imatrix" if isinstance(imatrix, Imatrix) else str(imatrix))


def inspect(source: SourceLike, *, ctx: RunContext | None = None) -> FileSummary:
    """Types, sizes and key metadata of a GGUF file (or a cached `zoo:NAME`)."""
    opened = open_source(source, ctx=ctx)
    if not isinstance(opened, GGUFModel):
        raise DynqError(f"{opened.spec}: not a GGUF file; inspect reads GGUF files")
    return summarize(opened)


def _weights_file(source: SourceLike, ctx: RunContext) -> Path:
    """The GGUF file llama.cpp's runtime loads for `source`."""
    if isinstance(source, GGUFModel):
        return source.path
    if isinstance(source, HFCheckpoint) or (not isinstance(source, TensorSource) and Path(source).is_dir()):
        return f16_conversion(source, ctx=ctx)
    if isinstance(source, TensorSource):
        raise DynqError(f"{source.spec}: llama.cpp runs GGUF files; quantize this source first")
    return gguf_path(source, ctx.cache_dir)


def f16_conversion(source: HFCheckpoint | str | os.PathLike[str], *, ctx: RunContext | None = None) -> Path:
    """A Hugging Face checkpoint's F16 GGUF (llama.cpp's conversion of it, byte for byte in its tensors), for what
    runs the model (imatrix, profile, evaluation); written once into the cache under the checkpoint's content
    fingerprint."""
    ctx = context(ctx)
    checkpoint = source if isinstance(source, HFCheckpoint) else HFCheckpoint(Path(source), ctx.cache_dir)
    path = ctx.cache_dir / "checkpoints" / f"{checkpoint.directory.name}-{checkpoint.fingerprint()[:24]}-f16.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize(resolve(as_recipe("f16"), checkpoint.inventory()), path, ctx=ctx, source=checkpoint)
    return path


__all__ = [
    "TEXTS",
    "DynqError",
    "EvalResult",
    "Executor",
    "FileSummary",
    "Hardware",
    "Imatrix",
    "ModelCard",
    "OffloadPlan",
    "Profile",
    "Progress",
    "QType",
    "QuantPlan",
    "QuantizeResult",
    "Recipe",
    "RefinedSolve",
    "RunContext",
    "Settings",
    "Solved",
    "TensorSource",
    "Text",
    "Verified",
    "__version__",
    "build_tools",
    "calibration",
    "card",
    "collect_imatrix",
    "coverage",
    "evaluate",
    "evaluation",
    "executor",
    "f16_conversion",
    "fetch",
    "inspect",
    "offload",
    "open_source",
    "plan",
    "profile",
    "qtype",
    "quantize",
    "read_imatrix",
    "recipe",
    "recipe_from_dict",
    "refine",
    "save_imatrix",
    "solve",
    "verify",
]
