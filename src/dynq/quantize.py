"""Quantize a model: plan every tensor, check the inputs, then stream one tensor at a time into GGUF.

Memory stays bounded by a few copies of the largest tensor: each tensor is read (memory-mapped), dequantized to
float32, encoded and written before the next one is touched.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter
from gguf import quantize as gguf_quantize

from dynq import __version__
from dynq.encode_cache import EncodeCache
from dynq.errors import DynqError
from dynq.gguf_io.imatrix import Imatrix, read_imatrix
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.writer import copy_metadata, streaming_writer
from dynq.kernels import F32Array, KernelBackend, U8Array, choose_backend, get_backend
from dynq.recipe.coverage import Coverage, imatrix_coverage
from dynq.recipe.plan import PlannedTensor, QuantPlan, resolve
from dynq.recipe.presets import load_recipe
from dynq.recipe.rules import Recipe
from dynq.sources.open import resolve_path
from dynq.types import QType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorDone:
    """Progress after one tensor: what was written so far, out of the planned total."""

    index: int
    n_tensors: int
    name: str
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class QuantizeResult:
    plan: QuantPlan
    files: list[Path]
    seconds: float
    peak_rss_bytes: int


def _encode_float(t: QType, values: F32Array) -> U8Array:
    if t.name == "F32":
        return values.astype(np.float32).view(np.uint8)
    if t.name == "F16":
        return values.astype(np.float16).view(np.uint8)
    return np.asarray(gguf_quantize(values, t.ggml)).view(np.uint8)  # BF16, round-to-nearest-even


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


def tensor_importance(p: PlannedTensor, imatrix: Imatrix | None) -> F32Array | None:
    """The imatrix's per-column importance for `p`, one row per matrix (expert), or None."""
    entry = imatrix.entries.get(p.info.name) if imatrix is not None else None
    if entry is None or (shaped := entry.with_row_length(p.info.row_length)) is None:
        return None
    return shaped.importance()


def encode_tensor(p: PlannedTensor, values: F32Array, backend: KernelBackend, importance: F32Array | None) -> U8Array:
    """Encode one planned tensor (numpy shape, row length last); 3-D expert tensors use each expert's importance."""
    if p.qtype.is_float:
        return _encode_float(p.qtype, values)
    k = p.info.row_length
    mats = values.reshape(-1, values.shape[-2], k) if values.ndim >= 2 else values.reshape(1, 1, k)
    if importance is not None and importance.shape[0] not in (1, mats.shape[0]):
        raise DynqError(f"imatrix entry {p.info.name} has {importance.shape[0]} matrices, tensor {mats.shape[0]}")
    parts = [
        backend.encode(p.qtype, mat, None if importance is None else importance[min(i, importance.shape[0] - 1)])
        for i, mat in enumerate(mats)
    ]
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def check_imatrix(plan: QuantPlan, imatrix: Imatrix | None, origin: str | None) -> None:
    """Stop before any work if a type llama.cpp requires an imatrix for would be written without one."""
    needing = plan.needing_imatrix()
    if imatrix is None:
        if needing:
            t = needing[0]
            raise DynqError(
                f"recipe {plan.recipe.name} puts {len(needing)} tensors at types that need an importance matrix "
                f"(e.g. {t.info.name} at {t.qtype.name}); pass --imatrix FILE"
            )
        return
    cov = imatrix_coverage(plan, imatrix, origin or "imatrix")
    missing = [c.name for c in cov if c.required and c.status is Coverage.MISSING]
    if missing:
        raise DynqError(
            f"{origin}: no data for {len(missing)} tensors whose type needs it (e.g. {missing[0]}); "
            "make the imatrix from this model"
        )


def _add_own_metadata(writer: GGUFWriter, plan: QuantPlan, imatrix: Imatrix | None, imatrix_path: str | None) -> None:
    writer.add_file_type((plan.dominant_type or plan.tensors[0].qtype).file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_string("dynq.version", __version__)
    writer.add_string("dynq.recipe.name", plan.recipe.name)
    writer.add_string("dynq.recipe", json.dumps(plan.recipe.to_dict(), separators=(",", ":")))
    if imatrix is not None and imatrix_path is not None:
        writer.add_array("dynq.imatrix.datasets", imatrix.datasets or ["unknown"])
        writer.add_uint32("dynq.imatrix.chunk_count", imatrix.chunk_count)
        # llama-quantize's keys, so llama.cpp tools show the provenance too
        writer.add_string("quantize.imatrix.file", Path(imatrix_path).name)
        if imatrix.datasets:
            writer.add_key_value("quantize.imatrix.dataset", imatrix.datasets[-1], GGUFValueType.STRING)
        writer.add_int32("quantize.imatrix.entries_count", len(imatrix.entries))
        writer.add_int32("quantize.imatrix.chunks_count", imatrix.chunk_count)


def _encoded(
    p: PlannedTensor, model: GGUFModel, kernels: KernelBackend, imatrix: Imatrix | None, cache: EncodeCache | None
) -> U8Array:
    importance = tensor_importance(p, imatrix)
    if cache is None or p.qtype.is_float:
        return encode_tensor(p, model.dequantize(p.info.name), kernels, importance)
    hit = cache.get(p.info.name, p.qtype.name, importance, p.nbytes)
    if hit is not None:
        return np.frombuffer(hit, dtype=np.uint8)
    data = encode_tensor(p, model.dequantize(p.info.name), kernels, importance)
    cache.put(p.info.name, p.qtype.name, importance, data.tobytes())
    return data


def quantize(
    source: str,
    recipe: str | Recipe,
    output: str | Path,
    imatrix: str | Path | None = None,
    threads: int = 1,
    split_max_size: int = 0,
    backend: str | None = None,
    progress: Callable[[TensorDone], None] | None = None,
    reuse_encoded: bool = False,
    device: str | None = None,
) -> QuantizeResult:
    """Quantize `source` (GGUF path or `zoo:X`) with `recipe` into `output` (plus shards if split).

    `reuse_encoded` keeps every encoded tensor in a disk cache and reuses it when another recipe asks for the
    same tensor at the same type (with the same importance data): several recipes of one model then cost little
    more than one."""
    started = time.perf_counter()
    out = Path(output)
    model = GGUFModel(resolve_path(source))
    if any(out.resolve() == p.resolve() for p in model.shards):
        raise DynqError(f"{out}: the output would overwrite the source; choose another name")
    r = load_recipe(recipe) if isinstance(recipe, str) else recipe
    plan = resolve(r, model.inventory())
    imx = read_imatrix(imatrix) if imatrix is not None else None
    check_imatrix(plan, imx, str(imatrix) if imatrix is not None else None)
    backend, device = choose_backend(backend, device)
    kernels = get_backend(backend, threads, device)
    cache = EncodeCache(model.shards, f"{backend}:{device}") if reuse_encoded else None
    log.info("quantizing %s with %s on %s/%s: %d tensors, %.2f GiB", source, plan.recipe.name, backend, device,
             len(plan.tensors), plan.total_bytes / 2**30)  # fmt: skip

    with streaming_writer(out, model.arch, split_max_size) as writer:
        copy_metadata(model, writer.writer)
        _add_own_metadata(writer.writer, plan, imx, str(imatrix) if imatrix is not None else None)
        for p in plan.tensors:
            writer.declare(p.info, p.nbytes, p.qtype.ggml)
        writer.begin()
        done = 0
        for i, p in enumerate(plan.tensors):
            data = _encoded(p, model, kernels, imx, cache)
            if data.nbytes != p.nbytes:
                raise DynqError(f"{p.info.name}: encoded {data.nbytes} bytes, planned {p.nbytes}")
            writer.write(data)
            model.release(p.info.name)
            done += p.nbytes
            if progress is not None:
                progress(TensorDone(i + 1, len(plan.tensors), p.info.name, done, plan.total_bytes))
        files = writer.finish()
    peak = peak_rss_bytes()
    return QuantizeResult(plan, files, time.perf_counter() - started, peak)
