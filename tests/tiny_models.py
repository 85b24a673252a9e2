"""Tiny GGUF models written by the tests: real llama.cpp naming, random weights, a few tensor types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quantize

T = GGMLQuantizationType


def llama_tensors(
    n_blocks: int = 2, n_embd: int = 64, n_ff: int = 128, n_vocab: int = 96, seed: int = 0
) -> list[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """(name, float32 values in numpy shape, stored type) for a tiny llama-architecture model."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    out = [("token_embd.weight", w(n_vocab, n_embd), T.Q8_0)]
    for i in range(n_blocks):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", 1 + 0.1 * w(n_embd), T.F32),
            (p + "attn_q.weight", w(n_embd, n_embd), T.F16),
            (p + "attn_k.weight", w(n_embd // 2, n_embd), T.F16),
            (p + "attn_v.weight", w(n_embd // 2, n_embd), T.Q4_0),
            (p + "attn_output.weight", w(n_embd, n_embd), T.F16),
            (p + "ffn_norm.weight", 1 + 0.1 * w(n_embd), T.F32),
            (p + "ffn_gate.weight", w(n_ff, n_embd), T.Q8_0),
            (p + "ffn_up.weight", w(n_ff, n_embd), T.Q8_0),
            (p + "ffn_down.weight", w(n_embd, n_ff), T.BF16),
        ]
    out += [("output_norm.weight", 1 + 0.1 * w(n_embd), T.F32), ("output.weight", w(n_vocab, n_embd), T.F16)]
    return out


def write_gguf(
    path: Path,
    tensors: list[tuple[str, np.ndarray, GGMLQuantizationType]],
    arch: str = "llama",
    split_max_tensors: int = 0,
    metadata: dict[str, int] | None = None,
) -> None:
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    n_blocks = len({n.split(".")[1] for n, _, _ in tensors if n.startswith("blk.")})
    writer.add_block_count(n_blocks)
    writer.add_name("tiny-test")
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    for name, values, qtype in tensors:
        if qtype == T.F32:
            writer.add_tensor(name, values)
        elif qtype == T.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
