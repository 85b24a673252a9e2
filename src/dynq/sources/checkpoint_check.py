"""A Hugging Face checkpoint folder checked as a whole before any work: what llama.cpp's converter will read is
there, inside the folder, once, and agrees with config.json.

The converter reads the shards `model.safetensors.index.json` names (or, without an index, every
`model*.safetensors` in the folder) and trusts what it finds: an index may name `/elsewhere/secret.safetensors` or
`../x.safetensors`, a shard or a tensor may be missing (the conversion is then a model no runtime loads), a tensor
may be in two shards (the last one read wins), and `num_hidden_layers` is taken as given. Here:

- every entry of the folder is a regular file or a folder (a pipe or a device is refused without being opened), and
  a symbolic link stays inside the folder, or points into the `blobs/` of the Hugging Face cache the folder is a
  snapshot of;
- the index names shards by plain file name, each one there, each tensor it names in the header of the shard it
  names, and every tensor of those shards named by it; shards numbered `-00002-of-00005` are all there;
- every safetensors header is valid (safetensors_header.py) and no tensor is in two shards;
- config.json is a JSON object no deeper than 64 levels, its sizes fit the 32 bits GGUF gives them, and the blocks
  it declares (`num_hidden_layers`) are all in the weights: 100 declared on a 2-block checkpoint is one line at
  once, not a model of 100 blocks planned for minutes;
- then (checkpoint.py, with transformers' model built on the meta device) every parameter the config calls for is
  present with its shape, and the hyperparameters the converter wrote fit their GGUF types and are finite.

Each problem is one line naming the file or tensor and what to do, raised before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from gguf import GGUFValueType

from dynq.errors import BadInput
from dynq.sources.safetensors_header import TensorEntry, not_regular, open_regular, read_header

INDEX = "model.safetensors.index.json"
MAX_JSON_DEPTH = 64  # config.json and the index: real ones nest 4 or 5 levels
U32_MAX = 2**32 - 1
# The converter's names for the block count, in its order (`find_hparam`).
LAYER_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")
# Sizes a converter writes as GGUF uint32 (context length, widths, head and expert counts, vocabulary).
SIZE_KEYS = (*LAYER_KEYS, "hidden_size", "n_embd", "d_model", "intermediate_size", "moe_intermediate_size",
             "shared_expert_intermediate_size", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
             "vocab_size", "max_position_embeddings", "n_positions", "n_ctx", "seq_length", "num_experts",
             "num_local_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "kv_lora_rank",
             "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "sliding_window")  # fmt: skip
_NUMBERED = re.compile(r"^(.+?)-(\d+)-of-(\d+)\.safetensors$")
_BLOCK = re.compile(r"^(.+?)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Weights:
    """The safetensors files the converter reads (in its order) and every tensor in them, with its shard."""

    shards: tuple[Path, ...]
    tensors: dict[str, tuple[Path, TensorEntry]]


# --- JSON -----------------------------------------------------------------------------------------------------------


def _depth(tree: Any) -> int:
    """How deeply `tree` nests lists and objects (iteratively: a parsed tree may be deeper than the stack)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the checkpoint, parsed; nesting beyond `MAX_JSON_DEPTH` (Python's parser gives up on a
    hundred thousand `[` with a RecursionError) and text that is not JSON are one line."""
    with open_regular(path, what) as f:
        raw = f.read()
    deep = f"{path}: nests lists or objects more than {MAX_JSON_DEPTH} levels deep; no {what} does"
    try:
        tree = json.loads(raw)
    except RecursionError:
        raise BadInput(deep) from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        text = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BadInput(f"{path}: not valid JSON ({type(e).__name__}: {text}); download it again") from None
    if _depth(tree) > MAX_JSON_DEPTH:
        raise BadInput(deep)
    return tree


# --- the folder -----------------------------------------------------------------------------------------------------


def _hf_blob(target: Path, folder: Path) -> bool:
    """Whether `target` is a blob of the Hugging Face cache that `folder` is a snapshot of
    (`models--org--name/snapshots/REV/file -> ../../blobs/HASH`)."""
    for parent in folder.parents:
        if parent.name == "snapshots":
            return target.parent == parent.parent / "blobs"
    return False


def check_folder(directory: Path) -> None:
    """Every entry is a regular file or a folder, and a link to a file stays inside the folder (or in the Hugging
    Face cache's blobs): what a stranger's folder links to elsewhere on this machine is not read, let alone copied
    into an output. Nothing is opened."""
    folder = directory.resolve()
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise BadInput(f"{directory}: cannot list this folder ({e.strerror})") from None
    for entry in entries:
        path = directory / entry.name
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:  # a link to nothing: refused below if it names something the converter reads
            continue
        kind = not_regular(mode)
        if kind == "a folder":
            continue
        if kind is not None:
            raise BadInput(f"{path}: {kind}, not a file; a checkpoint folder holds files and folders only, remove it")
        if entry.is_symlink():
            target = Path(os.path.realpath(entry.path))
            if not target.is_relative_to(folder) and not _hf_blob(target, folder):
                raise BadInput(f"{path}: a link to {target}, outside the checkpoint folder; dynq reads a checkpoint "
                               "from its own folder only: copy the file in (cp -L) if it belongs there")  # fmt: skip


# --- config.json ----------------------------------------------------------------------------------------------------


def _sections(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The config and its text model's config (multimodal checkpoints keep the language model's sizes there)."""
    text = config.get("text_config")
    return [config, text] if isinstance(text, dict) else [config]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def read_config(directory: Path) -> dict[str, Any]:
    """config.json, checked: a JSON object whose sizes fit what GGUF holds them in (uint32)."""
    path = directory / "config.json"
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise BadInput(f"{path}: not a JSON object; download it again")
    for section in _sections(config):
        for key in SIZE_KEYS:
            value = section.get(key)
            if _is_int(value) and value > U32_MAX:
                raise BadInput(f"{path}: {key} is {value}, more than a model file holds ({U32_MAX}); "
                               "config.json is damaged or crafted")  # fmt: skip
    return config


def _layer_count(config: Mapping[str, Any]) -> tuple[str, int] | None:
    for section in _sections(config):
        for key in LAYER_KEYS:
            value = section.get(key)
            if _is_int(value) and value > 0:
                return key, value
    return None


def _ranges(numbers: Iterable[int]) -> str:
    """`0-5, 7, 9-11`: a set of block numbers, short."""
    parts: list[str] = []
    run: list[int] = []
    for n in sorted(numbers):
        if run and n != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(n)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")


def check_blocks(directory: Path, config: Mapping[str, Any], weights: Weights) -> None:
    """Every block config.json declares is in the weights (blocks past it, such as DeepSeek-V3's multi-token
    prediction layer, are the converter's to keep or drop)."""
    declared = _layer_count(config)
    if declared is None:
        return
    key, n = declared
    blocks: dict[str, set[int]] = {}
    for name in weights.tensors:
        if (m := _BLOCK.match(name)) is not None:
            blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
    if any(len(found) >= n and all(i in found for i in range(n)) for found in blocks.values()):
        return
    if not blocks:
        held = "no numbered blocks"
    else:
        prefix, found = max(blocks.items(), key=lambda item: len(item[1]))
        held = f"blocks {_ranges(found)} ({prefix}.N)"
    raise BadInput(f"{directory}/config.json: {key} is {n}, but the weights hold {held}; the checkpoint is "
                   "incomplete (download it again) or config.json is not its own")  # fmt: skip


# --- the weights ----------------------------------------------------------------------------------------------------


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _index(directory: Path) -> dict[str, str] | None:
    """The index's tensor -> shard file map, each shard a plain file name in the folder; None without an index."""
    path = directory / INDEX
    if not os.path.lexists(path):
        return None
    index = read_json(path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInput(f"{path}: not a safetensors index (no weight_map naming tensors); download it again")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise BadInput(f"{path}: tensor {tensor} has no shard file name; download the index again")
        if not _plain_name(shard):
            raise BadInput(f"{path}: tensor {tensor} is put in {shard[:200]!r}, which is not a file of this folder "
                           "(a path elsewhere, or with `..`); an index names the shards beside it")  # fmt: skip
    return weight_map


def _no_index_shards(directory: Path) -> list[str]:
    """What the converter reads without an index: every `model*.safetensors` of the folder."""
    names = sorted(n for n in os.listdir(directory) if n.startswith("model") and n.endswith(".safetensors"))
    if not names:
        if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in os.listdir(directory)):
            raise BadInput(f"{directory}: holds pytorch_model*.bin weights; dynq reads checkpoints stored as "
                           "safetensors (model*.safetensors), convert or download those")  # fmt: skip
        raise BadInput(f"{directory}: no model*.safetensors (and no {INDEX}); download the weights")
    return names


def _check_numbering(directory: Path, names: Iterable[str]) -> None:
    """Shards named `PREFIX-00002-of-00005.safetensors` are all there, each once in one numbering."""
    series: dict[str, set[int]] = {}
    totals: dict[str, tuple[int, int]] = {}  # prefix -> (total, digits)
    for name in names:
        if (m := _NUMBERED.match(name)) is None:
            continue
        prefix, numbering = m.group(1), (int(m.group(3)), len(m.group(3)))
        if totals.setdefault(prefix, numbering)[0] != numbering[0]:
            raise BadInput(f"{directory}: {prefix} shards of two numberings (of {totals[prefix][0]} and of "
                           f"{numbering[0]}); keep one download")  # fmt: skip
        series.setdefault(prefix, set()).add(int(m.group(2)))
    for prefix, numbers in series.items():
        total, digits = totals[prefix]
        if (odd := next((i for i in sorted(numbers) if not 1 <= i <= total), None)) is not None:
            raise BadInput(f"{directory}: a {prefix} shard is numbered {odd} of {total}; keep one download")
        for i in range(1, total + 1):
            if i not in numbers:
                missing = f"{prefix}-{i:0{digits}d}-of-{total:0{digits}d}.safetensors"
                raise BadInput(f"{directory / missing}: missing (the shards are numbered 1 to {total}); download it")


def read_weights(directory: Path) -> Weights:
    """Every shard the converter will read, its header checked, each tensor in exactly one shard, and the index
    (if any) in agreement with the headers."""
    weight_map = _index(directory)
    names = sorted(set(weight_map.values())) if weight_map is not None else _no_index_shards(directory)
    _check_numbering(directory, names)
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    shards = []
    for name in names:
        shard = directory / name
        try:
            os.stat(shard)
        except OSError:
            named = f", named in {INDEX}," if weight_map is not None else ""
            raise BadInput(f"{shard}: this shard{named} is missing; download it") from None
        shards.append(shard)
        for tensor, entry in read_header(shard).items():
            if tensor in tensors:
                raise BadInput(f"{shard}: tensor {tensor} is also in {tensors[tensor][0].name}; a checkpoint holds "
                               "each tensor once, keep one download")  # fmt: skip
            if weight_map is not None and weight_map.get(tensor) != name:
                said = f"puts it in {weight_map[tensor]}" if tensor in weight_map else "does not name it"
                raise BadInput(f"{shard}: holds tensor {tensor}, but {INDEX} {said}; the index and the shards are "
                               "from different downloads")  # fmt: skip
            tensors[tensor] = (shard, entry)
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in tensors:
                raise BadInput(f"{directory / name}: does not hold tensor {tensor}, which {INDEX} puts there; "
                               "download the shard again")  # fmt: skip
    return Weights(tuple(shards), tensors)


def check_checkpoint(directory: Path) -> tuple[dict[str, Any], Weights]:
    """The folder, config.json and the weights, checked as a whole (see the module docstring); reads headers
    only. Returns the config and the weights."""
    if not os.path.lexists(directory / "config.json"):
        raise BadInput(f"{directory}: no config.json; a Hugging Face checkpoint directory holds one")
    check_folder(directory)
    config = read_config(directory)
    weights = read_weights(directory)
    check_blocks(directory, config, weights)
    return config, weights


# --- against the model transformers builds, and the converter's output -------------------------------------------


# Quantized checkpoints whose tensors carry the names transformers gives the unquantized model (DeepSeek-V3's FP8
# adds a `weight_scale_inv` beside each `weight`). GPTQ (`qweight`), compressed-tensors, MXFP4 (`_blocks`) and the
# rest store other names: for them only the shapes of the tensors present are compared.
_SAME_NAMES = frozenset({None, "fp8"})


def stored_as_built(config: Mapping[str, Any]) -> bool:
    """Whether the checkpoint stores each parameter under the name transformers builds it with."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return True
    return isinstance(quantization, dict) and quantization.get("quant_method") in _SAME_NAMES


def check_against_model(
    directory: Path, weights: Weights, expected: Mapping[str, tuple[int, ...]], require_all: bool = True
) -> None:
    """Every parameter transformers builds from config.json (named as a checkpoint stores it) is in the weights
    (with `require_all`), with its shape; tensors beyond those (FP8 scales, a multi-token prediction block) are the
    converter's."""
    missing = [name for name in expected if name not in weights.tensors]
    for name, want in expected.items():
        if name in weights.tensors:
            shard, entry = weights.tensors[name]
            if entry.shape != want:
                raise BadInput(f"{shard}: tensor {name} has shape {entry.shape} but config.json makes it {want}; "
                               "the weights do not belong to this config")  # fmt: skip
    if missing and require_all:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadInput(f"{directory}: tensor {missing[0]}{more}, which config.json calls for, is in none of its "
                       "safetensors files; the checkpoint is incomplete, download it again")  # fmt: skip


_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1), GGUFValueType.INT8: (-(2**7), 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1), GGUFValueType.INT16: (-(2**15), 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1), GGUFValueType.INT32: (-(2**31), 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1), GGUFValueType.INT64: (-(2**63), 2**63 - 1),
}  # fmt: skip
_FLOATS = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
_F32_MAX = float(np.finfo(np.float32).max)


def _value_problem(value: Any, vtype: GGUFValueType) -> str | None:
    """Why `value` cannot be written as a GGUF `vtype` (or would be a number that is not one), or None."""
    if vtype in _INT_RANGES:
        low, high = _INT_RANGES[vtype]
        if not isinstance(value, int | np.integer) or not low <= int(value) <= high:
            return f"is {str(value)[:40]}, outside the range of its type {vtype.name} ({low} to {high})"
    elif vtype in _FLOATS:
        if not isinstance(value, int | float | np.integer | np.floating) or not math.isfinite(float(value)):
            return f"is {str(value)[:40]}, not a finite number"
        if vtype is GGUFValueType.FLOAT32 and abs(float(value)) > _F32_MAX:
            return f"is {value}, beyond the range of its type FLOAT32"
    elif vtype is GGUFValueType.STRING and isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds text that is not Unicode (a lone surrogate)"
    return None


def _array_problem(values: list[Any] | tuple[Any, ...], item_type: GGUFValueType) -> str | None:
    """`_value_problem` of the first bad element of an array, at numpy speed for the common cases (a vocabulary is
    three arrays of 150,000 elements)."""
    if item_type is GGUFValueType.STRING and all(isinstance(v, str | bytes) for v in values):
        return _value_problem("".join(v for v in values if isinstance(v, str)), item_type)
    array = np.asarray(values) if item_type in _INT_RANGES or item_type in _FLOATS else None
    if array is not None and array.size and array.dtype.kind in "iuf":
        if item_type in _INT_RANGES and array.dtype.kind in "iu":
            low, high = _INT_RANGES[item_type]
            if low <= int(array.min()) and int(array.max()) <= high:
                return None
        elif item_type in _FLOATS and bool(np.isfinite(array).all()):
            fits = item_type is GGUFValueType.FLOAT64 or float(np.abs(array).max()) <= _F32_MAX
            if fits:
                return None
    problems = (_value_problem(v, item_type) for v in values)
    return next((p for p in problems if p is not None), None)


def check_metadata(directory: Path, fields: Iterable[tuple[str, Any, GGUFValueType, GGUFValueType | None]]) -> None:
    """Each key/value the converter wrote from config.json fits its GGUF type and is a finite number where it is a
    number: `max_position_embeddings` 2**70 is refused here, by plan and quantize alike, not by the writer's
    `struct.pack` after the output was begun."""
    for key, value, vtype, sub_type in fields:
        if vtype is GGUFValueType.ARRAY and isinstance(value, list | tuple):
            item_type = sub_type or (GGUFValueType.get_type(value[0]) if value else GGUFValueType.UINT8)
            problem = _array_problem(value, item_type)
        else:
            problem = _value_problem(value, vtype)
        if problem is not None:
            raise BadInput(f"{directory}/config.json: the model's {key} {problem}; config.json is damaged or crafted")
