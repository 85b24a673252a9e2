"""A dense qwen2 GGUF re-laid as llama.cpp's `qwen2moe`: every block's FFN becomes a shared expert plus routed
experts, with the weights stored in F16 (the reference every quant of the MoE model is judged against).

Why the MoE model computes the dense function when every expert is active, and gives each chosen expert its dense
share with top-k routing: qwen2moe weighs expert e by p_e = softmax(router·x)_e and the shared expert by
sigmoid(gate_inp_shexp·x). The router's logits are shrunk until n·p_e stays within e^±spread of 1, and the routed
down projections are stored times n (the expert count, a power of two: exact in F16); the shared gate's input is
kept as small (within ±2·spread, never 0), so its weight stays within about e^±spread of 1/2, and the shared down
projection is stored times 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from dynq.core.qtypes import qtype
from dynq.core.source import MetadataField
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.writer import OutputTensor, copy_metadata, write_gguf
from dynq.moe.layout import FFN, ExpertLayout

SOURCE_ARCH, MOE_ARCH = "qwen2", "qwen2moe"
_FFN = ("ffn_gate", "ffn_up", "ffn_down")
F16, F32 = GGMLQuantizationType.F16, GGMLQuantizationType.F32
MOSTLY_F16 = 1  # llama_ftype


@dataclass(frozen=True)
class BlockExperts:
    """One block's experts, its router weight [n_expert, n_embd] and its shared expert's gate [n_embd]."""

    layout: ExpertLayout
    router: npt.NDArray[np.float32]
    shared_gate: npt.NDArray[np.float32]


def check_source(model: GGUFModel) -> None:
    if model.arch != SOURCE_ARCH:
        raise DynqError(f"{model.path}: a {model.arch} model; only dense {SOURCE_ARCH} models are re-laid as experts")


def block_ffn(model: GGUFModel, block: int) -> FFN:
    gate, up, down = (model.load(f"blk.{block}.{k}.weight") for k in _FFN)
    return FFN(gate, up, down)


def _kept(model: GGUFModel, blocks: int) -> list[TensorInfo]:
    """The source's tensors of the first `blocks` blocks and the non-block ones, in file order."""
    kept = []
    for info in model.tensors:
        if info.block is None or info.block < blocks:
            kept.append(info)
    return kept


def _as_stored(model: GGUFModel, info: TensorInfo) -> tuple[OutputTensor, Callable[[], npt.NDArray[np.uint8]]]:
    """A source tensor as the reference stores it: F32 and F16 as they are, anything else dequantized to F16."""
    if info.dtype.name in ("F32", "F16"):
        ggml_type = model.ggml_type(info.name)
        return OutputTensor(info, info.nbytes, ggml_type), lambda: np.asarray(model.raw(info.name)).view(np.uint8)
    out = TensorInfo(info.name, info.shape, qtype("F16"))
    return OutputTensor(out, out.nbytes, F16), lambda: _f16(model.load(info.name), info.name)


def _f16(values: npt.NDArray[np.float32], name: str) -> npt.NDArray[np.uint8]:
    half = np.ascontiguousarray(values, dtype=np.float16)
    if not np.isfinite(half).all():
        raise DynqError(f"{name}: a value overflows F16; this model cannot be re-laid in F16")
    return half.view(np.uint8)


def _f32(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)


def _tensor(name: str, numpy_shape: tuple[int, ...], dtype: str) -> TensorInfo:
    return TensorInfo(name, tuple(reversed(numpy_shape)), qtype(dtype))


class _OneBlock:
    """The dense FFN of the block being written, loaded once and dropped when the next block's is asked for."""

    def __init__(self, model: GGUFModel) -> None:
        self.model = model
        self.block, self.ffn = -1, FFN(*(np.zeros((0, 0), np.float32),) * 3)

    def __call__(self, block: int) -> FFN:
        if block != self.block:
            self.block, self.ffn = block, FFN(*(np.zeros((0, 0), np.float32),) * 3)  # free before loading
            self.ffn = block_ffn(self.model, block)
        return self.ffn


def _expert_tensors(
    ffns: _OneBlock, block: int, experts: BlockExperts
) -> list[tuple[OutputTensor, Callable[[], npt.NDArray[np.uint8]]]]:
    layout, router = experts.layout, experts.router
    n_expert, n_ff_exp = layout.experts.shape
    n_embd = router.shape[1]

    def weights() -> FFN:
        ffn = ffns(block)
        layout.check(ffn.gate.shape[0])
        return ffn

    p = f"blk.{block}."
    n_shared = layout.shared.size
    specs: list[tuple[TensorInfo, Callable[[], npt.NDArray[np.uint8]]]] = [
        (_tensor(p + "ffn_gate_inp.weight", (n_expert, n_embd), "F32"), lambda: _f32(router)),
        (_tensor(p + "ffn_gate_exps.weight", (n_expert, n_ff_exp, n_embd), "F16"),
         lambda: _f16(weights().gate[layout.experts], p + "ffn_gate_exps")),
        (_tensor(p + "ffn_up_exps.weight", (n_expert, n_ff_exp, n_embd), "F16"),
         lambda: _f16(weights().up[layout.experts], p + "ffn_up_exps")),
        (_tensor(p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff_exp), "F16"),
         lambda: _f16(np.stack([weights().down[:, idx] for idx in layout.experts]) * n_expert, p + "ffn_down_exps")),
        (_tensor(p + "ffn_gate_inp_shexp.weight", (n_embd,), "F32"), lambda: _f32(experts.shared_gate)),
        (_tensor(p + "ffn_gate_shexp.weight", (n_shared, n_embd), "F16"),
         lambda: _f16(weights().gate[layout.shared], p + "ffn_gate_shexp")),
        (_tensor(p + "ffn_up_shexp.weight", (n_shared, n_embd), "F16"),
         lambda: _f16(weights().up[layout.shared], p + "ffn_up_shexp")),
        (_tensor(p + "ffn_down_shexp.weight", (n_embd, n_shared), "F16"),
         lambda: _f16(weights().down[:, layout.shared] * 2, p + "ffn_down_shexp")),
    ]  # fmt: skip
    return [(OutputTensor(info, info.nbytes, F16 if info.dtype.name == "F16" else F32), data) for info, data in specs]


def _renamed(fields: list[MetadataField], new_arch: str, extra: Mapping[str, object]) -> list[MetadataField]:
    """The source's key/values with `qwen2.` keys moved to `new_arch`, and `extra` set (replacing or appended)."""
    out, pending = [], dict(extra)
    for f in fields:
        key = new_arch + f.key.removeprefix(SOURCE_ARCH) if f.key.startswith(SOURCE_ARCH + ".") else f.key
        if key in pending:
            out.append(_field(key, pending.pop(key)))
        else:
            out.append(MetadataField(key, f.value, f.vtype, f.sub_type))
    return out + [_field(k, v) for k, v in pending.items()]


def _field(key: str, value: object) -> MetadataField:
    if isinstance(value, bool):
        return MetadataField(key, value, GGUFValueType.BOOL)
    if isinstance(value, int):
        return MetadataField(key, value, GGUFValueType.UINT32)
    if isinstance(value, float):
        return MetadataField(key, value, GGUFValueType.FLOAT32)
    return MetadataField(key, str(value), GGUFValueType.STRING)


def write_relaid(
    source: GGUFModel,
    output: Path,
    *,
    blocks: int,
    experts: Mapping[int, BlockExperts] | None,
    metadata: Mapping[str, object],
    written: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """The first `blocks` blocks of dense `source` in F16 (F32 norms and biases), dense when `experts` is None,
    else qwen2moe with `experts[b]` for block b; `metadata` is set on top of the source's (under the new arch)."""
    check_source(source)
    arch = SOURCE_ARCH if experts is None else MOE_ARCH
    tensors: list[tuple[OutputTensor, Callable[[], npt.NDArray[np.uint8]]]] = []
    ffns = _OneBlock(source)
    for info in _kept(source, blocks):
        block = info.block
        kind = info.name.split(".")[2] if block is not None else ""
        if experts is not None and block is not None and kind in _FFN:
            if kind == "ffn_gate":  # the block's expert tensors take the place of its dense FFN
                tensors += _expert_tensors(ffns, block, experts[block])
            continue
        tensors.append(_as_stored(source, info))
    extra = {f"{arch}.block_count": blocks, "general.file_type": MOSTLY_F16, **metadata}
    fields = _renamed(source.metadata_fields(), arch, extra)
    data = dict((t.info.name, load) for t, load in tensors)

    def add_metadata(writer: GGUFWriter) -> None:
        copy_metadata(fields, writer, drop=lambda key: False)

    def on_written(i: int, _t: OutputTensor) -> None:
        if written is not None:
            written(i + 1, len(tensors))

    return write_gguf(output, arch, [t for t, _ in tensors], lambda t: data[t.info.name](),
                      metadata=add_metadata, written=on_written)  # fmt: skip
