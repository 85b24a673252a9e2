"""The byte model: what llama.cpp allocates for a model, from tensor sizes and hyperparameters alone.

Weights are exact (one entry per tensor, from a GGUF file or a QuantPlan). The KV cache follows llama.cpp's
`llama_kv_cache`: per block K = key_length x head_count_kv and V = value_length x head_count_kv elements per cell
(no V cache with MLA, where K holds the compressed latent), cells = context padded to 256, sliding-window blocks
min(context, window + ubatch) padded to 256. The compute buffer is an allowance: the largest live activations of
one ubatch (the logits of the output layer, or one block's attention and FFN intermediates).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from dynq.core.qtypes import QType, qtype
from dynq.core.tensors import ModelInventory, SourceDType, TensorClass, TensorInfo
from dynq.errors import DynqError
from dynq.recipe.plan import QuantPlan

CTX_PAD = 256  # llama.cpp pads the context (and the sliding-window cache) to 256 cells
F32_BYTES = 4
KV_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "f32")
# Sliding-window layouts llama.cpp assumes when a file gives only the window: (pattern, dense first).
# Blocks il with il % pattern < pattern - 1 slide (or il % pattern != 0 when the dense block comes first).
_SWA_PATTERNS: dict[str, tuple[int, bool]] = {"gemma2": (2, False), "gemma3": (6, False), "cohere2": (4, False)}


@dataclass(frozen=True)
class SizedTensor:
    """One weight as it will be allocated: its bytes, and whether it is a routed-expert tensor (read 1/k per token)."""

    name: str
    nbytes: int
    routed_expert: bool

    @classmethod
    def of(cls, info: TensorInfo, t: SourceDType) -> SizedTensor:
        return cls(info.name, t.nbytes(info.shape), info.tensor_class is TensorClass.ROUTED_EXPERTS)


@dataclass(frozen=True)
class Attention:
    """KV geometry per block: elements per cached token of K and V, and which blocks use a sliding window."""

    k_per_token: tuple[int, ...]
    v_per_token: tuple[int, ...]
    q_per_token: int  # query elements of one token (all heads)
    sliding: tuple[bool, ...]
    window: int
    mla: bool

    def cells(self, block: int, n_ctx: int, n_ubatch: int) -> int:
        full = _pad(n_ctx)
        return _pad(min(full, self.window + n_ubatch)) if self.sliding[block] else full


def _pad(n: int) -> int:
    return (n + CTX_PAD - 1) // CTX_PAD * CTX_PAD


def _key(meta: Mapping[str, object], arch: str, name: str) -> object:
    return meta.get(f"{arch}.{name}")


def _int(meta: Mapping[str, object], arch: str, name: str, default: int | None = None) -> int:
    v = _key(meta, arch, name)
    if isinstance(v, int):
        return v
    if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
        return max(int(x) for x in v)
    if default is None:
        raise DynqError(f"the model has no '{arch}.{name}' metadata; the offload planner needs it to size the KV cache")
    return default


def _per_block(meta: Mapping[str, object], arch: str, name: str, n_blocks: int, default: int) -> tuple[int, ...]:
    """A hyperparameter that may be one value or one per block (head_count_kv of some architectures)."""
    v = _key(meta, arch, name)
    if isinstance(v, list) and len(v) == n_blocks:
        return tuple(int(x) for x in v)
    return (v,) * n_blocks if isinstance(v, int) else (default,) * n_blocks


def attention_geometry(meta: Mapping[str, object], arch: str, n_blocks: int, n_embd: int) -> Attention:
    n_head = _int(meta, arch, "attention.head_count")
    head_kv = _per_block(meta, arch, "attention.head_count_kv", n_blocks, n_head)
    key_length = _int(meta, arch, "attention.key_length", n_embd // n_head)
    value_length = _int(meta, arch, "attention.value_length", n_embd // n_head)
    # MLA files (split attn_k_b/attn_v_b, key_length_mla set) cache the latent only: K = kv_lora_rank + rope, no V.
    mla = _key(meta, arch, "attention.key_length_mla") is not None
    window = _int(meta, arch, "attention.sliding_window", 0)
    sliding = _sliding_blocks(meta, arch, n_blocks, window)
    return Attention(
        k_per_token=tuple(key_length * h for h in head_kv),
        v_per_token=tuple(0 if mla else value_length * h for h in head_kv),
        q_per_token=n_head * key_length,
        sliding=sliding,
        window=window,
        mla=mla,
    )


def _sliding_blocks(meta: Mapping[str, object], arch: str, n_blocks: int, window: int) -> tuple[bool, ...]:
    if window <= 0:
        return (False,) * n_blocks
    declared = _key(meta, arch, "attention.sliding_window_pattern")
    if isinstance(declared, list) and len(declared) == n_blocks:
        return tuple(bool(x) for x in declared)
    pattern, dense_first = _SWA_PATTERNS.get(arch, (0, False))
    if isinstance(declared, int):
        pattern = declared
    if pattern == 0:  # a window with no known layout: llama.cpp slides every block
        return (True,) * n_blocks
    if dense_first:
        return tuple(i % pattern != 0 for i in range(n_blocks))
    return tuple(i % pattern < pattern - 1 for i in range(n_blocks))


@dataclass(frozen=True)
class ByteModel:
    """A model's allocations by llama.cpp's placement units: the input layer (always CPU), the repeating blocks and
    the output layer (its norm and projection; the token embeddings again when the output is tied to them)."""

    source: str
    arch: str
    input: tuple[SizedTensor, ...]
    blocks: tuple[tuple[SizedTensor, ...], ...]
    output: tuple[SizedTensor, ...]
    tied_output: bool
    attention: Attention
    n_embd: int
    n_vocab: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @cached_property
    def file_bytes(self) -> int:
        """All weights once (what a CPU-only load maps); a tied output is the embedding, not a second copy."""
        tied = sum(t.nbytes for t in self.output if self.tied_output and t.name.startswith("token_embd."))
        return sum(t.nbytes for t in self.input) + sum(self.block_bytes) + self.output_bytes - tied

    @cached_property
    def block_bytes(self) -> tuple[int, ...]:
        return tuple(sum(t.nbytes for t in b) for b in self.blocks)

    @cached_property
    def expert_bytes(self) -> tuple[int, ...]:
        return tuple(sum(t.nbytes for t in b if t.routed_expert) for b in self.blocks)

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.input)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.output)

    @property
    def expert_read_fraction(self) -> float:
        """The share of routed-expert bytes one token reads (k of n experts)."""
        return self.n_expert_used / self.n_expert if self.n_expert else 1.0

    def kv_bytes_per_token(self, block: int, kv_type: str) -> int:
        t = kv_qtype(kv_type)
        a = self.attention
        return _row_bytes(t, a.k_per_token[block]) + _row_bytes(t, a.v_per_token[block])

    def kv_bytes(self, block: int, n_ctx: int, kv_type: str, n_ubatch: int) -> int:
        return self.kv_bytes_per_token(block, kv_type) * self.attention.cells(block, n_ctx, n_ubatch)

    def kv_total(self, n_ctx: int, kv_type: str, n_ubatch: int) -> int:
        return sum(self.kv_bytes(b, n_ctx, kv_type, n_ubatch) for b in range(self.n_blocks))

    def output_activations(self, n_ubatch: int) -> int:
        """Logits of a full ubatch (llama.cpp reserves the graph with every token an output) and the normed input."""
        return n_ubatch * (self.n_vocab + 2 * self.n_embd) * F32_BYTES

    def block_activations(self, n_ctx: int, n_ubatch: int) -> int:
        """One block's live intermediates with flash attention (no n_ctx x ubatch score matrix per head)."""
        a = self.attention
        k, v = max(a.k_per_token), max(a.v_per_token)
        attn = n_ubatch * (2 * self.n_embd + 2 * (k + v) + 2 * a.q_per_token) * F32_BYTES
        attn += _pad(n_ctx) * n_ubatch * 2  # the f16 mask
        ffn = n_ubatch * (2 * self.n_ff + 2 * self.n_embd) * F32_BYTES
        moe = n_ubatch * (3 * self.n_ff_exp * self.n_expert_used + 3 * self.n_expert) * F32_BYTES
        return attn + max(ffn, moe)

    def compute_bytes(self, n_ctx: int, n_ubatch: int, with_output: bool) -> int:
        """The compute-buffer allowance of one backend for ubatches of `n_ubatch` tokens."""
        u = min(n_ubatch, _pad(n_ctx))
        layer = self.block_activations(n_ctx, u)
        return max(layer, self.output_activations(u)) if with_output else layer


def _row_bytes(t: QType, n: int) -> int:
    if n == 0:
        return 0
    if n % t.block_size:
        raise DynqError(f"KV type {t.name.lower()} needs rows divisible by {t.block_size}; this model's are {n}")
    return t.nbytes((n,))


def kv_qtype(name: str) -> QType:
    if name.lower() not in KV_TYPES:
        raise DynqError(f"unknown KV cache type '{name}'; use one of {', '.join(KV_TYPES)}")
    return qtype(name)


def _n_vocab(inventory: ModelInventory, sized: Iterable[tuple[TensorInfo, SizedTensor]]) -> int:
    for info, _ in sized:
        if info.name in ("output.weight", "token_embd.weight") and len(info.shape) == 2:
            return info.shape[1]
    raise DynqError(f"{inventory.source}: no token_embd or output tensor; the offload planner needs the vocabulary")


def byte_model(inventory: ModelInventory, plan: QuantPlan | None = None) -> ByteModel:
    """The byte model of `inventory` as stored, or as `plan` would quantize it."""
    types = {t.info.name: t.qtype for t in plan.tensors} if plan is not None else {}
    sized = [(info, SizedTensor.of(info, types.get(info.name, info.dtype))) for info in inventory.tensors]
    arch, meta, n_blocks = inventory.arch, inventory.metadata, inventory.n_blocks
    if n_blocks == 0:
        raise DynqError(f"{inventory.source}: no repeating blocks (blk.N.*); nothing to offload")
    blocks: list[list[SizedTensor]] = [[] for _ in range(n_blocks)]
    inputs: list[SizedTensor] = []
    output: list[SizedTensor] = []
    for info, s in sized:
        b = info.block
        if b is not None and b < n_blocks:
            blocks[b].append(s)
        elif info.name.startswith(("output.", "output_norm.")):
            output.append(s)
        else:
            inputs.append(s)
    # A model without output.weight projects with token_embd; llama.cpp duplicates it into the output layer.
    tied = not any(s.name == "output.weight" for s in output)
    if tied:
        output += [s for s in inputs if s.name == "token_embd.weight"]
    n_embd = _int(meta, arch, "embedding_length")
    n_expert = _int(meta, arch, "expert_count", 0)
    return ByteModel(
        source=inventory.source,
        arch=arch,
        input=tuple(inputs),
        blocks=tuple(tuple(b) for b in blocks),
        output=tuple(output),
        tied_output=tied,
        attention=attention_geometry(meta, arch, n_blocks, n_embd),
        n_embd=n_embd,
        n_vocab=_n_vocab(inventory, sized),
        n_ff=_int(meta, arch, "feed_forward_length", 0),
        n_expert=n_expert,
        n_expert_used=_int(meta, arch, "expert_used_count", 0) if n_expert else 0,
        n_ff_exp=_int(meta, arch, "expert_feed_forward_length", 0) if n_expert else 0,
    )
