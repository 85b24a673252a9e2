"""A random orthogonal rotation of the residual stream, fused into a float reference (QuaRot/SpinQuant's R1).

With the residual r carried as Qᵀ r everywhere, the model computes the same function and is still a standard GGUF:
each RMSNorm's scale g is folded into the matrices that read its output (W ← W·diag(g)·Q) and the norm becomes
ones (RMSNorm commutes with an orthogonal Q); the matrices that write into the residual (attention output, FFN
down, experts' and shared experts' down, their biases) become Qᵀ·W; token_embd becomes E·Q, and the output layer
reads the final norm like any reader (a tied output is written out as a tensor of its own). Outliers of single
residual channels are spread over all of them, which is what low-bit rounding likes; whether that wins at equal
bytes is measured (bench/feedback.py), not assumed.

llama-family architectures with RMSNorm before every reader: llama, qwen2, qwen3, qwen2moe, qwen3moe. Anything
else is one line, and nothing is written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter

from dynq.core.arrays import F32Array, U8Array
from dynq.core.atomic import check_new_output
from dynq.core.qtypes import FLOATS, qtype
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.writer import OutputTensor, copy_metadata, encode_float, write_gguf

log = logging.getLogger(__name__)

ARCHES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")
# the kinds that read the output of each norm, and the kinds that write into the residual stream
_FFN_READERS = "ffn_gate ffn_up ffn_gate_inp ffn_gate_exps ffn_up_exps ffn_gate_shexp ffn_up_shexp ffn_gate_inp_shexp"
_READS = {"attn_norm": ("attn_q", "attn_k", "attn_v", "attn_qkv"), "ffn_norm": tuple(_FFN_READERS.split())}
_WRITES = ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp")
_UNTOUCHED = ("attn_q_norm", "attn_k_norm", "rope_freqs")  # per head, after the projections: not the residual


def haar_orthogonal(d: int, seed: int) -> npt.NDArray[np.float64]:
    """A random orthogonal d×d matrix, uniform over the group (QR of a Gaussian with the signs of R's diagonal)."""
    g = np.random.default_rng(seed).standard_normal((d, d))
    q, r = np.linalg.qr(g)
    return np.asarray(q * np.sign(np.diagonal(r)), dtype=np.float64)


def _role(name: str) -> tuple[str, str | None]:
    """(what the rotation does to a tensor, the norm it reads if it is a reader)."""
    base, _, suffix = name.rpartition(".")
    kind = base.split(".", 2)[-1] if base.startswith("blk.") else base
    if name == "token_embd.weight":
        return "embed", None
    if name == "output.weight":
        return "read", "output_norm"
    if name == "output_norm.weight" or kind in _READS:
        return "norm", None
    for norm, readers in _READS.items():
        if kind in readers:
            return ("read", norm) if suffix == "weight" else ("keep", None)
    if kind in _WRITES:
        return "write", None
    if kind in _UNTOUCHED:
        return "keep", None
    raise DynqError(f"{name}: no rule for how it meets the residual stream; rotate knows {', '.join(ARCHES)}")


def _stored_name(name: str, stored: dict[str, TensorInfo]) -> str:
    """The source tensor a tensor of the output is made from (a tied output: the embedding)."""
    return name if name in stored else "token_embd.weight"


def rotate(source: str | os.PathLike[str], output: str | os.PathLike[str], *, seed: int = 0,
           overwrite: bool = False) -> Path:  # fmt: skip
    """Write `source` (a float GGUF of a llama-family model) with its residual stream rotated by a random orthogonal
    matrix drawn from `seed`: the same function, other weights."""
    src, out = Path(source), Path(output)
    if out.exists() and out.resolve() == src.resolve():
        raise DynqError(f"{out}: the output would overwrite the source; choose another name")
    check_new_output(out, overwrite)
    model = GGUFModel(src)
    if model.arch not in ARCHES:
        raise DynqError(f"{src}: architecture {model.arch}; rotate knows {', '.join(ARCHES)}")
    infos = {t.name: t for t in model.tensors}
    stored = [t for t in infos.values() if t.dtype.name not in FLOATS]
    if stored:
        raise DynqError(f"{src}: {stored[0].name} is {stored[0].dtype.name}; rotate needs a float reference "
                        "(make one with dynq quantize SRC -r f16)")  # fmt: skip
    roles = {name: _role(name) for name in infos}
    embd = infos["token_embd.weight"]
    q = haar_orthogonal(embd.row_length, seed)
    tensors = list(infos.values())
    if "output.weight" not in infos:  # tied: the output reads the final norm, the embedding does not
        tensors.append(TensorInfo("output.weight", embd.shape, embd.dtype))
        roles["output.weight"] = ("read", "output_norm")

    def norm_of(block: int | None, norm: str) -> F32Array:
        name = f"blk.{block}.{norm}.weight" if block is not None else f"{norm}.weight"
        return model.load(name).astype(np.float64)

    def values(t: TensorInfo) -> npt.NDArray[np.float64]:
        role, norm = roles[t.name]
        if role == "norm":
            return np.ones(tuple(reversed(t.shape)))
        w = model.load(_stored_name(t.name, infos)).astype(np.float64)
        if role == "embed":
            return w @ q
        if role == "read":
            assert norm is not None
            return (w * norm_of(t.block, norm)) @ q
        if role == "write":
            return np.asarray(q.T @ w if w.ndim > 1 else w @ q)
        return w

    def data(t: OutputTensor) -> U8Array:
        encoded = encode_float(qtype(t.info.dtype.name), values(t.info).astype(np.float32))
        model.release(_stored_name(t.info.name, infos))
        return encoded.reshape(-1)

    def metadata(writer: GGUFWriter) -> None:
        copy_metadata(model.metadata_fields(), writer, drop=lambda key: key.startswith("dynq.rotation."))
        writer.add_uint64("dynq.rotation.seed", seed)

    outputs = [OutputTensor(t, t.nbytes, qtype(t.dtype.name).ggml) for t in tensors]
    log.info("rotating %s into %s (seed %d)", src, out, seed)
    files = write_gguf(out, model.arch, outputs, data, metadata=metadata, overwrite=overwrite)
    return files[0]
