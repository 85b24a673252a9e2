"""A Hugging Face checkpoint directory as a source: the model llama.cpp's converter would write from it.

The converter (llamacpp/converter.py) runs in its lazy mode: it maps names, writes the hyperparameters, tokenizer
and chat template, dequantizes FP8 block-scaled weights and stacks experts, but every tensor stays a graph of
operations over memory-mapped safetensors until something evaluates it. So the inventory and the plan come from
the checkpoint's headers alone, and each tensor is computed only when the quantizer loads it, then dropped.

The source is the converter's F16 conversion (`--outtype f16`): names, order, types and values are those of the
GGUF the converter would write, so a plan or a quant of the directory equals one of that GGUF. One expert of a
stacked expert tensor is computed from that expert's weights alone (`load_expert`), so memory stays at one expert
matrix however many experts a block has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers

from dynq.core.arrays import F32Array
from dynq.core.atomic import atomic_write_text
from dynq.core.qtypes import qtype
from dynq.core.source import MetadataField
from dynq.core.tensors import ModelInventory, TensorInfo
from dynq.errors import DynqError
from dynq.llamacpp.converter import load_conversion

log = logging.getLogger(__name__)

# Operations a stacked expert tensor passes through after `torch.stack` that act on every expert alike (dtype
# conversions), so one expert's slice of the result is the operation applied to that expert alone.
_PER_ELEMENT_METHODS = frozenset({"to", "float", "half", "bfloat16", "contiguous", "astype", "numpy"})
_WINDOW, _WINDOWS = 1 << 16, 64  # fingerprint: 64 windows of 64 KiB per shard
_PER_ELEMENT_FUNCS = ("LazyNumpyTensor.astype.<locals>.<lambda>", "LazyTorchTensor.numpy.<locals>.<lambda>")


def _evaluate(t: Any) -> Any:
    """A lazy tensor's value, computed without keeping it (or anything under it) in the graph: gguf-py's own
    `to_eager` caches every node, which would keep each tensor alive for as long as the writer holds its graph."""
    if not isinstance(t, gguf.LazyBase):
        return t
    if t._data is not None:
        return t._data
    assert t._func is not None
    args = gguf.LazyBase._recurse_apply(t._args, _evaluate)
    return t._func(*args, **t._kwargs)


def _method_name(func: Callable[..., Any]) -> str | None:
    """The method a lazy `tensor.method(...)` call wraps (gguf-py's `__getattr__` closes over its name)."""
    if func.__code__.co_freevars == ("name",) and func.__closure__:
        name = func.__closure__[0].cell_contents
        return name if isinstance(name, str) else None
    return None


def _per_element(t: gguf.LazyBase) -> bool:
    func = t._func
    if func is None or not t._args or not isinstance(t._args[0], gguf.LazyBase):
        return False
    if tuple(t._meta.shape) != tuple(t._args[0]._meta.shape):
        return False
    return getattr(func, "__qualname__", "") in _PER_ELEMENT_FUNCS or _method_name(func) in _PER_ELEMENT_METHODS


def _is_stack(t: gguf.LazyBase) -> bool:
    dim = t._kwargs.get("dim", t._args[1] if len(t._args) > 1 else 0)
    return t._func is torch.stack and dim == 0 and isinstance(t._args[0], list | tuple)


def _expert_value(t: Any, expert: int) -> Any | None:
    """Expert `expert`'s slice of a stacked tensor, computed from that expert's inputs only; None when the graph is
    not a stack followed by per-element operations (then the caller computes the whole tensor)."""
    if not isinstance(t, gguf.LazyBase):
        return None
    if t._data is not None:
        return t._data[expert]
    if _is_stack(t):
        return _evaluate(t._args[0][expert])
    if _per_element(t):
        inner = _expert_value(t._args[0], expert)
        if inner is None:
            return None
        assert t._func is not None
        rest = gguf.LazyBase._recurse_apply(t._args[1:], _evaluate)
        return t._func(inner, *rest, **t._kwargs)
    return None


def _as_f32(values: Any, dtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> F32Array:
    array = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.dtype == np.uint8:
        array = gguf.quants.dequantize(array, dtype)
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one tensor's header entry (dtype, shape, data_offsets and their agreement), or None."""
    if not isinstance(entry, dict):
        return "is not a mapping"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        return f"has the unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return "has no valid shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return "has no valid data_offsets"
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
        return f"holds {offsets[1] - offsets[0]} bytes for a {dtype} shape {shape}"
    return None


def _read_header(path: Path) -> dict[str, Any]:
    """A shard's safetensors header, after checking the file holds every byte it promises (a download cut short
    shows here, not as a crash halfway through a quantization)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DynqError(f"{path}: not a safetensors file (shorter than its header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DynqError(f"{path}: the safetensors header is cut short; download the file again")
        try:
            header: dict[str, Any] = json.loads(f.read(n))
        except ValueError:
            raise DynqError(f"{path}: the safetensors header is not valid JSON; download the file again") from None
    if not isinstance(header, dict):
        raise DynqError(f"{path}: the safetensors header is not a JSON object; download the file again")
    end = 0
    for name, entry in header.items():
        if name != "__metadata__":
            if (problem := _entry_problem(entry)) is not None:
                raise DynqError(f"{path}: tensor {name} {problem} in the safetensors header; download the file again")
            end = max(end, entry["data_offsets"][1])
    if 8 + n + end > size:
        raise DynqError(
            f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}; download it again"
        )
    return header


def _expected_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape as transformers builds the model from config.json (on the meta device: no memory);
    empty when transformers does not know the architecture."""
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, ImportError, OSError) as e:
        log.debug("%s: shapes not checked against config.json (%s)", directory, e)
        return {}
    except Exception as e:  # transformers' own checks of the values (a string for a size, a list for a name ...)
        raise DynqError(f"{directory}/config.json: transformers cannot read it ({_first_line(e)})") from e
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _shards(directory: Path) -> list[Path]:
    """The safetensors files of the checkpoint; each one its index names must be there."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise DynqError(f"{index}: not a safetensors index (no weight_map); download it again") from None
        for name in named:
            if not (directory / name).is_file():
                raise DynqError(f"{directory / name}: this shard, named in {index.name}, is missing; download it")
    return sorted(directory.glob("*.safetensors"))


def _check_shapes(directory: Path, shards: list[Path]) -> None:
    """A tensor whose shape disagrees with config.json (a wrong or mixed-up file) would convert into a model no
    runtime loads; name it before any work."""
    expected = _expected_shapes(directory)
    for shard in shards:
        for name, entry in _read_header(shard).items():
            want = expected.get(name)
            if want is not None and tuple(entry["shape"]) != want:
                raise DynqError(
                    f"{shard}: tensor {name} has shape {tuple(entry['shape'])} but config.json makes it {want}; "
                    "the weights do not belong to this config"
                )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise DynqError(f"{path}: not valid JSON ({_first_line(e)}); download it again") from None
    if not isinstance(config, dict):
        raise DynqError(f"{path}: not a JSON object; download it again")


# The fingerprint memo: bump when what `_digest` reads changes.
_MEMO_VERSION = 1


def _fingerprinted(directory: Path) -> list[Path]:
    """The files the fingerprint reads: the JSON files (config, index, tokenizer), then the shards."""
    return sorted(directory.glob("*.json")) + sorted(directory.glob("*.safetensors"))


def _digest(directory: Path) -> str:
    """sha256 of the JSON files, every shard's header and evenly spaced windows of its data: the headers carry each
    tensor's name, type, shape and byte range, the windows catch changed weights."""
    digest = hashlib.sha256()
    for path in _fingerprinted(directory):
        digest.update(path.name.encode())
        if path.suffix != ".safetensors":
            digest.update(path.read_bytes())
            continue
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            # a damaged file is named by the checkpoint's own checks; here it only must not crash or overread
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(f.read(min(n, max(size - 8, 0))))
            step = max(_WINDOW, size // _WINDOWS)
            for start in range(0, size, step):
                f.seek(start)
                digest.update(f.read(_WINDOW))
    return digest.hexdigest()


def _memo_key(directory: Path, files: list[Path]) -> str:
    """The directory and each fingerprinted file's name, size, modification time and inode: any change to a file
    (or a file added or removed) makes another key, so a memo is never trusted for changed contents."""
    h = hashlib.sha256(f"{_MEMO_VERSION}:{directory.resolve()}".encode())
    for path in files:
        st = path.stat()
        h.update(f"\0{path.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}".encode())
    return h.hexdigest()


def checkpoint_fingerprint(directory: Path, cache: Path) -> str:
    """The content fingerprint of the checkpoint in `directory` (what names its cached F16 conversion), remembered
    under cache/fingerprints per file set, size and modification time: a hit reads no shard and builds no model.
    A memo that cannot be read is recomputed, never trusted."""
    try:
        files = _fingerprinted(directory)
        memo = cache / "fingerprints" / f"{_memo_key(directory, files)}.json"
    except OSError:  # a file vanished while listing: the digest names the problem, or computes it anyway
        return _digest(directory)
    if not files:  # not a checkpoint (what opens it says so): nothing worth remembering
        return _digest(directory)
    try:
        data = json.loads(memo.read_text())
        if isinstance(data, dict) and data.get("version") == _MEMO_VERSION and _is_digest(data.get("fingerprint")):
            return str(data["fingerprint"])
    except (OSError, ValueError):
        pass
    fingerprint = _digest(directory)  # after the key: a file changed meanwhile leaves a memo under its old key
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps({"version": _MEMO_VERSION, "fingerprint": fingerprint}))
    except OSError:  # a read-only cache: computed again next time
        pass
    return fingerprint


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class HFCheckpoint:
    """A Hugging Face checkpoint directory, read through llama.cpp's converter (see the module docstring)."""

    def __init__(self, directory: Path, cache: Path, spec: str | None = None) -> None:
        self.directory = directory
        self._spec = spec or str(directory)
        self._cache = cache
        self._fingerprint: str | None = None
        if not (directory / "config.json").is_file():
            raise DynqError(f"{directory}: no config.json; a Hugging Face checkpoint directory holds one")
        _check_config(directory / "config.json")
        _check_shapes(directory, _shards(directory))
        conversion = load_conversion(cache)
        try:
            hparams = conversion.ModelBase.load_hparams(directory, False)
            arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
        except Exception as e:  # as above: the converter's reading of config.json
            raise DynqError(f"{directory}/config.json: {_first_line(e)}") from e
        if not isinstance(arch, str):
            raise DynqError(f"{directory}/config.json: 'architectures' names no architecture")
        try:
            model_class = conversion.get_model_class(arch, mmproj=False)
        except NotImplementedError:
            raise DynqError(
                f"{directory}: llama.cpp's converter does not know the architecture {arch}; "
                "see `convert_hf_to_gguf.py --print-supported-models`"
            ) from None
        self.hf_arch = arch
        with tempfile.TemporaryDirectory(prefix="dynq-convert-") as tmp, torch.inference_mode():
            try:
                model = model_class(directory, gguf.LlamaFileType.MOSTLY_F16, Path(tmp) / "model.gguf")
                model.prepare_tensors()
                model.prepare_metadata(vocab_only=False)
            except Exception as e:  # the converter checks a checkpoint with whatever exception comes first
                raise DynqError(f"{directory}: llama.cpp's converter stopped: {_first_line(e)}") from e
        writer = model.gguf_writer
        self.model_arch = gguf.MODEL_ARCH_NAMES[model.model_arch]
        self._kv: dict[str, Any] = dict(writer.kv_data[0])
        self._tensors: dict[str, Any] = dict(writer.tensors[0])
        self._whole: tuple[str, Any] | None = None
        self._infos = {
            name: TensorInfo(name, tuple(int(d) for d in reversed(ti.shape)), qtype(ti.dtype.name))
            for name, ti in self._tensors.items()
        }

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: v.value for k, v in self._kv.items()}

    def inventory(self) -> ModelInventory:
        return ModelInventory(self.spec, self.model_arch, tuple(self._infos.values()), self.metadata)

    def metadata_fields(self) -> list[MetadataField]:
        return [MetadataField(k, v.value, v.type, v.sub_type) for k, v in self._kv.items()]

    def _tensor(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise DynqError(f"{self.directory}: no tensor named {name}") from None

    def load(self, name: str) -> F32Array:
        ti = self._tensor(name)
        with torch.inference_mode():
            return _as_f32(_evaluate(ti.tensor), ti.dtype, tuple(reversed(self._infos[name].shape)))

    def load_expert(self, name: str, expert: int) -> F32Array:
        ti, info = self._tensor(name), self._infos[name]
        if len(info.shape) != 3 or not 0 <= expert < info.shape[2]:
            raise DynqError(f"{self.directory}: tensor {name} {info.shape} has no expert {expert}")
        rows = (info.shape[1], info.shape[0])
        with torch.inference_mode():
            value = _expert_value(ti.tensor, expert)
            if value is None:
                # Not a stack of experts (e.g. attention split per head): computed whole once, kept until released.
                if self._whole is None or self._whole[0] != name:
                    log.debug("%s: %s is not a stack of experts; computing it whole", self.spec, name)
                    self._whole = (name, _evaluate(ti.tensor))
                value = self._whole[1][expert]
            return _as_f32(value, ti.dtype, rows)

    def release(self, name: str) -> None:
        """Loads keep nothing but a whole 3-D tensor that is not a stack of experts; drop it."""
        if self._whole is not None and self._whole[0] == name:
            self._whole = None

    def fingerprint(self) -> str:
        """The checkpoint's content fingerprint (see `checkpoint_fingerprint`), computed at most once per instance."""
        if self._fingerprint is None:
            self._fingerprint = checkpoint_fingerprint(self.directory, self._cache)
        return self._fingerprint
