from __future__ import annotations

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dynq.core.qtypes import IMATRIX_ASSERTED, IMATRIX_REQUIRED, all_qtypes, qtype, quantizable_qtypes
from dynq.errors import DynqError
from dynq.kernels.ggml import ggml_library


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


def test_the_types_ggml_asserts_on_without_an_imatrix_are_libggmls() -> None:
    """Asked of libggml; llama-quantize's own refusals and fallbacks: tests/test_llama_quantize_oracle.py."""
    lib = ggml_library()
    asked = {t.name for t in quantizable_qtypes() if lib.ggml_quantize_requires_imatrix(int(t.ggml))}
    assert asked == IMATRIX_ASSERTED
    assert {t.name for t in all_qtypes() if t.imatrix_asserted} == IMATRIX_ASSERTED <= IMATRIX_REQUIRED


def test_nbytes() -> None:
    assert qtype("IQ1_S").nbytes((7168, 2048, 256)) == 7168 // 256 * 50 * 2048 * 256
    with pytest.raises(DynqError, match="not a multiple"):
        qtype("Q4_K").row_bytes(100)
