"""The ggml backend: every quantizable type encodes, decodes with gguf, and lands within its error band."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import dequantize

from dynq.core.qtypes import qtype, quantizable_qtypes
from dynq.errors import DynqError
from dynq.kernels.ggml import GgmlBackend

# Relative RMS error on unit-normal rows with a random importance, measured with this llama.cpp, plus ~15% margin.
# TQ1_0/TQ2_0 are ternary formats meant for ternary-trained weights: on Gaussian data their error is large.
ERROR_BAND = {
    "Q8_0": 0.007, "Q6_K": 0.021, "Q5_1": 0.04, "Q5_K": 0.042, "Q5_0": 0.048, "Q4_1": 0.083, "Q4_K": 0.084,
    "IQ4_NL": 0.088, "IQ4_XS": 0.089, "Q4_0": 0.096, "MXFP4": 0.133, "IQ3_S": 0.168, "Q3_K": 0.17,
    "IQ3_XXS": 0.237, "IQ2_S": 0.305, "Q2_K": 0.32, "IQ2_XS": 0.378, "IQ2_XXS": 0.434, "IQ1_M": 0.566,
    "IQ1_S": 0.6, "TQ1_0": 0.83, "TQ2_0": 0.83,
}  # fmt: skip


@pytest.fixture(scope="module")
def backend() -> GgmlBackend:
    return GgmlBackend(threads=2)


def test_every_quantizable_type_has_a_band() -> None:
    assert set(ERROR_BAND) == {t.name for t in quantizable_qtypes()}


@pytest.mark.parametrize("name", sorted(ERROR_BAND))
def test_round_trip_within_band(backend: GgmlBackend, name: str) -> None:
    t = qtype(name)
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((64, 512)).astype(np.float32)
    importance = rng.random(512).astype(np.float32) + 0.1
    encoded = backend.encode(t, rows, importance)
    assert encoded.shape == (64, t.row_bytes(512)) and encoded.dtype == np.uint8
    decoded = dequantize(encoded, t.ggml).reshape(rows.shape)
    rel = float(np.sqrt(((decoded - rows) ** 2).mean() / (rows**2).mean()))
    assert rel < ERROR_BAND[name]


@pytest.mark.parametrize("name", ["Q4_K", "IQ2_XXS"])
def test_threads_split_rows_without_changing_bytes(backend: GgmlBackend, name: str) -> None:
    rows = np.random.default_rng(4).standard_normal((5000, 256)).astype(np.float32)  # several chunks
    importance = np.random.default_rng(5).random(256).astype(np.float32)
    t = qtype(name)
    np.testing.assert_array_equal(backend.encode(t, rows, importance), GgmlBackend(1).encode(t, rows, importance))


@pytest.mark.parametrize("name", ["IQ2_XXS", "Q2_K", "IQ1_S", "Q4_K"])
def test_importance_steers_the_error(backend: GgmlBackend, name: str) -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((128, 256)).astype(np.float32)
    importance = np.ones(256, np.float32)
    importance[::4] = 100.0  # every fourth column matters much more (within each block: scales are per block)
    t = qtype(name)
    weighted = dequantize(backend.encode(t, rows, importance), t.ggml).reshape(rows.shape)
    flat = dequantize(backend.encode(t, rows, np.ones(256, np.float32)), t.ggml).reshape(rows.shape)
    err_w = float(((weighted - rows)[:, ::4] ** 2).mean())
    err_f = float(((flat - rows)[:, ::4] ** 2).mean())
    assert err_w < 0.75 * err_f


def test_types_ggml_insists_on_an_imatrix_get_uniform_weights(backend: GgmlBackend) -> None:
    rows = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    for name in ("IQ1_S", "IQ2_XXS", "IQ2_XS"):
        assert backend.encode(qtype(name), rows, None).shape == (4, qtype(name).row_bytes(256))


def test_bad_shapes(backend: GgmlBackend) -> None:
    rows = np.zeros((2, 100), np.float32)
    with pytest.raises(DynqError, match="not a multiple"):
        backend.encode(qtype("Q4_K"), rows, None)
    with pytest.raises(DynqError, match="importance has 3 columns"):
        backend.encode(qtype("Q8_0"), np.zeros((2, 96), np.float32), np.ones(3, np.float32))
