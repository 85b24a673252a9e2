"""A Hugging Face checkpoint directory as a source: the model llama.cpp's converter would write from it.

The converter (llamacpp/converter.py) runs in its lazy mode: it maps names, writes the hyperparameters, tokenizer
and chat template, dequantizes FP8 block-scaled weights and stacks experts, but every tensor stays a graph of
operations over memory-mapped safetensors until something evaluates it. So the inventory and the plan come from
the checkpoint's headers alone, and each tensor is computed only when the quantizer loads it, then dropped.

The source is the converter's F16 conversion (`--outtype f16`): names, order, types and values are those of the
GGUF the converter would write, so a plan or a quant of the directory equals one of that GGUF. One expert of a
stacked expert tensor is computed from that expert's weights alone (`load_expert`), so memory stays at one expert
matrix however many experts a block has.

The converter trusts the folder (an index may name any path, a shard or tensor may be missing, config.json's block
count is taken as given), so before it runs the folder is checked as a whole (checkpoint_check.py), against the
model transformers builds from config.json on the meta device, and after it the hyperparameters it wrote; while the
checkpoint is opened transformers' own messages go through dynq's logger, cleaned (relay.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from transformers.core_model_loading import revert_weight_conversion

from dynq.core.arrays import F32Array
from dynq.core.atomic import atomic_write_text
from dynq.core.qtypes import qtype
from dynq.core.source import MetadataField
from dynq.core.tensors import ModelInventory, TensorInfo
from dynq.errors import DynqError
from dynq.llamacpp.converter import load_conversion
from dynq.sources.checkpoint_check import (
    check_against_model,
    check_checkpoint,
    check_folder,
    check_metadata,
    stored_as_built,
)
from dynq.sources.relay import relayed

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


def _expected_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Each parameter transformers builds from config.json (on the meta device: no memory), named as a checkpoint
    stores it (transformers' own conversion reverted: one tensor per expert where transformers fuses them), with
    its shape; empty when transformers does not know the architecture or cannot name its parameters."""
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, ImportError, OSError) as e:
        log.debug("%s: shapes not checked against config.json (%s)", directory, e)
        return {}
    except Exception as e:  # transformers' own checks of the values (a string for a size, a list for a name ...)
        raise DynqError(f"{directory}/config.json: transformers cannot read it ({_first_line(e)})") from e
    try:
        stored = revert_weight_conversion(model, dict(model.named_parameters()))
    except Exception as e:  # a conversion transformers cannot undo on the meta device: the names are not known
        log.debug("%s: parameters not checked against config.json (%s)", directory, _first_line(e))
        return {}
    optional = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    return {name: tuple(t.shape) for name, t in stored.items() if not any(p.search(name) for p in optional)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# The fingerprint memo: bump when what `_digest` reads changes.
_MEMO_VERSION = 1


def _fingerprinted(directory: Path) -> list[Path]:
    """The files the fingerprint reads: the JSON files (config, index, tokenizer), then the shards (regular files
    only: `check_folder` has refused pipes, devices and links out of the folder)."""
    files = sorted(directory.glob("*.json")) + sorted(directory.glob("*.safetensors"))
    return [path for path in files if path.is_file()]


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
    check_folder(directory)  # nothing outside the folder, no pipe: reading them could leak, or never end
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
        with relayed(log):  # transformers' warnings print config.json values: cleaned, through dynq's logger
            self._open(directory, cache)

    def _open(self, directory: Path, cache: Path) -> None:
        """Check the folder as a whole, then run the converter up to (not including) computing any tensor."""
        conversion = load_conversion(cache)  # a missing converter is named before the checkpoint is looked at
        config, weights = check_checkpoint(directory)
        check_against_model(directory, weights, _expected_shapes(directory), stored_as_built(config))
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
        check_metadata(directory, ((k, v.value, v.type, v.sub_type) for k, v in self._kv.items()))

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
