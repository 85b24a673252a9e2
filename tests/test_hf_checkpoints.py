"""The tiny Hugging Face checkpoints the converter tests are built on (tests/hf_checkpoints.py), and the export of a
zoo GGUF as a checkpoint (dynq.lab.hf_export): what they hold, and that transformers reads them back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dynq.errors import DynqError
from dynq.lab.hf_export import export_checkpoint
from hf_checkpoints import (
    FP8_BLOCK,
    FP8_CONFIG,
    FP8_MAX,
    FP8_WEIGHT,
    VOCAB_ROWS,
    fp8_dequantized,
    read_weights,
    tiny_deepseek_v3_fp8,
    tiny_qwen2,
    tiny_qwen2_moe,
)

MAKERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "qwen2": (tiny_qwen2, "Qwen2ForCausalLM"),
    "qwen2moe": (tiny_qwen2_moe, "Qwen2MoeForCausalLM"),
    "deepseek-v3-fp8": (tiny_deepseek_v3_fp8, "DeepseekV3ForCausalLM"),
}
N_TOKENS = 151665  # Qwen2.5's tokenizer, without the padding rows


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_deepseek_v3_fp8(tmp_path_factory.mktemp("ds") / "hf")


@pytest.mark.model
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_transformers_loads_each_checkpoint(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make, architecture = MAKERS[kind]
    directory = make(tmp_path / "hf")
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert weights < 42e6  # the two 151,936 x 64 BF16 matrices (embeddings, output) are 38.9 MB of it
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == architecture
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == VOCAB_ROWS
    assert len(tokenizer) == N_TOKENS and tokenizer.chat_template
    ids = tokenizer("def quicksort(items):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_ROWS) and bool(torch.isfinite(logits).all())


@pytest.mark.model
def test_checkpoints_are_reproducible_and_shard_on_request(tmp_path: Path) -> None:
    one, again = tiny_qwen2(tmp_path / "one"), tiny_qwen2(tmp_path / "again")
    assert (one / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    split = tiny_qwen2(tmp_path / "split", shards=2)
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]  # fmt: skip
    whole, parts = read_weights(one), read_weights(split)
    assert whole.keys() == parts.keys() == index["weight_map"].keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert "lm_head.weight" in whole
    assert "lm_head.weight" not in read_weights(tiny_qwen2(tmp_path / "tied", tie_embeddings=True))


@pytest.mark.model
def test_qwen2_moe_has_routed_and_shared_experts(tmp_path: Path) -> None:
    weights = read_weights(tiny_qwen2_moe(tmp_path / "hf"))
    for b in (0, 1):
        p = f"model.layers.{b}.mlp."
        assert weights[p + "gate.weight"].shape == (8, 64)
        assert all(weights[f"{p}experts.{e}.down_proj.weight"].shape == (64, 256) for e in range(8))
        assert weights[p + "shared_expert.down_proj.weight"].shape == (64, 512)
        assert weights[p + "shared_expert_gate.weight"].shape == (1, 64)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


@pytest.mark.model
def test_deepseek_v3_stores_fp8_as_deepseek_does(deepseek: Path) -> None:
    config = json.loads((deepseek / "config.json").read_text())
    assert config["quantization_config"] == FP8_CONFIG and config["first_k_dense_replace"] == 1
    weights = read_weights(deepseek)
    fp8 = sorted(n for n in weights if FP8_WEIGHT.search(n))
    assert "model.layers.0.mlp.down_proj.weight" in fp8  # the dense block
    assert {f"model.layers.1.mlp.{e}.up_proj.weight" for e in ("experts.7", "shared_experts")} < set(fp8)
    assert len(fp8) == 2 * 5 + 3 + 3 * (8 + 1)  # attention x 2 blocks, dense MLP, routed and shared experts
    for name in fp8:
        weight, scale = weights[name], weights[f"{name}_scale_inv"]
        rows, cols = weight.shape
        assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert scale.shape == (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        # scale_inv multiplies: each block's largest value is stored as 448
        blocks = fp8_dequantized(weight, scale).abs()
        top = torch.stack([blocks[i : i + FP8_BLOCK, j : j + FP8_BLOCK].max()
                           for i in range(0, rows, FP8_BLOCK) for j in range(0, cols, FP8_BLOCK)])  # fmt: skip
        torch.testing.assert_close(top, scale.flatten() * FP8_MAX)
    scaled = {n.removesuffix("_scale_inv") for n in weights if n.endswith("_scale_inv")}
    assert scaled == set(fp8)
    # some blocks are partial in a dimension of several blocks, as DeepSeek-V3's kv_a_proj_with_mqa (576 rows) is
    assert weights["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (160, 64)
    others = {n: t.dtype for n, t in weights.items() if n not in scaled and not n.endswith("_scale_inv")}
    assert others.pop("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32
    assert set(others.values()) == {torch.bfloat16}
    assert "model.layers.1.mlp.gate.weight" in others and "lm_head.weight" in others


@pytest.mark.model
def test_transformers_dequantizes_the_whole_fp8_blocks(deepseek: Path) -> None:
    """transformers (CPU: dequantized on load) reads the FP8 weights as weight * scale_inv, rounded to BF16, where
    each side is whole blocks or one block. Not where a side has several blocks and a partial one (q_a_proj's 192
    rows): transformers 5.24 divides the side evenly by the number of blocks (96 rows a block) and scales those
    wrongly; llama.cpp's converter, the reference here, crops the last block instead."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(deepseek)
    loaded = model.state_dict()
    weights = read_weights(deepseek)
    checked = 0
    for name in weights:
        if not FP8_WEIGHT.search(name) or name not in loaded:  # routed experts are fused into one tensor on load
            continue
        if all(side % FP8_BLOCK == 0 or side < FP8_BLOCK for side in weights[name].shape):
            want = fp8_dequantized(weights[name], weights[f"{name}_scale_inv"]).to(loaded[name].dtype)
            assert torch.equal(loaded[name], want), name
            checked += 1
    assert checked >= 10


def test_export_refuses_a_taken_folder(tiny_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(DynqError, match="already exists"):
        export_checkpoint(tiny_gguf, tmp_path / "taken")
    with pytest.raises(DynqError, match="no such GGUF"):
        export_checkpoint(tmp_path / "missing.gguf", tmp_path / "new")
    with pytest.raises(DynqError, match="does not exist"):
        export_checkpoint(tiny_gguf, tmp_path / "no" / "such" / "folder")


@pytest.mark.model
@pytest.mark.slow
def test_export_keeps_the_first_blocks_of_a_zoo_model(tmp_path: Path) -> None:
    """Two blocks of Qwen2.5-Coder-0.5B, sharded: F16 matrices equal to the GGUF's dequantized values rounded to
    F16, F32 vectors equal to them, and a checkpoint transformers loads."""
    from transformers import AutoModelForCausalLM

    import dynq
    from dynq.gguf_io.reader import GGUFModel

    source = dynq.fetch("zoo:qwen2.5-coder-0.5b")
    out = export_checkpoint(source, tmp_path / "hf", blocks=2, max_shard_size="300MB")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["rms_norm_eps"] == 1e-6 and config["dtype"] == "float16"
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 2 * 12 + 3
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    weights = read_weights(out)
    gguf = GGUFModel(source)
    pairs = {"model.embed_tokens.weight": "token_embd.weight", "model.layers.1.mlp.down_proj.weight":
             "blk.1.ffn_down.weight", "model.layers.1.self_attn.q_proj.bias": "blk.1.attn_q.bias"}  # fmt: skip
    for hf, name in pairs.items():
        values = gguf.load(name)
        stored = weights[hf]
        assert stored.dtype == (torch.float16 if values.ndim == 2 else torch.float32)
        np.testing.assert_array_equal(stored.numpy(), values.astype(stored.numpy().dtype))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and len(model.model.layers) == 2
