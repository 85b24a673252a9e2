"""Write the model of a dense llama.cpp GGUF back out as a Hugging Face checkpoint directory.

Why: llama.cpp's own `convert_hf_to_gguf.py` is how real models reach GGUF, and the HF-checkpoint source path has to
be tested against it with real trained weights. None reach this environment as safetensors; the zoo's GGUFs do, so
they are turned back into the checkpoint the converter expects (config.json, safetensors, tokenizer files).

The route is transformers' own GGUF reader (config, tokenizer, tensor names and the reverse of llama.cpp's tensor
permutations) but not `from_pretrained(gguf_file=)`: a model loaded that way counts as GGUF-quantized and
`save_pretrained` refuses it ("not serializable"). The tensors are dequantized here one at a time, placed into a
model built on the meta device, and saved with `save_pretrained`. Checked on qwen2 (zoo qwen2.5-coder-0.5b/1.5b)
and llama (smollm2-135m): llama.cpp's converter gives back the GGUF's tensor names and shapes, its tokenizer and
its chat template.

Dtypes. Weight matrices are stored as F16, not BF16. A quantized weight dequantizes to F32 values that neither holds
exactly, but F16 keeps 11 significant bits to BF16's 8 (and the weights are far from F16's range limits), and
`convert_hf_to_gguf.py --outtype f16` gives back exactly the F16 values written. 1-D tensors (norms, biases) stay
F32, as the GGUF holds them and as the converter writes them, so they come back bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import TokenType

from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel

log = logging.getLogger(__name__)

WEIGHT_DTYPE = torch.float16
DEFAULT_MAX_SHARD_SIZE = "2GB"  # a 1.5B model in F16 (3.1 GB) is written as two shards with an index


def export_checkpoint(
    gguf_path: Path, out_dir: Path, *, blocks: int | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write the GGUF's model as a Hugging Face checkpoint directory `out_dir` and return it.

    `blocks` keeps only the first that many transformer blocks (with the embeddings, final norm and output), for
    tests that need real weights but not a whole model. `max_shard_size` is `save_pretrained`'s: above it the
    safetensors are split into shards with a `model.safetensors.index.json`.

    Everything is written into a temporary folder beside `out_dir` and renamed into place at the end, so `out_dir`
    is either complete or absent. `out_dir` must not exist yet (an empty folder is allowed).
    """
    from transformers import AutoModelForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_target(gguf_path, out_dir)
    gguf = GGUFModel(gguf_path)
    config_dict = _config_dict(gguf_path)
    n_blocks = int(config_dict["num_hidden_layers"])
    if blocks is not None:
        if not 1 <= blocks <= n_blocks:
            raise DynqError(f"{gguf_path}: blocks={blocks}, but the model has {n_blocks} blocks; give 1 to {n_blocks}")
        config_dict["num_hidden_layers"] = blocks
    config = _config(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]

    state = _state_dict(gguf, model, config_dict, blocks if blocks is not None else n_blocks)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if missing := sorted(set(model.state_dict()) - set(state) - tied):
        raise DynqError(f"{gguf_path}: the GGUF has no tensor for {', '.join(missing[:5])}; is it a dense model?")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.config.dtype = WEIGHT_DTYPE

    with _staging(out_dir) as staging, _quiet_progress():
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        _write_tokenizer(gguf, staging, config)
    log.info("%s: wrote %d of %d blocks as a Hugging Face checkpoint in %s", gguf_path, config.num_hidden_layers,
             n_blocks, out_dir)  # fmt: skip
    return out_dir


def export_tokenizer(gguf_path: Path, out_dir: Path) -> Path:
    """Write only the tokenizer files of the GGUF (tokenizer.json, tokenizer_config.json with the chat template)
    into a new folder `out_dir`, for checkpoints built from other weights; returns `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_target(gguf_path, out_dir)
    gguf = GGUFModel(gguf_path)
    config = _config(_config_dict(gguf_path))
    with _staging(out_dir) as staging:
        _write_tokenizer(gguf, staging, config)
    return out_dir


# --- weights ---


def _config_dict(gguf_path: Path) -> dict[str, Any]:
    """The transformers config values transformers reads from the GGUF's metadata.

    GGUF keeps floats as F32, so 1e-6 comes back as 9.999999974752427e-07: the shortest decimal that rounds to the
    same F32 is what the original config.json said, and the converter writes the very same F32 from it.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    values = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]  # type: ignore[no-untyped-call]
    return {
        k: float(str(np.float32(v))) if isinstance(v, float) else v
        for k, v in values.items()
        if k != "_model_name_or_path"  # the GGUF's general.name, not a path
    }


def _config(config_dict: dict[str, Any]) -> Any:
    """The config as `AutoConfig.from_pretrained(gguf_file=)` builds it: from the values, so that derived fields
    such as `layer_types` are sized for the blocks kept."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(dict(config_dict))


def _state_dict(gguf: GGUFModel, model: Any, config_dict: dict[str, Any], kept: int) -> dict[str, torch.Tensor]:
    """The GGUF's tensors of the first `kept` blocks under the model's parameter names, mapped (and un-permuted)
    as `load_gguf_checkpoint(return_tensors=True)` does, but dequantized one at a time, blocks past `kept` never
    read, and each cast to its stored dtype at once: the peak memory is the F16 model, not an F32 copy of it."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(gguf.arch, TensorProcessor)(config=config_dict)  # type: ignore[no-untyped-call]
    names = get_gguf_hf_weights_map(model, processor)
    state: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for info in gguf.tensors:
        if info.block is not None and info.block >= kept:
            continue
        weights = gguf.load(info.name)
        result = processor.process(  # type: ignore[no-untyped-call]
            weights=weights, name=info.name, tensor_key_mapping=names, parsed_parameters={}
        )
        gguf.release(info.name)
        if result.name not in names:
            unplaced.append(info.name)
            continue
        state[names[result.name]] = _stored(info.name, np.asarray(result.weights))
    if unplaced:
        raise DynqError(
            f"{gguf.path}: no {type(model).__name__} parameter for {', '.join(unplaced[:5])}; only dense models of "
            "architectures transformers reads from GGUF can be exported"
        )
    return state


def _stored(name: str, weights: np.ndarray[Any, Any]) -> torch.Tensor:
    """Matrices in F16, 1-D tensors in F32 (see the module docstring)."""
    values = torch.from_numpy(np.array(weights, dtype=np.float32))  # a copy: never a view of the memory map
    if values.ndim < 2:
        return values
    half = values.to(WEIGHT_DTYPE)
    if not bool(torch.isfinite(half).all()):
        raise DynqError(f"{name}: values beyond the F16 range ({float(values.abs().max()):.4g}); cannot store as F16")
    return half


# --- tokenizer ---


def _write_tokenizer(gguf: GGUFModel, folder: Path, config: Any) -> None:
    """The tokenizer as transformers builds it from the GGUF, with two fixes so that llama.cpp's converter gives
    back the GGUF's own vocabulary:

    - transformers makes every added token `special`, which the converter writes as CONTROL; the GGUF says which
      are USER_DEFINED (Qwen2.5's `<tool_call>`, `</tool_call>`), and those get `special: false`;
    - the GGUF's UNUSED padding rows (`[PAD151665]`..., the converter's own filler up to the embedding size) become
      ordinary vocabulary entries in transformers' tokenizer, which the converter would write as NORMAL tokens;
      they are dropped, so the converter pads them again as UNUSED (config.json's vocab_size keeps the rows).

    The chat template goes into tokenizer_config.json, as in the original Qwen2.5 repositories, and so do
    `add_bos_token`/`add_eos_token` from the GGUF (the converter reads them from that file).
    """
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    # the model type's tokenizer class, not AutoTokenizer: that would parse the whole GGUF again for the config
    found: Any = TOKENIZER_MAPPING.get(type(config), None)
    if isinstance(found, tuple):  # (slow, fast) in older mappings: the fast one
        found = next((c for c in reversed(found) if c is not None), None)
    tokenizer_class: Any = found or AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    if context := getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = int(context)
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)

    types = [int(t) for t in gguf.field("tokenizer.ggml.token_type")]
    tokens = [str(t) for t in gguf.field("tokenizer.ggml.tokens")]
    unused = {tokens[i] for i, t in enumerate(types) if t == TokenType.UNUSED}
    control = {tokens[i] for i, t in enumerate(types) if t == TokenType.CONTROL}

    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    data["model"]["vocab"] = {k: v for k, v in vocab.items() if k not in unused}
    data["added_tokens"] = [t | {"special": t["content"] in control} for t in data["added_tokens"]
                            if t["content"] not in unused]  # fmt: skip
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")  # 5 MB, not 11 MB indented

    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    for key in ("add_bos_token", "add_eos_token"):
        if (value := gguf.field(f"tokenizer.ggml.{key}")) is not None:
            settings[key] = bool(value)
    for key in ("is_local", "local_files_only"):  # where this copy was loaded from, not part of the tokenizer
        settings.pop(key, None)
    path.write_text(json.dumps(settings, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    log.info("%s: tokenizer of %d tokens (%d padding rows dropped) in %s", gguf.path, len(tokens) - len(unused),
             len(unused), folder)  # fmt: skip


# --- files ---


def _check_target(gguf_path: Path, out_dir: Path) -> None:
    """Say before any work that the source is missing or the target is taken."""
    if not gguf_path.is_file():
        raise DynqError(f"{gguf_path}: no such GGUF file")
    if not out_dir.parent.is_dir():
        raise DynqError(f"{out_dir}: the output directory {out_dir.parent} does not exist; create it first")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DynqError(f"{out_dir}: already exists; give a new folder")


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` (same file system) that becomes `out_dir` when the block succeeds and
    is removed when it fails."""
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()  # not mkdtemp: the folder gets the umask's permissions, as the files in it should
    try:
        yield staging
        _plain_permissions(staging)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty: checked before the work began
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _plain_permissions(folder: Path) -> None:
    """Give every file the mode a newly created file gets: safetensors writes its shards owner-only (0600)."""
    probe = folder / ".mode"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers draws progress bars on stderr while saving; a library call does not draw on the terminal."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
