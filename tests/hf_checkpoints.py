"""Tiny Hugging Face checkpoints of real architectures, written with transformers' own config and model classes, for
tests that drive llama.cpp's `convert_hf_to_gguf.py` and dynq's checkpoint source on the same directory.

Random weights from a fixed seed (norms and biases perturbed too, so a swapped or dropped vector shows), two
blocks, hidden size 64 and FFN rows of 256 (so the down projections take K-quants). The tokenizer is the real
Qwen2.5 one, exported once from the zoo GGUF and cached: the converter only accepts a tokenizer whose pre-tokenizer
hash it knows, so a made-up vocabulary would not do. Its 151,665 tokens sit in 151,936 embedding rows, as in
Qwen2.5 itself, which makes the embeddings and the output (2 x 19.4 MB in BF16) most of each checkpoint.

`tiny_deepseek_v3_fp8` stores its linear layers as DeepSeek-V3/R1 do: float8_e4m3fn weights with float32
`weight_scale_inv` per 128x128 block (the value is `weight.float() * scale_inv` of its block) and the
`quantization_config` that tells llama.cpp's converter to multiply them out.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dynq
from dynq.errors import DynqError
from dynq.lab.hf_export import export_tokenizer
from dynq.paths import cache_dir

TOKENIZER_SOURCE = "zoo:qwen2.5-coder-0.5b"  # the smallest zoo model with the Qwen2.5 tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB_ROWS = 151936  # Qwen2.5's embedding rows: its 151,665 tokens padded to a multiple of 128
BOS, EOS = 151643, 151645  # <|endoftext|>, <|im_end|>
SEED = 0

FP8_BLOCK = 128
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_CONFIG: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}  # DeepSeek-V3's config.json, verbatim
# The matrices DeepSeek-V3 stores in FP8: every projection of attention, the dense MLP, the routed and the shared
# experts. Not the router (`mlp.gate.weight`), the embeddings, the output, the norms or the router's bias.
FP8_WEIGHT = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(.+\.)?(gate_proj|up_proj|down_proj))"
    r"\.weight$"
)


@cache
def qwen_tokenizer() -> Path:
    """The folder of Qwen2.5 tokenizer files (tokenizer.json, tokenizer_config.json with the chat template),
    exported from the zoo GGUF on first use (about 40 s) and kept under the dynq cache."""
    folder = cache_dir() / "hf" / "qwen2.5-tokenizer-v1"  # v1: bump when the export changes what it writes
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            export_tokenizer(dynq.fetch(TOKENIZER_SOURCE), folder)
        except (DynqError, OSError):
            if not folder.is_dir():  # not another process that got there first
                raise
    return folder


def tiny_qwen2(out: Path, *, tie_embeddings: bool = False, shards: int = 1) -> Path:
    """A dense Qwen2ForCausalLM (Qwen2.5's layout: GQA with q/k/v biases) in BF16 safetensors; returns `out`.

    `tie_embeddings` leaves out lm_head as the small Qwen2.5 models do; `shards` > 1 splits the weights into that
    many files with a model.safetensors.index.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return _write(out, _build(Qwen2ForCausalLM, config), shards=shards)


def tiny_qwen2_moe(out: Path, *, shards: int = 1) -> Path:
    """A Qwen2MoeForCausalLM (Qwen1.5-MoE's layout): every block MoE with 8 routed experts (2 per token) of 256
    neurons and a gated shared expert of 512, in BF16 safetensors; returns `out`."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=256, moe_intermediate_size=256,
        shared_expert_intermediate_size=512, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        norm_topk_prob=False, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return _write(out, _build(Qwen2MoeForCausalLM, config), shards=shards)


def tiny_deepseek_v3_fp8(out: Path, *, shards: int = 1) -> Path:
    """A DeepseekV3ForCausalLM stored as DeepSeek-V3/R1 are: block 0 dense, block 1 MoE (8 routed experts in 4
    groups, 2 per token, sigmoid routing with a bias, 1 shared expert), MLA attention, YaRN RoPE; the linear layers
    in float8_e4m3fn with float32 `weight_scale_inv` of 128x128 blocks, the rest BF16 (the router's bias F32).

    Every matrix with the hidden size (64) as a side ends in one partial block; q_a_proj (192 rows), q_b_proj
    (192 columns) and kv_a_proj_with_mqa (160 rows) have a whole block and a partial one on a side, as
    DeepSeek-V3's kv_a_proj_with_mqa (576 rows) does. llama.cpp's converter crops the last block's scale;
    transformers 5.24's CPU dequantization gets those three wrong (it divides the side evenly among the blocks),
    so a transformers forward pass of this checkpoint differs from llama.cpp's of its conversion. Returns `out`."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=256, moe_intermediate_size=256,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=0, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
        scoring_func="sigmoid", topk_method="noaux_tc",  # as in DeepSeek-V3; the converter reads scoring_func
    )  # fmt: skip
    model = _build(DeepseekV3ForCausalLM, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        for module in model.modules():
            if isinstance(bias := getattr(module, "e_score_correction_bias", None), torch.Tensor):
                module.e_score_correction_bias = 0.01 * torch.randn(bias.shape, dtype=torch.float32)  # F32, as stored
    return _write(out, model, shards=shards, fp8=True)


def fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [rows, cols] as DeepSeek-V3 stores it: float8_e4m3fn values and the float32 `weight_scale_inv`
    [ceil(rows/128), ceil(cols/128)] that they are multiplied by, each block's largest value mapped to 448."""
    rows, cols = weight.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, FP8_BLOCK, bc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(br * FP8_BLOCK, bc * FP8_BLOCK)
    return scaled[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale


def fp8_dequantized(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """What an FP8 weight stands for, computed as llama.cpp's converter computes it (float32)."""
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return weight.float() * scale[: weight.shape[0], : weight.shape[1]]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, single file or shards, as stored."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    return tensors


# --- writing ---


def _build(model_class: Any, config: Any) -> Any:
    """The model with transformers' own random initialisation from `SEED` (the caller's random state is left as it
    was), vectors perturbed around their initial values (norms of exactly 1, biases of 0 would hide mix-ups), and
    cast to BF16 as the real checkpoints are stored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim == 1:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    return model.to(torch.bfloat16)


def _write(out: Path, model: Any, *, shards: int, fp8: bool = False) -> Path:
    """`save_pretrained` into `out` (config.json, generation_config.json, model.safetensors), the Qwen2.5 tokenizer
    files beside them, then the weights stored in FP8 and/or split into shards as asked."""
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder")
    tokenizer = qwen_tokenizer()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, out / name)
    if fp8:
        config_path = out / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = FP8_CONFIG
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if fp8 or shards > 1:
        tensors = read_weights(out)
        (out / "model.safetensors").unlink()
        _save(out, _to_fp8(tensors) if fp8 else tensors, shards)
    return out


def _to_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each FP8 layer's weight replaced by its float8_e4m3fn values, followed by its `weight_scale_inv`."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if FP8_WEIGHT.search(name) and tensor.ndim == 2:
            stored[name], stored[f"{name}_scale_inv"] = fp8_blocks(tensor)
        else:
            stored[name] = tensor
    return stored


def _natural(name: str) -> list[Any]:
    """Sort key: layer 10 after layer 9, as the shards of a real checkpoint run."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _save(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """model.safetensors, or `shards` files of about equal size in layer order with the index transformers and
    the converter read (model-00001-of-00002.safetensors, ..., model.safetensors.index.json)."""
    names = sorted(tensors, key=_natural)
    if shards <= 1:
        save_file({n: tensors[n] for n in names}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total, groups, current, done = sum(sizes), [], [], 0
    for name, size in zip(names, sizes, strict=True):
        current.append(name)
        done += size
        if done >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    if len(groups) != shards or not all(groups):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, file)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
