from __future__ import annotations

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dynq.core.qtypes import all_qtypes, fallback_for, qtype, quantizable_qtypes
from dynq.errors import DynqError


def test_registry_sizes_match_gguf() -> None:
    assert len(all_qtypes()) == len(GGML_QUANT_SIZES)
    for t in all_qtypes():
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[t.ggml]
        assert t.bpw == pytest.approx(8 * t.type_size / t.block_size)


@pytest.mark.parametrize(
    ("name", "bpw"),
    [("IQ1_S", 1.5625), ("IQ1_M", 1.75), ("IQ2_XXS", 2.0625), ("Q2_K", 2.625), ("Q4_K", 4.5), ("Q6_K", 6.5625),
     ("Q8_0", 8.5), ("F16", 16.0), ("TQ1_0", 1.6875)],
)  # fmt: skip
def test_known_bpw(name: str, bpw: float) -> None:
    assert qtype(name).bpw == bpw


def test_every_quantizable_type_decodes_with_gguf() -> None:
    names = {t.name for t in quantizable_qtypes()}
    assert {"IQ1_S", "IQ1_M", "IQ2_XXS", "Q2_K", "Q4_K", "Q6_K", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"} <= names
    assert all(t.decodable for t in quantizable_qtypes())
    assert not qtype("Q8_K").quantizable


def test_lookup_by_name_and_number() -> None:
    assert qtype("iq1_s") is qtype("IQ1_S")
    assert qtype(GGMLQuantizationType.Q4_K).name == "Q4_K"
    assert qtype(12).name == "Q4_K"
    with pytest.raises(DynqError, match="unknown tensor type 'Q3_X'"):
        qtype("Q3_X")


def test_imatrix_requirements_follow_llama_cpp() -> None:
    required = {t.name for t in all_qtypes() if t.imatrix_required}
    assert required == {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}
    asserted = {t.name for t in all_qtypes() if t.imatrix_asserted}
    assert asserted == {"IQ1_S", "IQ2_XXS", "IQ2_XS"}


@pytest.mark.parametrize(
    ("target", "row", "expected"),
    [
        ("IQ1_S", 7168, "IQ1_S"),
        ("IQ1_S", 896, "IQ4_NL"),  # qwen2.5-0.5b hidden size
        ("IQ2_XXS", 128, "IQ4_NL"),  # deepseek attn_k_b
        ("Q2_K", 576, "Q4_0"),  # smollm2 hidden size
        ("TQ1_0", 576, "Q4_0"),
        ("Q4_K", 576, "Q5_0"),
        ("Q5_K", 576, "Q5_1"),
        ("Q6_K", 576, "Q8_0"),
        ("IQ1_S", 100, "F16"),  # not even a multiple of 32
        ("Q8_0", 100, "F16"),
        ("Q8_0", 96, "Q8_0"),
    ],
)
def test_fallback_chain(target: str, row: int, expected: str) -> None:
    assert fallback_for(qtype(target), row).name == expected


def test_nbytes() -> None:
    assert qtype("IQ1_S").nbytes((7168, 2048, 256)) == 7168 // 256 * 50 * 2048 * 256
    with pytest.raises(DynqError, match="not a multiple"):
        qtype("Q4_K").row_bytes(100)
