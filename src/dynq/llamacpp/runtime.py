"""A thin, explicit handle on llama.cpp's runtime (llama-cpp-python's low-level API) for chunked evaluation.

Chunks are evaluated the way llama.cpp's perplexity and imatrix tools do it: the first token of every chunk is
replaced by BOS when the vocabulary adds one, and the KV cache is cleared before each chunk.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from dynq.errors import DynqError

log = logging.getLogger(__name__)

EvalCallback = Callable[[int, bool, int], bool]


def token_chunks(tokens: list[int], n_ctx: int, n_chunks: int | None, what: str) -> list[list[int]]:
    """Consecutive chunks of `n_ctx` tokens (at most `n_chunks`), as llama.cpp's tools cut a text; `what` names the
    text in the error when it is shorter than one chunk."""
    available = len(tokens) // n_ctx
    if available < 1:
        raise DynqError(f"{what} has {len(tokens)} tokens; at least {n_ctx} (one chunk) are needed")
    count = available if n_chunks is None else min(n_chunks, available)
    return [tokens[i * n_ctx : (i + 1) * n_ctx] for i in range(count)]


def llama() -> Any:
    """llama-cpp-python's low-level bindings, imported on first use (loading them loads llama.cpp)."""
    import llama_cpp

    return llama_cpp


class _LogSink:
    """llama.cpp's log, silenced (it writes to stderr) or captured. llama.cpp keeps the callback pointer for the
    life of the process, so there is one callback, made once and never freed, that routes to `lines` if set.
    Anything that sets a callback of its own and lets it go crashes the process at llama.cpp's next log line."""

    def __init__(self) -> None:
        self.lines: list[str] | None = None

    def __call__(self, level: int, text: bytes, user: Any) -> None:
        if self.lines is not None:
            self.lines.append(text.decode(errors="replace"))


@cache
def _quiet_llama() -> tuple[_LogSink, Any]:
    L = llama()
    sink = _LogSink()
    callback = L.llama_log_callback(sink)
    L.llama_log_set(callback, ctypes.c_void_p(0))
    return sink, callback


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """The lines llama.cpp logs while the block runs (an enclosing capture gets them too)."""
    sink, _ = _quiet_llama()
    previous, sink.lines = sink.lines, []
    lines = sink.lines
    try:
        yield lines
    finally:
        sink.lines = previous
        if previous is not None:
            previous.extend(lines)


class LlamaRuntime:
    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 512,
        threads: int = 1,
        eval_callback: EvalCallback | None = None,
        all_experts: bool = False,
        logits: bool = False,
        experts_used: int | None = None,
        mapped: bool = False,
    ) -> None:
        """`all_experts` routes every token through every expert; `experts_used` sets how many instead (MoE only).
        `mapped` asks llama.cpp to compute straight from its memory map of the file, with no repacked copies, so
        that bytes written into the file are the weights of the next evaluation; `weights_mapped` says whether
        llama.cpp did so."""
        L = self._L = llama()
        self._keep: list[Any] = [_quiet_llama()]
        L.llama_backend_init()
        path = Path(model_path)
        if not path.is_file():
            raise DynqError(f"{path}: no such model file")
        mparams = L.llama_model_default_params()
        if all_experts or experts_used is not None:
            self._keep.append(self._override_expert_count(path, mparams, None if all_experts else experts_used))
        if mapped:
            mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP
            mparams.use_extra_bufts = False
        with llama_log() as lines:
            self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        # llama.cpp names each weight buffer: "CPU_Mapped model buffer size = ..." when it points into the map
        buffers = [line for line in lines if "model buffer size" in line]
        self.weights_mapped = bool(buffers) and all("CPU_Mapped" in line for line in buffers)
        if not self.model:
            raise DynqError(f"{path}: llama.cpp could not load this model")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        if eval_callback is not None:
            cb = L.ggml_backend_sched_eval_callback(eval_callback)
            self._keep.append(cb)
            cparams.cb_eval = cb
            cparams.cb_eval_user_data = None
        self.llama_ctx = L.llama_init_from_model(self.model, cparams)
        if not self.llama_ctx:
            L.llama_model_free(self.model)
            raise DynqError(f"{path}: llama.cpp could not create a context (n_ctx {n_ctx})")
        self.n_ctx = n_ctx
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.want_logits = logits

    @staticmethod
    def _override_expert_count(path: Path, mparams: Any, count: int | None) -> Any:
        from dynq.gguf_io.reader import GGUFModel

        L = llama()
        model = GGUFModel(path)
        n_expert = model.field(f"{model.arch}.expert_count")
        if not n_expert:
            raise DynqError(
                f"{path}: not a Mixture-of-Experts model; all-experts routing and expert counts do not apply"
            )
        overrides = (L.llama_model_kv_override * 2)()
        overrides[0].key = f"{model.arch}.expert_used_count".encode()
        overrides[0].tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
        if count is not None and not 1 <= count <= int(n_expert):
            raise DynqError(f"{path}: {count} experts per token asked, the model has {n_expert}")
        overrides[0].value.val_i64 = int(n_expert) if count is None else count
        mparams.kv_overrides = overrides
        return overrides

    def tokenize(self, text: str) -> list[int]:
        L = self._L
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, True, False)
        if n < 0:
            raise DynqError(f"tokenization needs {-n} tokens, more than the buffer of {capacity}")
        return list(buf[:n])

    def evaluate_chunk(self, tokens: list[int], outputs: slice | None = None) -> npt.NDArray[np.float32] | None:
        """Evaluate one chunk from an empty cache; returns the logits [n_tokens, n_vocab] if asked for, or only the
        rows of the positions in `outputs` (llama.cpp then skips the output layer for the others)."""
        L = self._L
        if len(tokens) > self.n_ctx:
            raise DynqError(f"chunk of {len(tokens)} tokens exceeds n_ctx {self.n_ctx}")
        chunk = list(tokens)
        if self.add_bos:
            chunk[0] = self.bos
        L.llama_memory_clear(L.llama_get_memory(self.llama_ctx), True)
        batch = L.llama_batch_init(len(chunk), 0, 1)
        try:
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                # without `outputs` every position asks for logits, as llama-imatrix does: otherwise llama.cpp
                # skips the last block's rows for tokens without output, and their activations are never seen
                batch.logits[i] = outputs is None or outputs.start <= i < outputs.stop
            batch.n_tokens = len(chunk)
            rc = L.llama_decode(self.llama_ctx, batch)
            if rc != 0:
                raise DynqError(f"llama_decode failed with code {rc}")
        finally:
            L.llama_batch_free(batch)
        if not self.want_logits:
            return None
        ptr = L.llama_get_logits(self.llama_ctx)
        rows = len(chunk) if outputs is None else len(range(len(chunk))[outputs])
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).copy()

    def close(self) -> None:
        L = self._L
        if getattr(self, "ctx", None):
            L.llama_free(self.llama_ctx)
            self.llama_ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaRuntime:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
