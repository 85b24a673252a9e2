"""Endless repetition, the failure that made uniform 1.58-bit DeepSeek-R1 useless.

Definition: a continuation ends in a loop when it did not stop by itself (no end-of-generation token within the
budget) and its last `max(3·p, MIN_WINDOW)` tokens are periodic with some period p ≤ MAX_PERIOD: the tail is the
same p tokens at least three times over. Period 1 catches a token repeated forever (blank lines, one word); longer
periods catch a repeated line or paragraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynq.errors import DynqError

MAX_PERIOD = 64
MIN_WINDOW = 32

PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", "# Python: parse a CSV file and print the average of the second column\nimport csv\n\n"),
    ("code", "def quicksort(items):\n"),
    ("code", "// JavaScript: debounce a function\nfunction debounce(fn, ms) {\n"),
    ("prose", "The history of the printing press begins"),
    ("prose", "Once upon a time, in a village by the sea,"),
    ("chat", "Explain in three sentences why the sky is blue."),
    ("chat", "Write a haiku about autumn rain."),
)


def loop_period(tokens: Sequence[int], max_period: int = MAX_PERIOD, min_window: int = MIN_WINDOW) -> int | None:
    """The smallest period p ≤ max_period whose repetition fills the tail (see the module docs), else None."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        window = max(3 * p, min_window)
        if window + p > n:
            break
        tail = tokens[n - window :]
        if all(tail[i] == tail[i - p] for i in range(p, window)):
            return p
    return None


@dataclass(frozen=True)
class Continuation:
    kind: str
    prompt: str
    mode: str  # "greedy" or "sampled"
    text: str
    n_tokens: int
    stopped: bool  # ended with an end-of-generation token
    period: int | None

    @property
    def looped(self) -> bool:
        return not self.stopped and self.period is not None


def generate(model_path: Path, n_tokens: int = 256, threads: int = 1, seed: int = 42) -> list[Continuation]:
    """Greedy and sampled (temperature 0.6, min_p 0.05) continuations of the fixed prompts."""
    from dynq.llamacpp.runtime import llama

    if not Path(model_path).is_file():
        raise DynqError(f"{model_path}: no such model file")
    try:
        llm = llama().Llama(str(model_path), n_ctx=1024, n_threads=threads, seed=seed, verbose=False)
    except ValueError as e:  # llama-cpp-python's word for a file llama.cpp refuses
        raise DynqError(f"{model_path}: llama.cpp could not load this model") from e
    out = []
    for kind, prompt in PROMPTS:
        for mode, temp in (("greedy", 0.0), ("sampled", 0.6)):
            args: dict[str, Any] = {"max_tokens": n_tokens, "temperature": temp, "min_p": 0.05, "seed": seed}
            if kind == "chat":
                done = llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt}], logprobs=False, **args
                )
                text = str(done["choices"][0]["message"]["content"] or "")
            else:
                done = llm.create_completion(prompt, **args)
                text = str(done["choices"][0]["text"])
            finish = done["choices"][0]["finish_reason"]
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            out.append(Continuation(kind, prompt, mode, text, len(tokens), finish == "stop", loop_period(tokens)))
    return out


def loop_rate(continuations: Sequence[Continuation]) -> float:
    return sum(c.looped for c in continuations) / len(continuations) if continuations else 0.0
