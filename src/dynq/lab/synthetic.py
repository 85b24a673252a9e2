"""Tiny random models of real llama.cpp architectures, written straight to GGUF.

No Mixture-of-Experts weights reach this environment, so the MoE code paths (deepseek2 with MLA attention, leading
dense blocks, routed + shared experts and expert bias; qwen3moe) are exercised on small random models that
llama.cpp loads and runs. They share their tensor lists with the shape inventories and carry a small byte-level
SentencePiece-style vocabulary, so every llama.cpp tool accepts them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType
from gguf import quantize as gguf_quantize

from dynq.core.atomic import atomic_path, check_new_output
from dynq.core.qtypes import qtype
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError
from dynq.sources.shapes import (
    DeepSeek2Config,
    DenseConfig,
    GqaMoeConfig,
    deepseek2_tensors,
    dense_tensors,
    gqa_moe_tensors,
)

N_VOCAB = 320  # 3 control tokens, 256 byte tokens, 61 letters and words

TINY_DEEPSEEK2 = DeepSeek2Config(
    n_layer=4, n_embd=256, n_ff=512, n_ff_exp=256, n_expert=8, n_expert_used=2, n_expert_shared=1, n_dense_lead=1,
    n_vocab=N_VOCAB, n_head=4, q_lora_rank=256, kv_lora_rank=256, qk_nope=64, qk_rope=32, v_head=64,
    context_length=512,
)  # fmt: skip
TINY_QWEN3MOE = GqaMoeConfig(
    arch="qwen3moe", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff_exp=256, n_expert=8,
    n_expert_used=2, n_vocab=N_VOCAB, context_length=512, qk_norm=True,
)  # fmt: skip
TINY_LLAMA = DenseConfig(
    arch="llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=N_VOCAB, context_length=512
)


DEEPSEEK2_ROUTING: dict[str, object] = {
    "deepseek2.expert_weights_scale": 2.5,
    "deepseek2.expert_weights_norm": True,
    "deepseek2.expert_gating_func": 2,  # sigmoid, with the exp_probs_b bias
}


def _tiny(kind: str) -> tuple[str, list[TensorInfo], dict[str, object]]:
    if kind == "deepseek2":
        tensors, meta = deepseek2_tensors(TINY_DEEPSEEK2)
        return "deepseek2", tensors, meta | DEEPSEEK2_ROUTING
    if kind == "qwen3moe":
        tensors, meta = gqa_moe_tensors(TINY_QWEN3MOE)
        return "qwen3moe", tensors, meta
    if kind == "llama":
        tensors, meta = dense_tensors(TINY_LLAMA)
        return "llama", tensors, meta
    raise DynqError(f"unknown synthetic model '{kind}'; known: {', '.join(SYNTHETIC)}")


SYNTHETIC: tuple[str, ...] = ("deepseek2", "qwen3moe", "llama")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    words = ["▁" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    words += ["▁the", "▁of", "▁and", "▁to", "▁in", "▁def", "▁return", "▁", "."]
    tokens += words[: N_VOCAB - len(tokens)]
    types += [TokenType.NORMAL] * (N_VOCAB - len(types))
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(N_VOCAB - 259)]
    return tokens, scores, [int(t) for t in types]


def _add_value(writer: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def _values(info: TensorInfo, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(reversed(info.shape))
    if len(info.shape) == 1:
        return np.zeros(shape, np.float32) if "exp_probs_b" in info.name else np.ones(shape, np.float32)
    std = 1.0 if info.name == "token_embd.weight" else 1.0 / np.sqrt(info.row_length)
    return (rng.standard_normal(shape) * std).astype(np.float32)


def write_synthetic(kind: str, path: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny random `kind` model (deepseek2, qwen3moe or llama) to `path`; an existing file is replaced
    only with `overwrite`."""
    arch, tensors, meta = _tiny(kind)
    return write_random(path, arch, tensors, meta, seed, overwrite)


def write_random(path: str | Path, arch: str, tensors: list[TensorInfo], meta: dict[str, object], seed: int = 0,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write a model of these tensors (random weights in their stored types) and hyperparameters, with the small
    vocabulary, as llama.cpp's tools load it (a shape inventory's `tensors` and `meta`, e.g. `dense_tensors`)."""
    path = Path(path)
    check_new_output(path, overwrite)
    with atomic_path(path) as tmp:
        rng = np.random.default_rng(seed)
        writer = GGUFWriter(tmp, arch)
        writer.add_name(f"tiny-{arch}")
        for key, value in meta.items():
            _add_value(writer, key, value)
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
        writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
        tokens, scores, types = _vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        for info in tensors:
            values = _values(info, rng)
            stored = qtype(info.dtype.name)
            if stored.name == "F32":
                writer.add_tensor(info.name, values)
            else:
                writer.add_tensor(info.name, gguf_quantize(values, stored.ggml), raw_dtype=stored.ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
