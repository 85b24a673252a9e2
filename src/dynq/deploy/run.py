"""`dynq run`: a GGUF model on llama.cpp (llama-cpp-python), prompted with plain text or through the chat template the
file carries, tokens streamed to a callback as they are sampled.

Low-bit files are run with the sampling their makers recommend (temperature 0.6, min_p 0.05, no top-k/top-p cut):
greedy decoding falls into repetition loops far more often on 1-2 bit weights. When llama.cpp sees a GPU, the offload
planner decides how many layers go there from the free VRAM.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from dynq.deploy.ollama import Message, render_jinja
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.llamacpp.runtime import llama

log = logging.getLogger(__name__)

TokenCallback = Callable[[str], None]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.6
    min_p: float = 0.05
    top_p: float = 1.0  # 1.0: off
    top_k: int = 0  # 0: off
    repeat_penalty: float = 1.0  # 1.0: off
    max_tokens: int = 512

    def summary(self) -> str:
        """The settings that shape the sampling, the cuts that are off left out."""
        parts = [f"temperature {self.temperature:g}", f"min_p {self.min_p:g}"]
        parts += [f"top_p {self.top_p:g}"] if self.top_p < 1.0 else []
        parts += [f"top_k {self.top_k}"] if self.top_k > 0 else []
        parts += [f"repeat_penalty {self.repeat_penalty:g}"] if self.repeat_penalty != 1.0 else []
        return ", ".join(parts)


@dataclass(frozen=True)
class Generation:
    text: str
    n_prompt: int
    n_tokens: int
    prompt_seconds: float  # to the first sampled token: prompt evaluation
    seconds: float  # all of it
    stopped: bool  # ended on an end-of-generation token (not the token budget)

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - self.prompt_seconds
        return (self.n_tokens - 1) / decode if self.n_tokens > 1 and decode > 0 else 0.0


@dataclass(frozen=True)
class Offload:
    n_gpu_layers: int
    reason: str
    tensor_split: tuple[int, ...] | None = None  # layers per GPU when there are several


def gpu_offload(path: Path, n_ctx: int) -> Offload:
    """How many layers to put on the GPU: none without a GPU llama.cpp can use, else the offload planner's choice
    for the free memory of the visible GPUs."""
    L = llama()
    L.llama_backend_init()
    if not L.llama_supports_gpu_offload():
        return Offload(0, "no GPU that llama.cpp can use")
    import torch

    if not torch.cuda.is_available():
        return Offload(-1, "llama.cpp sees a GPU torch cannot measure; all layers offloaded")
    from dynq.deploy.memory import byte_model
    from dynq.deploy.offload import Hardware, Settings, plan_offload

    n_gpus = torch.cuda.device_count()
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(n_gpus))
    hardware = Hardware(vram=free, n_gpus=n_gpus)
    plan = plan_offload(byte_model(GGUFModel(path).inventory()), hardware, Settings(n_ctx=n_ctx))
    best = plan.best
    if best.override_tensors:
        # llama-cpp-python's Llama has no tensor overrides (-ot): take the best placement by whole layers
        layers = plan.alternatives[0]
        log.warning("the planner's best placement keeps experts on the CPU (%.1f tok/s predicted), which needs "
                    "llama.cpp's own tools: %s; running with -ngl %d (%.1f tok/s predicted)", best.tokens_per_s,
                    plan.command, layers.n_gpu_layers, layers.tokens_per_s)  # fmt: skip
        best = layers
    reason = f"offload planner, {free / 2**30:.1f} GiB free on {n_gpus} GPU(s): {best.tokens_per_s:.1f} tok/s predicted"
    return Offload(best.n_gpu_layers, reason, best.tensor_split)


class Runner:
    """One model loaded in llama.cpp, ready to complete text or answer a conversation."""

    def __init__(self, path: str | Path, n_ctx: int = 4096, threads: int | None = None,
                 n_gpu_layers: int | None = None, seed: int | None = None) -> None:  # fmt: skip
        self.path = Path(path)
        model = GGUFModel(self.path)  # a missing, damaged or incomplete split file fails here, with one line
        template = model.field("tokenizer.chat_template")
        self.chat_template: str | None = template if isinstance(template, str) and template.strip() else None
        self.offload = gpu_offload(self.path, n_ctx) if n_gpu_layers is None else Offload(n_gpu_layers, "as asked")
        L = llama()
        from llama_cpp import Llama

        kwargs: dict[str, Any] = {"seed": seed} if seed is not None else {}
        if self.offload.tensor_split:
            kwargs["tensor_split"] = [float(n) for n in self.offload.tensor_split]
        try:
            self.llm: Any = Llama(str(model.shards[0]), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                             n_gpu_layers=self.offload.n_gpu_layers, verbose=False, **kwargs)  # fmt: skip
        except ValueError as e:
            raise DynqError(f"{self.path}: llama.cpp could not load this model ({e})") from e
        self._L = L
        self.vocab = L.llama_model_get_vocab(self.llm.model)
        self.n_ctx = n_ctx

    def _text(self, token: int) -> str:
        return bytes(self._L.llama_vocab_get_text(self.vocab, token)).decode("utf-8", "replace")

    def chat_prompt(self, messages: Sequence[Message]) -> str:
        """The conversation as the file's chat template writes it, ending with the assistant's turn opened."""
        if self.chat_template is None:
            raise DynqError(
                f"{self.path}: the model has no chat template (a base model?); prompt it as plain text (chat=False)"
            )
        bos = self._text(int(self._L.llama_vocab_bos(self.vocab)))
        eos = self._text(int(self._L.llama_vocab_eos(self.vocab)))
        return render_jinja(self.chat_template, list(messages), bos, eos)

    def chat(self, messages: Sequence[Message], sampling: Sampling | None = None,
             on_token: TokenCallback | None = None) -> Generation:  # fmt: skip
        return self.complete(self.chat_prompt(messages), sampling, on_token)

    def complete(
        self, prompt: str, sampling: Sampling | None = None, on_token: TokenCallback | None = None
    ) -> Generation:
        """Continue `prompt` until an end-of-generation token or `max_tokens`, calling `on_token` with each piece of
        text as soon as it is whole UTF-8."""
        s = sampling or Sampling()
        bos = self._text(int(self._L.llama_vocab_bos(self.vocab)))
        # a template that writes BOS itself must not get a second one from the tokenizer
        tokens = self.llm.tokenize(prompt.encode(), add_bos=not (bos and prompt.startswith(bos)), special=True)
        budget = min(s.max_tokens, self.n_ctx - len(tokens))
        if budget <= 0:
            raise DynqError(f"the prompt has {len(tokens)} tokens, the context {self.n_ctx}; raise the context (n_ctx)")
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pieces: list[str] = []
        start = time.perf_counter()
        first = 0.0
        n, stopped = 0, False
        for token in self.llm.generate(tokens, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
                                       repeat_penalty=s.repeat_penalty):  # fmt: skip
            if n == 0:
                first = time.perf_counter() - start
            if self._L.llama_vocab_is_eog(self.vocab, token):
                stopped = True
                break
            n += 1
            piece = decoder.decode(self.llm.detokenize([token], special=False))
            if piece:
                pieces.append(piece)
                if on_token is not None:
                    on_token(piece)
            if n >= budget:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_token is not None:
                on_token(tail)
        return Generation("".join(pieces), len(tokens), n, first, time.perf_counter() - start, stopped)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
