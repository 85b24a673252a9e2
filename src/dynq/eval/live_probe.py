"""Probes on one open model: the profile's work copy of the reference stays loaded in llama.cpp, which computes from
its memory map of the file, so a probe writes its group's degraded bytes into the file and evaluates at once.

Loading the model, tokenizing the calibration text and reading the reference's predictions happen once per
profile instead of once per probe (they were half of a probe's time on a 1.5B model). Where llama.cpp keeps its own
copies of the weights instead (a repacking backend), the model is reopened after each change: slower, same
results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from dynq.calib.profile import ProbeFile
from dynq.calib.runtime import LlamaRuntime, token_chunks
from dynq.calib.text import Text
from dynq.core.context import RunContext
from dynq.core.importance import Imatrix
from dynq.core.qtypes import QType
from dynq.core.tensors import TensorInfo
from dynq.eval.evaluate import reference_predictions, score_chunks
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels import KernelBackend

log = logging.getLogger(__name__)


class LiveProbes:
    """A work copy of `reference` (at `path`) open in llama.cpp with the calibration text's first `chunks` chunks
    of `n_ctx` tokens; `kld` degrades a group in place, measures the mean KL divergence and restores it."""

    def __init__(self, reference: GGUFModel, path: Path, text: Text, n_ctx: int, chunks: int, ctx: RunContext) -> None:
        self.reference = reference_predictions(path, text.text, text.provenance, n_ctx, chunks, ctx)
        self.n_ctx, self.threads = n_ctx, ctx.threads
        self.work = ProbeFile(reference, ctx.cache_dir / "profiles")
        try:
            self.runtime = self._open()
            self.chunks = token_chunks(self.runtime.tokenize(text.text), n_ctx, chunks, "the calibration text")
        except BaseException:
            self.work.close()
            raise
        if not self.runtime.weights_mapped:
            log.info("llama.cpp copies the weights of %s; every probe reloads it", path)

    def _open(self) -> LlamaRuntime:
        return LlamaRuntime(self.work.path, self.n_ctx, self.threads, logits=True, mapped=True)

    def kld(self, typed: list[tuple[TensorInfo, QType]], imatrix: Imatrix | None, backend: KernelBackend) -> float:
        """Mean KL divergence against the reference with each tensor of `typed` encoded at its type and decoded."""
        self.work.apply(typed, imatrix, backend)
        try:
            if not self.runtime.weights_mapped:
                self.runtime.close()
                self.runtime = self._open()
            scores = score_chunks(self.runtime, self.work.path, self.reference, self.chunks)
        finally:
            self.work.restore()
        return float(scores.summary()["kld_mean"])

    def close(self) -> None:
        self.runtime.close()
        self.work.close()

    def __enter__(self) -> LiveProbes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
