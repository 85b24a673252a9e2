"""Importance-matrix collection on llama.cpp's own runtime (llama-cpp-python), through the scheduler's eval callback.

The model runs over calibration text in chunks of `n_ctx` tokens exactly as `llama-imatrix` runs it (BOS at the
start of each chunk, the KV cache cleared between chunks). For every matrix multiplication whose weight is a block
tensor (`MUL_MAT`) and for every expert multiplication (`MUL_MAT_ID`), the callback adds the squares of the input
activations per input column, per expert for 3-D expert tensors, and counts the tokens.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dynq.core.atomic import atomic_path
from dynq.core.context import RunContext, context
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.errors import DynqError, ResumeRequired
from dynq.gguf_io.partial import PartialOutput
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels.ggml import ggml_library

log = logging.getLogger(__name__)

_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64
_GGML_TYPE_F32 = 0
_MIN_TOKENS = 16  # llama-imatrix ignores small matrix multiplications (single-token decode steps)


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of the bundled ggml (ggml/include/ggml.h)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * _MAX_DIMS),
    ("nb", ctypes.c_size_t * _MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * _MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * _MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def tensor_view(t: GgmlTensor, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """The tensor's host data as a strided numpy array in numpy order [ne3, ne2, ne1, ne0]."""
    if not t.data:
        raise DynqError(f"activation {t.name.decode()} has no host data")
    ne = [int(t.ne[i]) for i in range(_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(_MAX_DIMS)]
    span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data))
    return np.lib.stride_tricks.as_strided(
        raw.view(dtype) if nb[0] == np.dtype(dtype).itemsize else raw,
        shape=tuple(reversed(ne)),
        strides=tuple(reversed(nb)),
    )


@dataclass
class _Stat:
    sums: npt.NDArray[np.float64]  # [n_mat, ne0]
    counts: npt.NDArray[np.int64]  # [n_mat]


class OpNames:
    """ggml's name of an op code (MUL_MAT, MUL_MAT_ID, ...), asked of the bundled library once per code."""

    def __init__(self) -> None:
        lib = ggml_library()
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        self._names: dict[int, str] = {}
        self._lib = lib

    def __call__(self, op: int) -> str:
        if op not in self._names:
            self._names[op] = (self._lib.ggml_op_name(op) or b"").decode()
        return self._names[op]


class ActivationStats:
    """The accumulator the eval callback feeds: Σx² per column and token counts, per weight (and expert)."""

    def __init__(self) -> None:
        self.stats: dict[str, _Stat] = {}
        self._op = OpNames()

    def wants(self, t: GgmlTensor) -> bool:
        op = self._op(t.op)
        if op == "MUL_MAT_ID":
            return True
        if op != "MUL_MAT":
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        big_enough = int(src1.ne[1]) >= _MIN_TOKENS and int(src1.type) == _GGML_TYPE_F32
        return big_enough and src0.name.decode().startswith("blk.")

    def _stat(self, name: str, n_mat: int, ne0: int) -> _Stat:
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = _Stat(np.zeros((n_mat, ne0)), np.zeros(n_mat, np.int64))
        elif s.sums.shape != (n_mat, ne0):
            raise DynqError(f"{name}: activations of shape {n_mat}×{ne0} after {s.sums.shape}; inconsistent graph")
        return s

    def collect(self, t: GgmlTensor) -> None:
        src0, src1 = t.src[0].contents, t.src[1].contents
        if any(int(n) == 0 for n in src1.ne):
            return
        name = src0.name.decode()
        x = tensor_view(src1, np.float32)  # [ne3, ne2, ne1, ne0]; squares summed per call in float32, across in float64
        ne0 = x.shape[-1]
        if self._op(t.op) == "MUL_MAT_ID":
            n_as = int(src0.ne[2])
            ids = tensor_view(t.src[2].contents, np.int32)[0, 0]  # [n_tokens, n_ids]
            s = self._stat(name, n_as, ne0)
            acts = x[0]  # [n_tokens, ne11, ne0]
            for slot in range(ids.shape[1]):
                xs = acts[:, slot % acts.shape[1], :]
                experts = ids[:, slot]
                np.add.at(s.sums, experts, xs * xs)
                s.counts += np.bincount(experts, minlength=n_as)
            return
        n2, n3 = int(src0.ne[2]), int(src0.ne[3])
        s = self._stat(name, n2 * n3, ne0)
        sq = np.einsum("abij,abij->abj", x, x)  # [ne3, ne2, ne0]
        for i3 in range(sq.shape[0]):
            for i2 in range(sq.shape[1]):
                s.sums[(i3 % n3) * n2 + (i2 % n2)] += sq[i3, i2]
        s.counts += x.shape[0] * x.shape[1] * x.shape[2] // (n2 * n3)

    def to_imatrix(self, datasets: Sequence[str], chunk_count: int, chunk_size: int) -> Imatrix:
        entries = {
            name: ImatrixEntry(s.sums.astype(np.float32), s.counts.astype(np.float32))
            for name, s in sorted(self.stats.items())
        }
        return Imatrix(entries, list(datasets), chunk_count, chunk_size)


def run_watching(
    model_path: str | Path,
    text: str,
    n_ctx: int,
    n_chunks: int | None,
    wants: Callable[[GgmlTensor], bool],
    seen: Callable[[GgmlTensor], None],
    step: str,
    ctx: RunContext,
    *,
    all_experts: bool = False,
    start: int = 0,
    after_chunk: Callable[[int], None] | None = None,
) -> int:
    """Run the model over `text` chunk by chunk from chunk `start` on; every graph node `wants` asks for is handed to
    `seen` once computed, and `after_chunk(chunks done)` follows each chunk (progress as `step`, in chunks). Returns
    the number of chunks of the text."""
    from dynq.llamacpp.runtime import LlamaRuntime, token_chunks

    failures: list[BaseException] = []

    def on_eval(t_ptr: int, ask: bool, _user: int) -> bool:
        # an exception cannot cross the C boundary: keep it, stop the graph, and raise it after llama_decode
        try:
            t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
            if ask:
                return wants(t)
            seen(t)
            return True
        except BaseException as e:
            failures.append(e)
            return False

    with LlamaRuntime(model_path, n_ctx, ctx.threads, eval_callback=on_eval, all_experts=all_experts) as rt:
        chunks = token_chunks(rt.tokenize(text), n_ctx, n_chunks, "the calibration text")
        for i, chunk in enumerate(chunks):
            if i < start:
                continue
            rt.evaluate_chunk(chunk)
            if failures:
                raise failures[0]
            ctx.report(step, i + 1, len(chunks), "chunks")
            if after_chunk is not None:
                after_chunk(i + 1)
    return len(chunks)


class ChunkProgress:
    """The sums of the chunks done so far, kept in an output's partial folder (gguf_io/partial.py) so that an
    interrupted collection goes on after them and ends with the same bytes. Saved after a chunk when the time since
    the last save is at least ten times what that save took: every chunk for a small model, about once a minute
    for one whose sums take seconds to write."""

    def __init__(self, partial: PartialOutput, key: str) -> None:
        self.path = partial.dir / "imatrix-progress.npz"
        self.key = key
        self._saved_at = time.monotonic()
        self._save_seconds = 0.0

    def load(self, stats: ActivationStats) -> int:
        """Chunks done by the interrupted run (their sums into `stats`), or 0."""
        try:
            with np.load(self.path) as data:
                meta = json.loads(str(data["meta"]))
                if meta["key"] != self.key:
                    raise DynqError(f"{self.path}: kept by a run on other inputs; delete its folder to start over")
                for i, name in enumerate(meta["names"]):
                    stats.stats[name] = _Stat(data[f"sums{i}"], data[f"counts{i}"])
                return int(meta["chunks"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, OSError) as e:
            raise DynqError(f"{self.path}: unreadable ({e}); delete its folder to start over") from None

    def maybe_save(self, stats: ActivationStats, chunks: int) -> None:
        if time.monotonic() - self._saved_at < 10 * self._save_seconds:
            return
        started = time.monotonic()
        names = sorted(stats.stats)
        arrays: dict[str, npt.NDArray[Any]] = {"meta": np.array(json.dumps({"key": self.key, "chunks": chunks,
                                                                            "names": names}))}  # fmt: skip
        for i, n in enumerate(names):
            arrays[f"sums{i}"], arrays[f"counts{i}"] = stats.stats[n].sums, stats.stats[n].counts
        with atomic_path(self.path) as tmp, tmp.open("wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        self._saved_at = time.monotonic()
        self._save_seconds = self._saved_at - started


def collect_imatrix(
    model_path: str | Path,
    text: str,
    datasets: Sequence[str],
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    all_experts: bool = False,
    ctx: RunContext | None = None,
    output: Path | None = None,
    resume: bool = False,
) -> Imatrix:
    """Run the model over `text` and return its importance matrix (progress in chunks).

    `all_experts` routes every token through every expert (llama.cpp's `expert_used_count` raised to
    `expert_count` for the run), so that no expert is left without statistics. It changes the forward pass: later
    layers see activations of a denser mixture than the trained one.

    With `output` (the file the imatrix will be saved to), completed chunks are kept in its partial folder while the
    collection runs; `resume` continues an interrupted collection of the same inputs after them, and without it such
    a leftover is an error. Saving the imatrix to `output` (gguf_io/imatrix.py) removes the folder.
    """
    ctx = context(ctx)
    stats = ActivationStats()
    if output is None:
        chunks = run_watching(model_path, text, n_ctx, n_chunks, stats.wants, stats.collect, "imatrix", ctx,
                              all_experts=all_experts)  # fmt: skip
        return stats.to_imatrix(datasets, chunks, n_ctx)
    partial = PartialOutput(output)
    partial.lock()
    try:
        key = json.dumps([GGUFModel(model_path).fingerprint(), hashlib.sha256(text.encode()).hexdigest(), n_ctx,
                          n_chunks, all_experts, list(datasets)])  # fmt: skip
        progress = ChunkProgress(partial, hashlib.sha256(key.encode()).hexdigest())
        if progress.path.exists() and not resume:
            raise ResumeRequired(output, "an interrupted collection left its chunks", partial.dir)
        start = progress.load(stats) if resume else 0
        if start:
            log.info("%s: resuming after %d chunks", output, start)
        chunks = run_watching(model_path, text, n_ctx, n_chunks, stats.wants, stats.collect, "imatrix", ctx,
                              all_experts=all_experts, start=start,
                              after_chunk=lambda done: progress.maybe_save(stats, done))  # fmt: skip
        return stats.to_imatrix(datasets, chunks, n_ctx)
    finally:
        partial.unlock()
