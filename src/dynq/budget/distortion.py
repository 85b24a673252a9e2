"""What encoding costs a tensor, measured without running the model: which tensors are profiled, each tensor's
imatrix-weighted encode error per candidate type on sampled rows, and the probe groups the errors are calibrated by
(probes.py measures them; profile_file.py is the format).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from gguf import dequantize

from dynq.core.arrays import F32Array
from dynq.core.importance import Imatrix, importance_row, importance_rows, n_matrices
from dynq.core.qtypes import F16, FLOATS, QType, fallback_for, qtype
from dynq.core.tensors import TensorClass, TensorInfo
from dynq.errors import DynqError
from dynq.gguf_io.gram import GramFile, open_gram, task_path
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels import KernelBackend
from dynq.kernels.feedback import encode_with_feedback, inverse_factor
from dynq.kernels.ggml import GgmlBackend
from dynq.recipe.plan import resolve
from dynq.recipe.presets import load_recipe
from dynq.sources.described import GGUFFile
from dynq.sources.ref import SourceRef

# Candidates by default: every type llama-quantize writes for ordinary models. The ternary types (TQ1_0, TQ2_0) fit
# only ternary-trained weights and MXFP4 only models trained in it; measuring them elsewhere costs encode time for
# choices a solver should never make. Pass them in `types` to measure them anyway.
DEFAULT_TYPES: tuple[str, ...] = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
)  # fmt: skip


def profiled_tensors(model: GGUFFile) -> list[TensorInfo]:
    """The tensors a default plan quantizes: every weight matrix except the keep-list (norms, router, 1-D)."""
    plan = resolve(load_recipe("uniform-q8_0"), model.inventory())
    return [p.info for p in plan.tensors if not p.kept]


def check_float_reference(model: GGUFFile, tensors: Sequence[TensorInfo]) -> None:
    stored = [t for t in tensors if t.dtype.name not in FLOATS]
    if stored:
        t = stored[0]
        raise DynqError(
            f"{model.path}: {t.name} is {t.dtype.name}; profile needs a float reference (F16/BF16/F32); "
            f"make one with `dynq quantize SRC -r f16 -o ref.gguf`"
        )


def candidate_types(info: TensorInfo, types: Sequence[str], has_importance: bool) -> list[QType]:
    """The quantized types of `types` a tensor can take: the block divides its rows, gguf can decode it, and a type
    llama.cpp refuses without an imatrix only when the tensor has data (embeddings and output are exempt, as in
    llama-quantize)."""
    exempt = info.tensor_class in (TensorClass.EMBEDDINGS, TensorClass.OUTPUT)
    out = []
    for name in types:
        t = qtype(name)
        if t.is_float or not t.fits(info.row_length) or not t.decodable:
            continue
        if t.imatrix_required and not (has_importance or exempt):
            continue
        out.append(t)
    return out


def probe_qtype(info: TensorInfo, probe_type: str) -> QType | None:
    """The probe's type for this tensor: `probe_type`, or llama.cpp's fallback when its block does not divide the
    row (Q2_K → Q4_0, IQ types → IQ4_NL); None when only F16 would fit (nothing to probe)."""
    t = fallback_for(qtype(probe_type), info.row_length)
    return None if t.is_float else t


def rows2d(model: GGUFModel, name: str, info: TensorInfo) -> np.ndarray:
    """The tensor's stored data as [all rows of all matrices, row bytes or elements], memory-mapped."""
    data = model.raw(name)
    n_rows = info.n_elements // info.row_length
    return data.reshape(n_rows, -1)


def dequantized(stored: np.ndarray, t: QType) -> F32Array:
    return np.array(dequantize(stored, t.ggml), dtype=np.float32, copy=True)


def sample_rows(info: TensorInfo, rows: int, seed: int) -> np.ndarray:
    """Up to `rows` flat row indices (over every matrix of a 3-D tensor), one drawn in each of `rows` equal strata:
    deterministic for (seed, name), and spread over the whole tensor and every expert."""
    total = info.n_elements // info.row_length
    count = min(rows, total)
    name_seed = int.from_bytes(hashlib.sha256(info.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_seed])
    edges = np.linspace(0, total, count + 1).astype(np.int64)
    return np.asarray(rng.integers(edges[:-1], np.maximum(edges[1:], edges[:-1] + 1)), dtype=np.int64)


def _weighted_error(x: F32Array, y: F32Array, w: F32Array) -> tuple[float, float]:
    """(Σ w·(x−y)², Σ w·x²) over the rows of x, in float64."""
    d = (x.astype(np.float64) - y) ** 2
    return float((d * w).sum()), float((x.astype(np.float64) ** 2 * w).sum())


def tensor_errors(
    model: GGUFModel,
    info: TensorInfo,
    imatrix: Imatrix | None,
    types: Sequence[str],
    rows: int,
    backend: KernelBackend,
    probe_type: str,
    seed: int = 0,
    pool: Executor | None = None,
    gram: GramFile | None = None,
) -> dict[str, float]:
    """e(type) = Σ w·(x−x̂)² / Σ w·x² over sampled rows, w the imatrix importance of each row's matrix (ones without
    one), x̂ llama.cpp's encode decoded by gguf-py; plus F16 (round trip) and the stored type itself at 0. With a
    `gram` file that has this matrix's H, x̂ is the error-feedback encode and the error its output error on the
    calibration inputs, Σ (x−x̂) H (x−x̂)ᵀ / Σ x H xᵀ: the error of the encoder that will be used.

    The probe type is measured whatever `types` says: the sensitivity is calibrated against it."""
    importance = importance_rows(info, imatrix)
    source = qtype(info.dtype.name)
    idx = np.sort(sample_rows(info, rows, seed))
    per_matrix = info.n_elements // info.row_length // n_matrices(info)
    values = dequantized(rows2d(model, info.name, info)[idx], source)
    model.release(info.name)
    matrix_of = idx // per_matrix
    # one encode call per matrix: each expert's rows go with that expert's importance row
    parts = [(m, np.flatnonzero(matrix_of == m)) for m in np.unique(matrix_of)]
    weights = np.ones_like(values) if importance is None else importance[np.minimum(matrix_of, len(importance) - 1)]
    wanted = candidate_types(info, types, importance is not None)
    probe = probe_qtype(info, probe_type)
    if probe is not None and probe not in wanted:
        wanted.append(probe)

    h = gram.matrix(info.name) if gram is not None and n_matrices(info) == 1 else None
    if gram is not None and h is not None:
        try:
            return _output_errors(values, importance_row(importance, 0), np.asarray(h), wanted, backend, source)
        finally:
            gram.release(info.name)

    def error(t: QType) -> float:
        decoded = np.empty_like(values)
        for m, sel in parts:
            encoded = backend.encode(t, values[sel], importance_row(importance, int(m)))
            decoded[sel] = dequantized(encoded, t)
        return _relative(values, decoded, weights)

    # a few hundred rows are one C call per type, so the types are what runs in parallel (ctypes drops the GIL)
    found = pool.map(error, wanted) if pool is not None else map(error, wanted)
    errors = {t.name: e for t, e in zip(wanted, found, strict=True)}
    with np.errstate(over="ignore"):
        errors[F16.name] = _relative(values, values.astype(np.float16).astype(np.float32), weights)
    errors[source.name] = 0.0
    # a type that overflows (F16 of a BF16 model with huge values) is no choice at all
    return {t: e for t, e in errors.items() if np.isfinite(e)}


def _output_errors(values: F32Array, importance: F32Array | None, h: F32Array, wanted: Sequence[QType],
                   backend: KernelBackend, source: QType) -> dict[str, float]:  # fmt: skip
    """Each type's relative output error with error feedback through `h`, one type after another (the feedback
    encoder's column loop runs on the backend's threads); the factor of H⁻¹ is formed once for all of them."""
    factor = inverse_factor(h)
    h64, x = h.astype(np.float64), values.astype(np.float64)
    den = float(((x @ h64) * x).sum())

    def output_error(decoded: F32Array) -> float:
        e = x - decoded
        return float(((e @ h64) * e).sum()) / den if den > 0 else 0.0

    errors = {}
    for t in wanted:
        encoded = encode_with_feedback(t, values, importance, h, backend, threads=backend.threads, factor=factor)
        errors[t.name] = output_error(dequantized(encoded, t))
    with np.errstate(over="ignore"):
        errors[F16.name] = output_error(values.astype(np.float16).astype(np.float32))
    errors[source.name] = 0.0
    return {t: e for t, e in errors.items() if np.isfinite(e)}


@dataclass(frozen=True)
class ErrorsTask:
    """One tensor's encode errors as a worker measures them: it reopens the reference by its `SourceRef` (which checks
    its fingerprint); the imatrix travels as this tensor's entry only."""

    source: SourceRef
    info: TensorInfo
    imatrix: Imatrix | None
    types: tuple[str, ...]
    rows: int
    probe_type: str
    seed: int
    gram: str | None = None  # the Gram file's path where the task runs

    @staticmethod
    def of(source: SourceRef, info: TensorInfo, imatrix: Imatrix | None, types: Sequence[str], rows: int,
           probe_type: str, seed: int, gram: GramFile | None = None) -> ErrorsTask:  # fmt: skip
        entry = imatrix.entries.get(info.name) if imatrix is not None else None
        own = Imatrix({info.name: entry}) if entry is not None else None
        return ErrorsTask(source, info, own, tuple(types), rows, probe_type, seed, task_path(gram))


def errors_task(task: ErrorsTask) -> dict[str, float]:
    """A worker's side of an `ErrorsTask` (llama.cpp's encoders, one thread: a task has one CPU)."""
    return tensor_errors(task.source.reopen_gguf(), task.info, task.imatrix, task.types, task.rows, GgmlBackend(1),
                         task.probe_type, task.seed, gram=open_gram(task.gram))  # fmt: skip


def _relative(x: F32Array, y: F32Array, w: F32Array) -> float:
    num, den = _weighted_error(x, y, w)
    return num / den if den > 0 else 0.0


def probe_groups(tensors: Sequence[TensorInfo], group_blocks: int) -> dict[str, list[str]]:
    """Probe groups in model order: tensors of one kind over runs of `group_blocks` consecutive blocks (named
    `attn_q.weight@blk.0-3`); tensors outside the blocks (token_embd, output) each alone."""
    if group_blocks < 1:
        raise DynqError(f"group_blocks must be at least 1, not {group_blocks}")
    groups: dict[str, list[str]] = {}
    for t in tensors:
        if t.block is None:
            groups[t.name] = [t.name]
            continue
        start = t.block // group_blocks * group_blocks
        groups.setdefault(f"{t.kind}@blk.{start}-{start + group_blocks - 1}", []).append(t.name)
    return groups
