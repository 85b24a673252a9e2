"""`dynq profile`: measured sensitivity of every weight tensor of a float reference, for a size-budget solver.

Two measurements (distortion.py has the parts that run no model, probes.py the probe model, profile_file.py the
format):
1. errors: per tensor and candidate type, the imatrix-weighted relative squared encode error on sampled rows;
2. probes: per group (one tensor kind over a few consecutive blocks, or token_embd / output alone), the mean KL
   divergence, on calibration text, of the reference with that group alone quantized at the probe type and
   dequantized back. S_g = KLD_g / Σ_{t∈g} e_t(probe type) calibrates the errors into KL divergence, so that
   KLD(mix) ≈ Σ_t S_t · e_t(type_t), additive over tensors.
Calibration text only: the evaluation text stays unseen, so judging the solver's quants on it stays fair.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dynq.budget.distortion import (
    DEFAULT_TYPES,
    ErrorsTask,
    check_float_reference,
    errors_task,
    probe_groups,
    probe_qtype,
    profiled_tensors,
    tensor_errors,
)
from dynq.budget.probes import LiveProbes
from dynq.budget.profile_file import (
    KLD_FLOOR,
    Method,
    ModelRef,
    Probe,
    Profile,
    ProfileSettings,
    TensorProfile,
    cache_key,
    cache_path,
    imatrix_ref,
    text_ref,
)
from dynq.calib.text import Text
from dynq.core.atomic import atomic_write_text
from dynq.core.context import RunContext, context
from dynq.core.importance import Imatrix
from dynq.core.qtypes import QType, qtype
from dynq.core.records import RecordFormat
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError, ResumeRequired
from dynq.eval.evaluate import reference_predictions
from dynq.executors import Executor
from dynq.gguf_io.gram import GramFile, GramLike, as_gram, open_gram, task_path
from dynq.gguf_io.partial import PartialOutput
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels.ggml import GgmlBackend
from dynq.quantize import encoder_name
from dynq.sources.described import describe
from dynq.sources.ref import SourceRef

log = logging.getLogger(__name__)

# The default settings: on the 1.5B model, 51 probes of 256 tokens in 2.7x one quantize's time. What four times the
# probe text and 7-block groups measured instead is in docs/solve.md.
ROWS = 128
GROUP_BLOCKS = 4
N_CTX = 256
CHUNKS = 1
PROBE_TYPE = "Q2_K"
DEFAULTS = ProfileSettings(
    types=DEFAULT_TYPES, rows=ROWS, group_blocks=GROUP_BLOCKS, probe_type=PROBE_TYPE, n_ctx=N_CTX, chunks=CHUNKS
)


def _method(types: Sequence[str], rows: int, group_blocks: int, probe_type: str, n_ctx: int, chunks: int) -> Method:
    names = tuple(dict.fromkeys(qtype(t).name for t in types))  # validated, upper case, first occurrence kept
    for name in names:
        if not qtype(name).quantizable:
            raise DynqError(f"type {name} is not one llama.cpp quantizes to; F16 and the source type come anyway")
    probe = qtype(probe_type)
    if not probe.quantizable:
        raise DynqError(f"probe type {probe.name} is not a quantized type; use e.g. Q2_K")
    if rows < 1 or n_ctx < 2 or chunks < 1 or group_blocks < 1:
        raise DynqError(
            f"rows ({rows}), n_ctx ({n_ctx}), chunks ({chunks}) and group_blocks ({group_blocks}) must be positive"
        )
    return Method(rows, probe.name, group_blocks, n_ctx, chunks, names)


def profile(
    source_path: str | os.PathLike[str],
    imatrix: Imatrix | None,
    text: Text,
    *,
    types: Sequence[str] = DEFAULT_TYPES,
    rows: int = ROWS,
    group_blocks: int = GROUP_BLOCKS,
    probe_type: str = PROBE_TYPE,
    n_ctx: int = N_CTX,
    chunks: int = CHUNKS,
    ctx: RunContext | None = None,
    resume: bool = False,
    executor: Executor | None = None,
    gram: GramLike | None = None,
) -> Profile:
    """The sensitivity profile of the float reference at `source_path` on calibration `text`, from the cache under
    ctx.cache_dir/profiles when one was made with the same model, imatrix, text and settings. While it is measured,
    each tensor's errors and each probe are kept beside the cache entry; `resume` continues an interrupted profile
    of the same inputs from them, and without it such a leftover is an error. With `executor` (local processes, a
    Ray cluster) the encode errors (a task per tensor) and the probes (a task per group) are measured there, with
    the same results. With `gram` (the Gram file of the imatrix's pass) errors and probes use the error-feedback
    encoder, so that a mix solved from the profile is chosen for the encoder `quantize(gram=...)` writes it with."""
    ctx = context(ctx)
    path = Path(source_path)
    described = describe(path, str(path), ctx.cache_dir)  # a profile from the cache needs no parse of the header
    tensors = profiled_tensors(described)
    check_float_reference(described, tensors)
    method = _method(types, rows, group_blocks, probe_type, n_ctx, chunks)
    grams = _checked_gram(gram, imatrix, tensors)
    if grams is not None:
        method = dataclasses.replace(method, encoder=encoder_name("ggml", "cpu", grams))
    model_ref = ModelRef(described.spec, described.fingerprint())
    imx_ref, txt_ref = imatrix_ref(imatrix), text_ref(text.text, text.provenance)
    cached = cache_path(ctx.cache_dir, path.stem, cache_key(model_ref.fingerprint, imx_ref, txt_ref, method))
    if cached.exists():
        ctx.logger.info("profile of %s from the cache: %s", path, cached)
        return Profile.load(cached)
    model = described.model
    backend = GgmlBackend(ctx.threads)
    groups = probe_groups(tensors, group_blocks)
    # the reference's predictions first: a text too short fails here, not after minutes of encoding
    reference_predictions(path, text.text, text.provenance, n_ctx, chunks, ctx)

    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = PartialOutput(cached)
    partial.lock()
    try:
        progress = ProfileProgress(partial.dir / "progress.json", cached.stem)
        if progress.path.exists() and not resume:
            raise ResumeRequired(path, "an interrupted profile with these inputs left its measurements", partial.dir)
        if resume:
            progress.load()
        errors, probes, error_seconds, probe_seconds = _measure(path, model, tensors, groups, imatrix, text, method,
                                                                backend, progress, ctx, executor, grams)  # fmt: skip
    finally:
        partial.unlock()

    by_name = {t.name: t for t in tensors}
    sensitivity: dict[str, float] = {}
    for p in probes:
        summed = sum(errors[n][_probe_name(by_name[n], method)] for n in p.tensors)
        # a group whose probe changed nothing measurable gets the floor, not zero: no tensor is free to degrade
        s = max(p.kld, method.kld_floor) / max(summed, 1e-30)
        sensitivity |= dict.fromkeys(p.tensors, s)
    group_of = {n: g for g, names in groups.items() for n in names}
    result = Profile(
        model=model_ref,
        imatrix=imx_ref,
        text=txt_ref,
        method=method,
        tensors={
            t.name: TensorProfile(group_of[t.name], sensitivity.get(t.name, _unprobed(sensitivity)), errors[t.name])
            for t in tensors
        },
        probes=tuple(probes),
        seconds={"errors": error_seconds, "probes": probe_seconds},
    )
    result.save(cached, overwrite=True)  # a run beside this one may have cached the same inputs meanwhile
    partial.remove()
    ctx.logger.info("profile of %s written to %s", path, cached)
    return result


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the progress file holds: the profile's cache key, the errors per tensor and the probes so far."""

    key: str
    errors: dict[str, dict[str, float]]
    probes: tuple[Probe, ...]


# Version 1 added the version key; a progress file from before it is the same record without one.
PROGRESS_FORMAT = RecordFormat(Measured, "profile progress file", 1, "delete its folder to start over", unversioned=1)


@dataclasses.dataclass
class ProfileProgress:
    """What a profile has measured so far (errors per tensor, probes), kept as JSON written to a temporary name and
    renamed after each tensor and each probe."""

    path: Path
    key: str
    errors: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    probes: list[Probe] = dataclasses.field(default_factory=list)

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
        except ValueError as e:  # torn or not text
            raise DynqError(f"{self.path}: unreadable ({e}); delete its folder to start over") from None
        found = PROGRESS_FORMAT.from_record(data, str(self.path))
        if found.key != self.key:
            raise DynqError(f"{self.path}: kept by a profile of other inputs; delete its folder to start over")
        self.errors, self.probes = found.errors, list(found.probes)
        log.info("%s: resuming after %d tensors and %d probes", self.path, len(self.errors), len(self.probes))

    def save(self) -> None:
        record = PROGRESS_FORMAT.to_record(Measured(self.key, self.errors, tuple(self.probes)))
        atomic_write_text(self.path, json.dumps(record))


def _checked_gram(gram: GramLike | None, imatrix: Imatrix | None, tensors: Sequence[TensorInfo]) -> GramFile | None:
    g = as_gram(gram)
    if g is None:
        return None
    if imatrix is None:
        raise DynqError(f"{g.path}: a profile with error feedback also needs the imatrix collected with it")
    g.check_against(imatrix, [t.name for t in tensors if g.matrix(t.name) is not None], "the imatrix")
    return g


def _measure(
    path: Path,
    model: GGUFModel,
    tensors: Sequence[TensorInfo],
    groups: dict[str, list[str]],
    imatrix: Imatrix | None,
    text: Text,
    method: Method,
    backend: GgmlBackend,
    progress: ProfileProgress,
    ctx: RunContext,
    executor: Executor | None,
    gram: GramFile | None,
) -> tuple[dict[str, dict[str, float]], list[Probe], float, float]:
    """The errors of every tensor (on `executor` when given, a task per tensor), then the probes, going on from what
    `progress` holds; returns both and the seconds each took in this run."""
    started = time.perf_counter()
    errors = progress.errors
    todo = [info for info in tensors if info.name not in errors]
    if executor is not None:
        ref = SourceRef.of(model, ctx.cache_dir)
        tasks = (ErrorsTask.of(ref, info, imatrix, method.types, method.rows, method.probe_type, method.seed, gram)
                 for info in todo)  # fmt: skip
        for i, (info, found) in enumerate(zip(todo, executor.ordered(errors_task, tasks), strict=True)):
            ctx.report("profile-errors", len(tensors) - len(todo) + i, len(tensors), "tensors", info.name)
            errors[info.name] = found
            progress.save()
    else:
        with ThreadPoolExecutor(max(1, ctx.threads)) as pool:
            for i, info in enumerate(todo):
                ctx.report("profile-errors", len(tensors) - len(todo) + i, len(tensors), "tensors", info.name)
                errors[info.name] = tensor_errors(model, info, imatrix, method.types, method.rows, backend,
                                                  method.probe_type, method.seed, pool, gram)  # fmt: skip
                progress.save()
    ctx.report("profile-errors", len(tensors), len(tensors), "tensors")
    error_seconds = time.perf_counter() - started
    ctx.logger.info("profile errors of %d tensors in %.1f s", len(tensors), error_seconds)

    started = time.perf_counter()
    probes = _run_probes(path, model, tensors, groups, imatrix, text, method, backend, ctx, progress, executor, gram)
    probe_seconds = time.perf_counter() - started
    ctx.logger.info("profile probes of %d groups in %.1f s", len(probes), probe_seconds)
    return errors, probes, error_seconds, probe_seconds


def _probe_name(info: TensorInfo, method: Method) -> str:
    t = probe_qtype(info, method.probe_type)
    assert t is not None  # only tensors with a probe type are probed
    return t.name


def _unprobed(sensitivity: dict[str, float]) -> float:
    """A tensor no probe could degrade (rows only F16 fits): the largest measured sensitivity, the cautious guess."""
    return max(sensitivity.values(), default=KLD_FLOOR)


def _run_probes(
    path: Path,
    model: GGUFModel,
    tensors: Sequence[TensorInfo],
    groups: dict[str, list[str]],
    imatrix: Imatrix | None,
    text: Text,
    method: Method,
    backend: GgmlBackend,
    ctx: RunContext,
    progress: ProfileProgress,
    executor: Executor | None,
    gram: GramFile | None,
) -> list[Probe]:
    """One probe per group: the group degraded in the work file, its mean KLD against the reference, restored;
    groups `progress` holds are not probed again. On `executor`, a task per group, each worker with a work file of
    its own."""
    by_name = {t.name: t for t in tensors}
    todo = []
    for g, names in groups.items():
        typed = [(by_name[n], pt) for n in names if (pt := probe_qtype(by_name[n], method.probe_type)) is not None]
        if typed:
            todo.append((g, typed))
    # the probes' evaluations report as probes, not as evaluations of their own
    quiet = dataclasses.replace(ctx, progress=None)
    probes = progress.probes
    done = {p.group for p in probes}
    if executor is not None:
        left = [(g, typed) for g, typed in todo if g not in done]
        ref = SourceRef.of(model, ctx.cache_dir)
        gram_path = task_path(gram)
        tasks = (ProbeTask(ref, g, tuple(typed), _entries(imatrix, [t.name for t, _ in typed]), text, method.n_ctx,
                           method.chunks, executor.task_threads or ctx.threads, gram_path)
                 for g, typed in left)  # fmt: skip
        for i, probe in enumerate(executor.ordered(probe_task, tasks)):
            ctx.report("profile-probes", len(todo) - len(left) + i, len(todo), "probes", probe.group)
            probes.append(probe)
            progress.save()
        ctx.report("profile-probes", len(todo), len(todo), "probes")
        return probes
    with LiveProbes(model, path, text, method.n_ctx, method.chunks, quiet) as live:
        for i, (g, typed) in enumerate(todo):
            if g in done:
                continue
            ctx.report("profile-probes", i, len(todo), "probes", g)
            started = time.perf_counter()
            kld = live.kld(typed, imatrix, backend, gram)
            probes.append(Probe(g, tuple(t.name for t, _ in typed), kld, time.perf_counter() - started))
            progress.save()
            ctx.logger.info("probe %s: KLD %.5f in %.1f s", g, kld, probes[-1].seconds)
        ctx.report("profile-probes", len(todo), len(todo), "probes")
    return probes


@dataclasses.dataclass(frozen=True)
class ProbeTask:
    """One probe as a worker runs it: the reference (reopened and checked by its `SourceRef`), the group and its
    probe types, the importance of the group's tensors, the calibration text and the evaluation settings."""

    source: SourceRef
    group: str
    typed: tuple[tuple[TensorInfo, QType], ...]
    imatrix: Imatrix | None
    text: Text
    n_ctx: int
    chunks: int
    threads: int
    gram: str | None = None  # the Gram file's path where the task runs


def _entries(imatrix: Imatrix | None, names: Sequence[str]) -> Imatrix | None:
    if imatrix is None:
        return None
    return Imatrix({n: imatrix.entries[n] for n in names if n in imatrix.entries})


@functools.lru_cache(maxsize=1)
def _live(source: SourceRef, text: Text, n_ctx: int, chunks: int, threads: int) -> LiveProbes:
    """This worker's open copy of the reference to degrade and restore, kept for the worker's life (a copy a dead
    worker left is removed by the next one made in that folder)."""
    ctx = RunContext(threads=threads, cache_dir=Path(source.cache_dir))
    model = source.reopen_gguf()
    return LiveProbes(model, model.path, text, n_ctx, chunks, ctx)


def probe_task(task: ProbeTask) -> Probe:
    """A worker's side of a `ProbeTask`."""
    started = time.perf_counter()
    live = _live(task.source, task.text, task.n_ctx, task.chunks, task.threads)
    kld = live.kld(list(task.typed), task.imatrix, GgmlBackend(task.threads), open_gram(task.gram))
    return Probe(task.group, tuple(t.name for t, _ in task.typed), kld, time.perf_counter() - started)
