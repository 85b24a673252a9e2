"""Quantize a plan: check the inputs, then stream one tensor at a time from its source into GGUF.

A plan goes in (made by `dynq.plan`, a solver, or edited by hand), so choosing and streaming stay apart. Memory
stays bounded by a few copies of the largest matrix: each tensor (each expert, for 3-D expert tensors) is loaded as
float32, encoded and written before the next one is touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter

from dynq.core.arrays import F32Array, U8Array
from dynq.core.context import RunContext, context
from dynq.core.importance import Imatrix, importance_row, importance_rows, n_matrices
from dynq.core.source import TensorSource, check_float_metadata
from dynq.encode_cache import EncodeCache
from dynq.errors import DynqError
from dynq.executors import Executor
from dynq.gguf_io.gram import GramFile, GramLike, as_gram, open_gram, task_path
from dynq.gguf_io.imatrix import ImatrixLike, as_imatrix
from dynq.gguf_io.writer import ChunkedBytes, OutputTensor, copy_metadata, encode_float, write_gguf
from dynq.kernels import KernelBackend, choose_backend, get_backend
from dynq.kernels.feedback import DEFAULT_DAMP, FEEDBACK_VERSION, encode_rows
from dynq.recipe.coverage import Coverage, imatrix_coverage
from dynq.recipe.plan import PlannedTensor, QuantPlan
from dynq.sources.content import TensorDigests, load_part
from dynq.sources.described import GGUFFile
from dynq.sources.open import open_source
from dynq.sources.ref import SourceRef
from dynq.version import __version__

# Keys a quantizer writes itself rather than copying from the source.
_REWRITTEN = ("general.file_type", "general.quantization_version")
_REWRITTEN_PREFIXES = ("quantize.imatrix.", "dynq.")


@dataclass(frozen=True)
class QuantizeResult:
    plan: QuantPlan
    files: list[Path]
    seconds: float
    peak_rss_bytes: int
    reused: int = 0  # tensors read back from the encode cache (reuse_encoded) instead of encoded


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, because ru_maxrss survives exec: a child started by a
    large process reports its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def encode_matrix(p: PlannedTensor, values: F32Array, backend: KernelBackend, importance: F32Array | None,
                  gram: GramFile | None = None) -> U8Array:  # fmt: skip
    """Encode one matrix (or 1-D tensor) of `p` at its planned type; `importance` is one row of the imatrix. With
    `gram`, a 2-D matrix the file has a Gram matrix for is encoded with error feedback through it."""
    if not np.isfinite(values).all():
        # llama.cpp's encoders turn NaN into arbitrary values or abort; a copy would carry it into the output
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise DynqError(f"{p.info.name}: {bad} weights are NaN or Inf in the source; the model file is damaged")
    if p.qtype.is_float:
        return encode_float(p.qtype, values)
    rows = values.reshape(-1, p.info.row_length)
    h = gram.matrix(p.info.name) if gram is not None and n_matrices(p.info) == 1 else None
    try:
        return encode_rows(backend, p.qtype, rows, importance, h)
    except DynqError as e:
        raise DynqError(f"{p.info.name}: {e}") from None
    finally:
        if h is not None and gram is not None:
            gram.release(p.info.name)


def encoded_parts(
    p: PlannedTensor,
    digests: TensorDigests,
    backend: KernelBackend,
    imatrix: Imatrix | None,
    gram: GramFile | None = None,
) -> list[Callable[[], U8Array]]:
    """One planned tensor's encoders in file order: the whole tensor, or one per expert of a 3-D expert tensor, each
    with its own importance. Each loads its part only when called (its digest kept in `digests`), so a writer that
    takes the parts one by one holds one expert at a time, however many experts the tensor has."""
    importance = importance_rows(p.info, imatrix)
    n_mat = n_matrices(p.info)

    def whole() -> U8Array:
        return encode_matrix(p, digests.load(p.info), backend, importance_row(importance, 0), gram).reshape(-1)

    def expert(e: int) -> U8Array:
        return encode_matrix(p, digests.load(p.info, e), backend, importance_row(importance, e)).reshape(-1)

    return [whole] if n_mat == 1 else [functools.partial(expert, e) for e in range(n_mat)]


@dataclass(frozen=True)
class EncodedPart:
    """What a worker sends back: the encoded bytes of one part and the digest of the source bytes it encoded."""

    data: U8Array
    digest: bytes


@dataclass(frozen=True)
class EncodeTask:
    """One tensor, or one expert of a 3-D one, as a worker encodes it: the worker reopens the source by its reference
    (which checks its fingerprint), so only this description travels and only the encoded bytes (and the digest of
    what they were made from) come back."""

    source: SourceRef
    planned: PlannedTensor
    expert: int | None
    importance: F32Array | None
    backend: str
    device: str
    threads: int  # the executor's threads per task
    gram: str | None = None  # the Gram file's path where the task runs, for error-feedback encoding


@functools.lru_cache(maxsize=4)
def _task_kernels(backend: str, device: str, threads: int) -> KernelBackend:
    return get_backend(backend, threads, device)


def encode_task(task: EncodeTask) -> EncodedPart:
    """A worker's side of an `EncodeTask`."""
    source = task.source.reopen()
    name = task.planned.info.name
    part = load_part(source, name, task.expert)
    kernels = _task_kernels(task.backend, task.device, task.threads)
    encoded = encode_matrix(task.planned, part.values, kernels, task.importance, open_gram(task.gram))
    if task.expert is None:
        source.release(name)
    return EncodedPart(encoded.reshape(-1), part.digest)


def _tasks(p: PlannedTensor, source: SourceRef, imatrix: Imatrix | None, backend: str, device: str,
           threads: int, gram: GramFile | None) -> list[EncodeTask]:  # fmt: skip
    importance = importance_rows(p.info, imatrix)
    gram_path = task_path(gram)

    def task(e: int | None) -> EncodeTask:
        return EncodeTask(source, p, e, importance_row(importance, e or 0), backend, device, threads, gram_path)

    return [task(None)] if n_matrices(p.info) == 1 else [task(e) for e in range(n_matrices(p.info))]


def encode_tensor(p: PlannedTensor, digests: TensorDigests, backend: KernelBackend, imatrix: Imatrix | None,
                  gram: GramFile | None = None) -> U8Array:  # fmt: skip
    """Load and encode one planned tensor into one array."""
    parts = encoded_parts(p, digests, backend, imatrix, gram)
    return parts[0]() if len(parts) == 1 else np.concatenate([part() for part in parts])


def check_imatrix(plan: QuantPlan, imatrix: Imatrix | None, origin: str) -> None:
    """Stop before any work if a type llama.cpp requires an imatrix for would be written without one."""
    needing = plan.needing_imatrix()
    if imatrix is None:
        if needing:
            t = needing[0]
            raise DynqError(
                f"recipe {plan.recipe.name} puts {len(needing)} tensors at types that need an importance matrix "
                f"(e.g. {t.info.name} at {t.qtype.name}); give it an importance matrix (imatrix)"
            )
        return
    cov = imatrix_coverage(plan, imatrix, origin)
    missing = [c.name for c in cov if c.required and c.status is Coverage.MISSING]
    if missing:
        raise DynqError(
            f"{origin}: no data for {len(missing)} tensors whose type needs it (e.g. {missing[0]}); "
            "make the imatrix from this model"
        )


def check_plan_matches(plan: QuantPlan, source: TensorSource) -> None:
    """The plan's tensors must be the source's, with the same shapes: a plan is made for one model."""
    have = {t.name: t.shape for t in source.inventory().tensors}
    for t in plan.tensors:
        if have.get(t.info.name) != t.info.shape:
            found = "no such tensor" if t.info.name not in have else f"shape {have[t.info.name]}"
            raise DynqError(
                f"{source.spec}: the plan has {t.info.name} {t.info.shape} but the source has {found}; "
                "make the plan from this model"
            )


def _add_own_metadata(writer: GGUFWriter, plan: QuantPlan, imatrix: Imatrix | None, imatrix_file: str | None,
                      encoder: str) -> None:  # fmt: skip
    writer.add_file_type((plan.dominant_type or plan.tensors[0].qtype).file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_string("dynq.version", __version__)
    # Which encoders wrote the bytes: the same inputs give the same bytes with the same encoders on the CPU, at any
    # thread count; on a GPU, floating-point order can change a rounding (docs/reliability.md).
    writer.add_string("dynq.encoder", encoder)
    # What it was made from, by name only (a checkpoint folder, a file, zoo:NAME): local paths stay private.
    writer.add_string(
        "dynq.source", Path(plan.source).name if not plan.source.startswith(("zoo:", "shapes:")) else plan.source
    )
    writer.add_string("dynq.recipe.name", plan.recipe.name)
    writer.add_string("dynq.recipe", json.dumps(plan.recipe.to_dict(), separators=(",", ":")))
    if imatrix is not None:
        writer.add_array("dynq.imatrix.datasets", imatrix.datasets or ["unknown"])
        writer.add_uint32("dynq.imatrix.chunk_count", imatrix.chunk_count)
        # llama-quantize's keys, so llama.cpp tools show the provenance too
        if imatrix_file is not None:
            writer.add_string("quantize.imatrix.file", imatrix_file)
        if imatrix.datasets:
            writer.add_key_value("quantize.imatrix.dataset", imatrix.datasets[-1], GGUFValueType.STRING)
        writer.add_int32("quantize.imatrix.entries_count", len(imatrix.entries))
        writer.add_int32("quantize.imatrix.chunks_count", imatrix.chunk_count)


def _inputs_key(imatrix: Imatrix | None, encoder: str) -> str:
    """Everything the output bytes depend on beyond its header (which holds the plan, types and metadata) and the
    source tensors (each checked by its own digest, sources/content.py): the importance data and the encoders. A
    resume is allowed only when this is unchanged."""
    h = hashlib.sha256(json.dumps([__version__, encoder]).encode())
    if imatrix is not None:
        for name in sorted(imatrix.entries):
            entry = imatrix.entries[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(entry.sums, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(entry.counts, dtype=np.float32).tobytes())
    return h.hexdigest()


def _open_gram(gram: GramLike | None, plan: QuantPlan, imatrix: Imatrix | None,
               origin: str) -> GramFile | None:  # fmt: skip
    """The Gram file for error feedback, checked before any work against the imatrix of the same pass."""
    g = as_gram(gram)
    if g is None:
        return None
    if imatrix is None:
        raise DynqError(f"{g.path}: error feedback also needs the imatrix collected with it")
    weights = [p.info.name for p in plan.tensors if not p.qtype.is_float and g.matrix(p.info.name) is not None]
    if not weights:
        raise DynqError(f"{g.path}: no Gram matrix for any tensor of {plan.source}; collect it from this model")
    g.check_against(imatrix, weights, origin)
    return g


def encoder_name(backend: str, device: str, gram: GramFile | None) -> str:
    """What the output records as `dynq.encoder`, and what resumes, the encode cache and profiles are keyed by."""
    if gram is None:
        return f"{backend}:{device}"
    return f"feedback-v{FEEDBACK_VERSION}-damp{DEFAULT_DAMP}({backend}):{device}:gram-{gram.digest[:16]}"


def _rewritten(key: str) -> bool:
    return key in _REWRITTEN or key.startswith(_REWRITTEN_PREFIXES)


def quantize(
    plan: QuantPlan,
    output: str | os.PathLike[str],
    *,
    imatrix: ImatrixLike | None = None,
    ctx: RunContext | None = None,
    backend: str | None = None,
    split_max_size: int = 0,
    reuse_encoded: bool = False,
    source: TensorSource | None = None,
    resume: bool = False,
    overwrite: bool = False,
    executor: Executor | None = None,
    gram: GramLike | None = None,
) -> QuantizeResult:
    """Write `plan` into `output` (plus shards if `split_max_size`), reading weights from the plan's source.

    `source` is reopened from `plan.source` unless given. `backend` is `ggml` (llama.cpp's encoders) or `torch`
    (dynq's; default when the context's device is a GPU). `reuse_encoded` keeps every encoded tensor in a disk
    cache keyed by the source tensor's full content, so several recipes of one model cost little more than one.
    `resume` continues a run of the same inputs that was interrupted (its verified tensors whose source tensors are
    unchanged are kept, the result is the same bytes); without it, such a leftover is an error. An existing output
    (any file of a split set) is replaced only with `overwrite`. `executor` (dynq.executor: local processes or a Ray
    cluster) encodes the tensors, one expert per task, elsewhere; the bytes are the same as here. `gram` (a Gram
    file from `collect_gram`, with the imatrix of the same pass) encodes every 2-D weight it has a matrix for with
    error feedback (kernels/feedback.py); the others as without it."""
    started = time.perf_counter()
    ctx = context(ctx)
    out = Path(output)
    # described from the cache: the header is parsed once, when the weights are first read
    src = source if source is not None else open_source(plan.source, ctx.cache_dir)
    if isinstance(src, GGUFFile) and any(out.resolve() == p.resolve() for p in src.shards):
        raise DynqError(f"{out}: the output would overwrite the source; choose another name")
    if not plan.tensors:
        raise DynqError(f"{plan.source}: no tensors to quantize (a vocabulary-only file?)")
    check_plan_matches(plan, src)
    imx = as_imatrix(imatrix)
    origin = imx.path if imx is not None else None  # the file it was read from, named in messages and the output
    imatrix_file = Path(origin).name if origin is not None else None
    if imx is not None:
        imx.check(origin or "imatrix")
    check_imatrix(plan, imx, origin or "imatrix")
    grams = _open_gram(gram, plan, imx, origin or "the imatrix")
    check_float_metadata(src.metadata_fields(), src.spec)  # what the output would carry to a runtime
    backend, device = choose_backend(backend, ctx.device)
    kernels = get_backend(backend, ctx.threads, device)
    encoder = encoder_name(backend, device, grams)
    cache = EncodeCache(encoder, ctx.cache_dir) if reuse_encoded else None
    digests = TensorDigests(src)
    ctx.logger.info("quantizing %s with %s by %s: %d tensors, %.2f GiB", plan.source, plan.recipe.name, encoder,
                    len(plan.tensors), plan.total_bytes / 2**30)  # fmt: skip
    planned = {p.info.name: p for p in plan.tensors}

    if executor is not None and cache is not None:
        raise DynqError("reusing encoded tensors works in one process; leave it out when encoding elsewhere")
    remote: list[Iterator[EncodedPart]] = []  # the executor's results, started at the first tensor asked for

    def encoded(t: OutputTensor) -> U8Array | ChunkedBytes:
        p = planned[t.info.name]
        if executor is not None:
            if not remote:
                first = plan.tensors.index(p)
                ref = SourceRef.of(src, ctx.cache_dir)
                threads = executor.task_threads or ctx.threads
                tasks = (task for q in plan.tensors[first:]
                         for task in _tasks(q, ref, imx, backend, device, threads, grams))  # fmt: skip
                remote.append(executor.ordered(encode_task, tasks))

            def take() -> U8Array:
                part = next(remote[0])
                digests.add(p.info.name, part.digest)
                return part.data

            n_mat = n_matrices(p.info)
            return take() if n_mat == 1 else ChunkedBytes([take] * n_mat, p.nbytes)
        if cache is None:
            parts = encoded_parts(p, digests, kernels, imx, grams)
            return parts[0]() if len(parts) == 1 else ChunkedBytes(parts, p.nbytes)
        importance = importance_rows(p.info, imx)
        content = digests.current(p.info)  # every byte read, nothing decoded for a GGUF source
        if (hit := cache.get(content, p.qtype.name, importance, p.nbytes)) is not None:
            digests.known(p.info.name, content)
            return np.frombuffer(hit, dtype=np.uint8)
        data = encode_tensor(p, digests, kernels, imx, grams)
        made_from = digests.made_from(p.info)  # the bytes encoded: the same as `content` unless the file just changed
        digests.known(p.info.name, made_from)
        cache.put(made_from, p.qtype.name, importance, data.tobytes())
        return data

    done = 0

    def written(index: int, t: OutputTensor) -> None:
        nonlocal done
        src.release(t.info.name)
        done += t.nbytes
        where = f" ({executor.name})" if executor is not None else ""
        ctx.report("quantize", done, plan.total_bytes, "bytes", f"{index + 1}/{len(plan.tensors)} {t.info.name}{where}")

    def metadata(writer: GGUFWriter) -> None:
        copy_metadata(src.metadata_fields(), writer, drop=_rewritten)
        _add_own_metadata(writer, plan, imx, imatrix_file, encoder)

    tensors = [OutputTensor(p.info, p.nbytes, p.qtype.ggml) for p in plan.tensors]
    inputs = _inputs_key(imx, encoder)
    files = write_gguf(out, plan.arch, tensors, encoded, metadata=metadata, split_max_size=split_max_size,
                       written=written, inputs=inputs, resume=resume, overwrite=overwrite, sources=digests)  # fmt: skip
    reused = cache.hits if cache is not None else 0
    if cache is not None:
        ctx.logger.info("%d of %d tensors read from the encode cache", reused, len(plan.tensors))
    return QuantizeResult(plan, files, time.perf_counter() - started, peak_rss_bytes(), reused)
