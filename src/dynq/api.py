"""The public Python API, re-exported by the `dynq` package: a facade over the rooms that do the work. Every command
of the CLI is a call here; the CLI only parses options, fetches what is missing, draws, and words typed errors in its
flags. `quantize`, `offload`, `card`, `split`, `merge`, `export_ollama`, `bench` and the size budget's `solve`,
`refine`, `verify` and `quantize_for` are exported as they are.

Every call takes keyword-only options and an optional `RunContext` (threads, device, cache folder, progress
callback, logger); none of them touches the network or a compiler except `fetch` and `build_tools`, which exist
for exactly that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Unpack

from dynq.benchmark import BenchResult, bench
from dynq.budget.allocate import (
    ProfileLike,
    QuantizedFor,
    RefinedSolve,
    Solved,
    Verified,
    quantize_for,
    refine,
    solve,
    verify,
)
from dynq.budget.picture import plot_profile
from dynq.budget.profile import DEFAULTS as PROFILE_DEFAULTS
from dynq.budget.profile import profile as _profile
from dynq.budget.profile_file import Profile, ProfileSettings
from dynq.calib.collector import collect_imatrix as _collect
from dynq.calib.gram import collect_gram as _collect_gram
from dynq.calib.text import Text, calibration_text, evaluation_text, fetch_texts, read_texts, texts_cached
from dynq.card import DEFAULT_VRAM, ModelCard, card
from dynq.core.atomic import check_new_output
from dynq.core.context import Progress, RunContext, context
from dynq.core.importance import Imatrix
from dynq.core.qtypes import QType, qtype
from dynq.core.source import TensorSource
from dynq.deploy.memory import KV_TYPES
from dynq.deploy.offload import (
    AUTO_KV_TYPES,
    DEFAULT_CPU_BANDWIDTH,
    Hardware,
    OffloadPlan,
    Placement,
    Settings,
    offload,
)
from dynq.deploy.ollama import Message, OllamaExport, export_ollama
from dynq.deploy.run import Generation, Runner, Sampling
from dynq.deploy.shards import ShardsWritten, merge, split
from dynq.errors import BadInput, DynqError, LeftoverRun, NotCached, OutputExists, ResumeRequired, VersionMismatch
from dynq.eval.bench import BenchRow
from dynq.eval.evaluate import EvalResult
from dynq.eval.evaluate import evaluate as _evaluate
from dynq.eval.loops import Continuation, loop_rate
from dynq.eval.loops import generate as _generate
from dynq.executors import Executor, executor
from dynq.gguf_io.gram import GramFile, GramSet, write_gram
from dynq.gguf_io.imatrix import as_imatrix, read_imatrix, write_imatrix_dat, write_imatrix_gguf
from dynq.gguf_io.partial import partial_dir
from dynq.gguf_io.reader import GGUFModel
from dynq.inspect import FileSummary, summarize
from dynq.lab.rotate import rotate
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.tools import build_tools as _build_tools
from dynq.llamacpp.tools import tools_built as _tools_built
from dynq.llamacpp.tools import tools_dir
from dynq.quantize import QuantizeResult, quantize
from dynq.recipe.coverage import TensorCoverage, coverage_summary, imatrix_coverage
from dynq.recipe.llama_args import llama_quantize_command
from dynq.recipe.picture import plot_plans
from dynq.recipe.plan import QuantPlan, resolve
from dynq.recipe.presets import RecipeLike, as_recipe, preset_names
from dynq.recipe.rules import Recipe, recipe_from_dict
from dynq.runnable import f16_conversion, runnable_file
from dynq.sources import shapes, zoo
from dynq.sources.described import DescribedGGUF
from dynq.sources.open import SourceLike, gguf_path, open_gguf
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
    return resolve(as_recipe(recipe), _open_source(source, context(ctx).cache_dir).inventory())


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
    return _collect(runnable_file(source, ctx), calib.text, [calib.provenance], n_ctx=n_ctx, n_chunks=chunks,
                    all_experts=all_experts, ctx=ctx, output=Path(output) if output is not None else None,
                    resume=resume)  # fmt: skip


def collect_gram(
    source: SourceLike,
    *,
    text: Text | None = None,
    n_ctx: int = 512,
    chunks: int | None = None,
    ctx: RunContext | None = None,
) -> tuple[Imatrix, GramSet]:
    """One pass of `source` over `text` (default: the built-in calibration): its importance matrix and the Gram
    matrices H = Σ x xᵀ of its weights' inputs, for `quantize(gram=...)`'s error-feedback encoding. The Gram
    matrices stay in memory until `save_gram` writes them (about 4·d² bytes per distinct input of width d)."""
    ctx = context(ctx)
    calib = text if text is not None else calibration(ctx=ctx)
    return _collect_gram(runnable_file(source, ctx), calib.text, [calib.provenance], n_ctx=n_ctx, n_chunks=chunks,
                         ctx=ctx)  # fmt: skip


def save_gram(grams: GramSet, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write Gram matrices (gguf_io/gram.py's versioned GGUF file, memory-mapped when read); an existing file is
    replaced only with `overwrite`."""
    out = Path(path)
    check_new_output(out, overwrite)
    return write_gram(grams, out)


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
    return _evaluate(runnable_file(quant, ctx), runnable_file(ref, ctx), judged.text, judged.provenance,
                     n_ctx=n_ctx, n_chunks=chunks, ctx=ctx)  # fmt: skip


def save_imatrix(imatrix: Imatrix, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write `imatrix` in llama.cpp's GGUF format, or the legacy format for a `.dat` name; `read_imatrix` reads
    either. Removes the chunks `collect_imatrix(output=path)` kept for it. An existing file is replaced only with
    `overwrite`."""
    out = Path(path)
    check_new_output(out, overwrite)
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
    gram: str | os.PathLike[str] | GramFile | None = None,
    **settings: Unpack[ProfileSettings],
) -> Profile:
    """How much each tensor of a float reference hurts the output at each candidate type, measured on calibration
    text (default: the built-in calibration text, never the evaluation text); cached and reused across budgets.
    `settings`: types, rows, group_blocks, probe_type, n_ctx, chunks (defaults: dynq.budget.profile.profile's).
    `resume` continues an interrupted profile of the same inputs from what it had measured. `executor`
    (`dynq.executor(ray=...)`, local processes or a Ray cluster) measures the errors and the probes there. `gram`
    (with the imatrix of its pass) measures the error-feedback encoder instead of llama.cpp's."""
    ctx = context(ctx)
    imx = as_imatrix(imatrix)
    calib = text if text is not None else calibration(ctx=ctx)
    return _profile(runnable_file(source, ctx), imx, calib, ctx=ctx, resume=resume, executor=executor, gram=gram,
                    **settings)  # fmt: skip


def coverage(quant_plan: QuantPlan, imatrix: Imatrix | str | os.PathLike[str]) -> list[TensorCoverage]:
    """What `imatrix` covers of `quant_plan`; raises DynqError if it was made for another model."""
    imx = imatrix if isinstance(imatrix, Imatrix) else read_imatrix(imatrix)
    return imatrix_coverage(quant_plan, imx, imx.path or "imatrix")


def inspect(source: SourceLike, *, ctx: RunContext | None = None) -> FileSummary:
    """Types, sizes and key metadata of a GGUF file (or a cached `zoo:NAME`)."""
    model = source.model if isinstance(source, DescribedGGUF) else source
    if isinstance(model, GGUFModel):
        return summarize(model)
    if isinstance(model, TensorSource) or str(model).startswith(shapes.PREFIX) or Path(model).is_dir():
        raise DynqError(f"{getattr(model, 'spec', model)}: not a GGUF file; inspect reads GGUF files")
    return summarize(open_gguf(model, context(ctx).cache_dir))  # the summary reads the whole header: parsed now


def needs_fetch(name: str, *, ctx: RunContext | None = None) -> bool:
    """Whether `fetch(name)` has yet to run: a `zoo:NAME` model or the `texts` not in the cache. False for anything
    that needs nothing fetched (a path, a checkpoint folder, `shapes:NAME`)."""
    cache = context(ctx).cache_dir
    if name == TEXTS:
        return not texts_cached(cache)
    return name.startswith(zoo.PREFIX) and not zoo.zoo_model(name).path(cache).exists()


def tools_built(*, ctx: RunContext | None = None) -> bool:
    """Whether `build_tools` has built llama.cpp's tools into the cache (the llama.cpp mixes of `bench` need them)."""
    return _tools_built(context(ctx).cache_dir)


def gguf_file(model: str | os.PathLike[str], *, ctx: RunContext | None = None) -> Path:
    """The GGUF file a path or a cached `zoo:NAME` names (for a split model, the shard given)."""
    return gguf_path(model, context(ctx).cache_dir)


def presets() -> list[Recipe]:
    """The shipped recipes (each with its `name` and `description`)."""
    return [as_recipe(name) for name in preset_names()]


def zoo_models() -> list[str]:
    """The `zoo:NAME` models `fetch` can download."""
    return [zoo.PREFIX + name for name in zoo.names()]


def shape_inventories() -> list[str]:
    """The `shapes:NAME` inventories (real models' tensor names and shapes, no weights) `plan` and `offload` take."""
    return [shapes.PREFIX + name for name in shapes.inventory_names()]


def runner(model: str | os.PathLike[str], *, n_ctx: int = 4096, n_gpu_layers: int | None = None,
           seed: int | None = None, ctx: RunContext | None = None) -> Runner:  # fmt: skip
    """`model` (a GGUF path, any shard of a split, or a cached `zoo:NAME`) loaded in llama.cpp with `n_ctx` tokens of
    context and, unless `n_gpu_layers` says, the offload planner's GPU layers. `.complete(prompt, Sampling(),
    on_token)` streams a continuation, `.chat(messages, ...)` answers through the file's chat template; close it
    (or use `with`)."""
    ctx = context(ctx)
    return Runner(gguf_file(model, ctx=ctx), n_ctx, ctx.threads, n_gpu_layers, seed)


def loops(model: str | os.PathLike[str], *, tokens: int = 256, ctx: RunContext | None = None) -> list[Continuation]:
    """Greedy and sampled continuations of fixed prompts, `tokens` each, with where each ended; `loop_rate` of them
    is the share that fell into endless repetition."""
    ctx = context(ctx)
    return _generate(gguf_file(model, ctx=ctx), tokens, ctx.threads)


# fmt: off
__all__ = [
    "AUTO_KV_TYPES", "DEFAULT_CPU_BANDWIDTH", "DEFAULT_VRAM", "KV_TYPES", "PROFILE_DEFAULTS", "TEXTS",
    "BadInput", "BenchResult", "BenchRow", "Continuation", "DynqError", "EvalResult", "Executor", "FileSummary",
    "Generation", "GramFile", "GramSet", "Hardware", "Imatrix", "LeftoverRun", "Message", "ModelCard", "NotCached",
    "OffloadPlan", "OllamaExport", "OutputExists", "Placement", "Profile", "ProfileLike", "Progress", "QType",
    "QuantPlan", "QuantizeResult", "QuantizedFor", "Recipe", "RefinedSolve", "ResumeRequired", "RunContext", "Runner",
    "Sampling", "Settings", "ShardsWritten", "Solved", "TensorCoverage", "TensorSource", "Text", "Verified",
    "VersionMismatch",
    "__version__",
    "bench", "build_tools", "calibration", "card", "collect_gram", "collect_imatrix", "coverage", "coverage_summary",
    "evaluate", "evaluation", "executor", "export_ollama", "f16_conversion", "fetch", "gguf_file", "inspect",
    "llama_quantize_command", "loop_rate", "loops", "merge", "needs_fetch", "offload", "open_source", "plan",
    "plot_plans", "plot_profile", "presets", "profile", "qtype", "quantize", "quantize_for", "read_imatrix",
    "read_texts", "recipe", "recipe_from_dict", "refine", "rotate", "runner", "save_gram", "save_imatrix",
    "shape_inventories", "solve", "split", "tools_built", "verify", "write_synthetic", "zoo_models",
]
# fmt: on
