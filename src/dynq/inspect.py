"""What a GGUF file holds: types, sizes, bits per weight per tensor class, and the metadata that matters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import LlamaFileType

from dynq.core.sizes import ClassStats, census, class_breakdown
from dynq.core.tensors import TensorClass
from dynq.gguf_io.reader import GGUFModel

_ARCH_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "expert_count", "expert_used_count", "expert_shared_count",
              "leading_dense_block_count")  # fmt: skip
_OWN_PREFIXES = ("dynq.", "quantize.imatrix.")


@dataclass(frozen=True)
class FileSummary:
    path: str
    shards: list[str]
    arch: str
    metadata: dict[str, Any]
    n_tensors: int
    type_counts: dict[str, int]
    type_bytes: dict[str, int]
    total_bytes: int
    file_bytes: int
    n_parameters: int
    classes: dict[TensorClass, ClassStats]

    @property
    def bpw(self) -> float:
        return 8.0 * self.total_bytes / self.n_parameters if self.n_parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "shards": self.shards,
            "arch": self.arch,
            "metadata": self.metadata,
            "n_tensors": self.n_tensors,
            "census": self.type_counts,
            "type_bytes": self.type_bytes,
            "total_bytes": self.total_bytes,
            "file_bytes": self.file_bytes,
            "n_parameters": self.n_parameters,
            "bpw": self.bpw,
            "classes": {cls.value: s.to_dict() for cls, s in self.classes.items()},
        }


def _file_type_name(value: object) -> object:
    if isinstance(value, int):
        try:
            return f"{value} ({LlamaFileType(value).name.removeprefix('MOSTLY_')})"
        except ValueError:
            return value
    return value


def key_metadata(model: GGUFModel) -> dict[str, Any]:
    meta = model.metadata
    keys = ["general.name", "general.architecture", "general.file_type", "general.quantization_version"]
    keys += [f"{model.arch}.{k}" for k in _ARCH_KEYS]
    out = {k: meta[k] for k in keys if k in meta}
    if "general.file_type" in out:
        out["general.file_type"] = _file_type_name(out["general.file_type"])
    tokens = model.readers[0].fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        out["vocab_size"] = len(tokens.data)
    out |= {k: v for k, v in meta.items() if k.startswith(_OWN_PREFIXES)}
    return out


def summarize(model: GGUFModel) -> FileSummary:
    tensors = model.tensors
    type_bytes: dict[str, int] = {}
    for t in tensors:
        type_bytes[t.dtype.name] = type_bytes.get(t.dtype.name, 0) + t.nbytes
    return FileSummary(
        path=str(model.path),
        shards=[str(p) for p in model.shards],
        arch=model.arch,
        metadata=key_metadata(model),
        n_tensors=len(tensors),
        type_counts=census(t.dtype for t in tensors),
        type_bytes=type_bytes,
        total_bytes=sum(type_bytes.values()),
        file_bytes=sum(p.stat().st_size for p in model.shards),
        n_parameters=sum(t.n_elements for t in tensors),
        classes=class_breakdown((t, t.dtype) for t in tensors),
    )
