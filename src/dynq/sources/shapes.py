"""Built-in shape inventories: large models described from their published configs, with no weights behind them.

They carry llama.cpp's GGUF tensor names and shapes (GGUF order, row length first), so a recipe can be planned and
sized for models that do not fit on this machine. Source types are what the published GGUF conversions hold:
weight matrices BF16, norms, routers and biases F32.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gguf import GGUFValueType

from dynq.core.arrays import F32Array
from dynq.core.qtypes import QType, qtype
from dynq.core.source import MetadataField
from dynq.core.tensors import ModelInventory, TensorInfo
from dynq.errors import DynqError

PREFIX = "shapes:"
_BF16 = qtype("BF16")
_F32 = qtype("F32")


def _hparams(arch: str, n_layer: int, context_length: int, n_embd: int, n_head: int, n_head_kv: int, n_vocab: int,
             own: dict[str, object]) -> dict[str, object]:  # fmt: skip
    """The hyperparameters every architecture has, then its own, under llama.cpp's `<arch>.` key prefix."""
    common = {"block_count": n_layer, "context_length": context_length, "embedding_length": n_embd,
              "attention.head_count": n_head, "attention.head_count_kv": n_head_kv, "vocab_size": n_vocab}  # fmt: skip
    return {f"{arch}.{k}": v for k, v in (common | own).items()}


def _experts(n_ff_exp: int, n_expert: int, n_expert_used: int) -> dict[str, object]:
    return {"expert_feed_forward_length": n_ff_exp, "expert_count": n_expert, "expert_used_count": n_expert_used}


def _t(name: str, *shape: int, dtype: QType = _BF16) -> TensorInfo:
    return TensorInfo(name, tuple(shape), _F32 if len(shape) == 1 else dtype)


@dataclass(frozen=True)
class DeepSeek2Config:
    """DeepSeek-V2/V3/R1 (llama.cpp arch `deepseek2`) with MLA attention; Jan-2025 naming keeps attn_kv_b whole."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_dense_lead: int
    n_vocab: int
    n_head: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    context_length: int


def deepseek2_tensors(c: DeepSeek2Config) -> tuple[list[TensorInfo], dict[str, object]]:
    def block(i: int) -> Iterator[TensorInfo]:
        p = f"blk.{i}."
        yield _t(p + "attn_norm.weight", c.n_embd)
        yield _t(p + "attn_q_a_norm.weight", c.q_lora_rank)
        yield _t(p + "attn_kv_a_norm.weight", c.kv_lora_rank)
        yield _t(p + "attn_q_a.weight", c.n_embd, c.q_lora_rank)
        yield _t(p + "attn_q_b.weight", c.q_lora_rank, c.n_head * (c.qk_nope + c.qk_rope))
        yield _t(p + "attn_kv_a_mqa.weight", c.n_embd, c.kv_lora_rank + c.qk_rope)
        yield _t(p + "attn_kv_b.weight", c.kv_lora_rank, c.n_head * (c.qk_nope + c.v_head))
        yield _t(p + "attn_output.weight", c.n_head * c.v_head, c.n_embd)
        yield _t(p + "ffn_norm.weight", c.n_embd)
        if i < c.n_dense_lead:
            yield _t(p + "ffn_gate.weight", c.n_embd, c.n_ff)
            yield _t(p + "ffn_up.weight", c.n_embd, c.n_ff)
            yield _t(p + "ffn_down.weight", c.n_ff, c.n_embd)
            return
        yield _t(p + "ffn_gate_inp.weight", c.n_embd, c.n_expert, dtype=_F32)
        yield _t(p + "exp_probs_b.bias", c.n_expert)
        yield _t(p + "ffn_gate_exps.weight", c.n_embd, c.n_ff_exp, c.n_expert)
        yield _t(p + "ffn_up_exps.weight", c.n_embd, c.n_ff_exp, c.n_expert)
        yield _t(p + "ffn_down_exps.weight", c.n_ff_exp, c.n_embd, c.n_expert)
        shared = c.n_ff_exp * c.n_expert_shared
        yield _t(p + "ffn_gate_shexp.weight", c.n_embd, shared)
        yield _t(p + "ffn_up_shexp.weight", c.n_embd, shared)
        yield _t(p + "ffn_down_shexp.weight", shared, c.n_embd)

    tensors = [_t("token_embd.weight", c.n_embd, c.n_vocab)]
    for i in range(c.n_layer):
        tensors.extend(block(i))
    tensors += [_t("output_norm.weight", c.n_embd), _t("output.weight", c.n_embd, c.n_vocab)]
    own = {
        "feed_forward_length": c.n_ff,
        "attention.key_length": c.qk_nope + c.qk_rope,
        "attention.value_length": c.v_head,
        "attention.q_lora_rank": c.q_lora_rank,
        "attention.kv_lora_rank": c.kv_lora_rank,
        "rope.dimension_count": c.qk_rope,
        "leading_dense_block_count": c.n_dense_lead,
        **_experts(c.n_ff_exp, c.n_expert, c.n_expert_used),
        "expert_shared_count": c.n_expert_shared,
    }
    return tensors, _hparams("deepseek2", c.n_layer, c.context_length, c.n_embd, c.n_head, c.n_head, c.n_vocab, own)


@dataclass(frozen=True)
class GqaMoeConfig:
    """A GQA transformer whose every block is MoE (Qwen3-MoE, Mixtral), llama.cpp naming."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    n_vocab: int
    context_length: int
    qk_norm: bool


def gqa_moe_tensors(c: GqaMoeConfig) -> tuple[list[TensorInfo], dict[str, object]]:
    tensors = [_t("token_embd.weight", c.n_embd, c.n_vocab)]
    for i in range(c.n_layer):
        p = f"blk.{i}."
        tensors += [
            _t(p + "attn_norm.weight", c.n_embd),
            _t(p + "attn_q.weight", c.n_embd, c.n_head * c.head_dim),
            _t(p + "attn_k.weight", c.n_embd, c.n_head_kv * c.head_dim),
            _t(p + "attn_v.weight", c.n_embd, c.n_head_kv * c.head_dim),
            _t(p + "attn_output.weight", c.n_head * c.head_dim, c.n_embd),
        ]
        if c.qk_norm:
            tensors += [_t(p + "attn_q_norm.weight", c.head_dim), _t(p + "attn_k_norm.weight", c.head_dim)]
        tensors += [
            _t(p + "ffn_norm.weight", c.n_embd),
            _t(p + "ffn_gate_inp.weight", c.n_embd, c.n_expert, dtype=_F32),
            _t(p + "ffn_gate_exps.weight", c.n_embd, c.n_ff_exp, c.n_expert),
            _t(p + "ffn_up_exps.weight", c.n_embd, c.n_ff_exp, c.n_expert),
            _t(p + "ffn_down_exps.weight", c.n_ff_exp, c.n_embd, c.n_expert),
        ]
    tensors += [_t("output_norm.weight", c.n_embd), _t("output.weight", c.n_embd, c.n_vocab)]
    own = {
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        **_experts(c.n_ff_exp, c.n_expert, c.n_expert_used),
    }
    return tensors, _hparams(c.arch, c.n_layer, c.context_length, c.n_embd, c.n_head, c.n_head_kv, c.n_vocab, own)


@dataclass(frozen=True)
class DenseConfig:
    """A dense GQA transformer with llama.cpp `llama` naming."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    context_length: int


def dense_tensors(c: DenseConfig) -> tuple[list[TensorInfo], dict[str, object]]:
    head_dim = c.n_embd // c.n_head
    tensors = [_t("token_embd.weight", c.n_embd, c.n_vocab)]
    for i in range(c.n_layer):
        p = f"blk.{i}."
        tensors += [
            _t(p + "attn_norm.weight", c.n_embd),
            _t(p + "attn_q.weight", c.n_embd, c.n_embd),
            _t(p + "attn_k.weight", c.n_embd, c.n_head_kv * head_dim),
            _t(p + "attn_v.weight", c.n_embd, c.n_head_kv * head_dim),
            _t(p + "attn_output.weight", c.n_embd, c.n_embd),
            _t(p + "ffn_norm.weight", c.n_embd),
            _t(p + "ffn_gate.weight", c.n_embd, c.n_ff),
            _t(p + "ffn_up.weight", c.n_embd, c.n_ff),
            _t(p + "ffn_down.weight", c.n_ff, c.n_embd),
        ]
    tensors += [_t("output_norm.weight", c.n_embd), _t("output.weight", c.n_embd, c.n_vocab)]
    own: dict[str, object] = {"feed_forward_length": c.n_ff, "rope.dimension_count": head_dim}
    return tensors, _hparams(c.arch, c.n_layer, c.context_length, c.n_embd, c.n_head, c.n_head_kv, c.n_vocab, own)


# Published configs: deepseek-ai/DeepSeek-R1 (= V3 architecture; the MTP block 61 is not part of GGUF files),
# Qwen/Qwen3-235B-A22B, mistralai/Mixtral-8x7B-v0.1.
_INVENTORIES: dict[str, tuple[str, Callable[[], tuple[list[TensorInfo], dict[str, object]]]]] = {
    "deepseek-r1": ("deepseek2", lambda: deepseek2_tensors(DeepSeek2Config(
        n_layer=61, n_embd=7168, n_ff=18432, n_ff_exp=2048, n_expert=256, n_expert_used=8, n_expert_shared=1,
        n_dense_lead=3, n_vocab=129280, n_head=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope=128, qk_rope=64,
        v_head=128, context_length=163840))),
    "qwen3-235b-a22b": ("qwen3moe", lambda: gqa_moe_tensors(GqaMoeConfig(
        arch="qwen3moe", n_layer=94, n_embd=4096, n_head=64, n_head_kv=4, head_dim=128, n_ff_exp=1536,
        n_expert=128, n_expert_used=8, n_vocab=151936, context_length=40960, qk_norm=True))),
    "mixtral-8x7b": ("llama", lambda: gqa_moe_tensors(GqaMoeConfig(
        arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff_exp=14336,
        n_expert=8, n_expert_used=2, n_vocab=32000, context_length=32768, qk_norm=False))),
}  # fmt: skip


def inventory_names() -> list[str]:
    return sorted(_INVENTORIES)


def shape_inventory(name: str) -> ModelInventory:
    """`name` with or without the `shapes:` prefix."""
    key = name.removeprefix(PREFIX)
    if key not in _INVENTORIES:
        known = ", ".join(PREFIX + n for n in inventory_names())
        raise DynqError(f"unknown shape inventory '{name}'; known: {known}")
    arch, build = _INVENTORIES[key]
    tensors, meta = build()
    meta = {"general.architecture": arch, "general.name": key, **meta}
    return ModelInventory(PREFIX + key, arch, tuple(tensors), meta)


def _value_type(value: object) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


@dataclass(frozen=True)
class ShapeSource:
    """A shape inventory as a source: it plans and sizes like any model and has no weights to load."""

    inventory_: ModelInventory

    @property
    def spec(self) -> str:
        return self.inventory_.source

    def inventory(self) -> ModelInventory:
        return self.inventory_

    def metadata_fields(self) -> list[MetadataField]:
        return [MetadataField(k, v, _value_type(v)) for k, v in self.inventory_.metadata.items()]

    def load(self, name: str) -> F32Array:
        raise DynqError(f"{self.spec} holds names and shapes only, no weights; quantize a GGUF file or a zoo model")

    def load_expert(self, name: str, expert: int) -> F32Array:
        return self.load(name)

    def release(self, name: str) -> None:
        pass

    def fingerprint(self) -> str:
        described = [(t.name, t.shape, t.dtype.name) for t in self.inventory_.tensors]
        text = json.dumps([described, sorted(self.inventory_.metadata.items())], default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def open_shapes(name: str) -> ShapeSource:
    return ShapeSource(shape_inventory(name))
