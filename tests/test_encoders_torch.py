"""dynq's torch encoders on the CPU: every type, exact bytes, llama.cpp's validity checks, error against ggml's."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

import dynq
from dynq.calib.collector import collect_imatrix
from dynq.core.qtypes import qtype
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels.compare import compare, decode, weighted_error
from dynq.kernels.encoders import encoders, iq1, iq2
from dynq.kernels.ggml import GgmlBackend, ggml_library
from dynq.kernels.torch_backend import TorchBackend

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
         "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")  # fmt: skip
# The bar: never more than 1% worse than llama.cpp's own encoder on the same rows.
MAX_RATIO = 1.01


@pytest.fixture(scope="module")
def ggml() -> GgmlBackend:
    return GgmlBackend(threads=2)


@pytest.fixture(scope="module")
def mine() -> TorchBackend:
    return TorchBackend("cpu", threads=2)


def random_rows(seed: int, n: int = 16, k: int = 512) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, k)).astype(np.float32)
    rows[rng.random((n, k)) < 0.01] *= 8.0  # the outliers real weights have
    importance = rng.gamma(0.5, 1.0, k).astype(np.float32)  # heavy-tailed, like activations' mean x²
    return rows, importance


def check_exact(name: str, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Encode with the torch encoder; its `values` must be exactly what gguf-py decodes and valid for llama.cpp."""
    t = qtype(name)
    imp = None if importance is None else torch.from_numpy(importance)
    encoded = encoders()[name](torch.from_numpy(rows), imp)
    data = encoded.data.numpy()
    assert data.shape == (rows.shape[0], t.row_bytes(rows.shape[1])) and data.dtype == np.uint8
    np.testing.assert_array_equal(decode(t, data, rows.shape[1]), encoded.values.numpy())
    assert ggml_library().ggml_validate_row_data(int(t.ggml.value), data.ctypes.data, data.nbytes), name
    return data


def test_every_type_has_a_torch_encoder() -> None:
    assert set(encoders()) == set(TYPES)


@pytest.mark.parametrize("name", TYPES)
def test_random_rows_exact_and_no_worse_than_ggml(name: str, ggml: GgmlBackend, mine: TorchBackend) -> None:
    rows, importance = random_rows(1)
    check_exact(name, rows, importance)
    result = compare(qtype(name), rows, importance, mine, ggml)
    assert result.ratio <= MAX_RATIO, (name, result.ratio)


@pytest.mark.parametrize("name", TYPES)
def test_without_imatrix(name: str, ggml: GgmlBackend, mine: TorchBackend) -> None:
    rows, _ = random_rows(2)
    check_exact(name, rows, None)
    result = compare(qtype(name), rows, None, mine, ggml)
    assert result.ratio <= MAX_RATIO, (name, result.ratio)


@pytest.mark.parametrize("name", TYPES)
def test_edge_cases_stay_finite(name: str) -> None:
    k = 512
    rows = np.zeros((6, k), dtype=np.float32)
    rows[1] = 0.5  # constant
    rows[2, 3] = -2.0  # one value in a block of zeros
    rows[3] = np.random.default_rng(3).standard_normal(k) * 1e-20  # vanishing
    rows[4] = np.random.default_rng(4).standard_normal(k) * 1e3  # large
    rows[5, ::2] = 1.0  # half the columns
    importance = np.random.default_rng(5).random(k).astype(np.float32)
    importance[:64] = 0.0  # columns never activated
    data = check_exact(name, rows, importance)
    decoded = decode(qtype(name), data, k)
    assert np.isfinite(decoded).all()
    assert np.abs(decoded[0]).max() <= np.abs(decode(qtype(name), GgmlBackend(1).encode(qtype(name), rows[:1],
                                                                              importance), k)).max()  # fmt: skip


@pytest.mark.parametrize("name", ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"))
def test_accelerator_branches_on_the_cpu(
    name: str, ggml: GgmlBackend, mine: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the lattice searches mask instead of gathering the groups that need work (no host sync); the same
    code, forced here, must give exact bytes and an error no worse than ggml's."""
    monkeypatch.setattr(iq1, "gathers_groups", lambda device: False)
    monkeypatch.setattr(iq2, "_compacts", lambda t: False)
    rows, importance = random_rows(7)
    check_exact(name, rows, importance)
    result = compare(qtype(name), rows, importance, mine, ggml)
    assert result.ratio <= MAX_RATIO, (name, result.ratio)


@cache
def real_rows() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Rows of zoo:qwen2.5-coder-0.5b's down projections (row length 4864, fits every block size) with an imatrix
    collected on a little text."""
    path = dynq.fetch("zoo:qwen2.5-coder-0.5b")
    text = " ".join(f"def f{i}(x):\n    return x * {i} + len(str(x))\n" for i in range(200))
    imx = collect_imatrix(path, text, ["t"], n_ctx=128, n_chunks=2, ctx=dynq.RunContext(threads=2))
    model = GGUFModel(path)
    out = []
    for layer in (0, 11, 23):
        name = f"blk.{layer}.ffn_down.weight"
        values = model.load(name)
        out.append((name, values[:: values.shape[0] // 12][:12].copy(), imx.entries[name].importance()[0]))
    return out


@pytest.mark.model
@pytest.mark.parametrize("name", TYPES)
def test_real_rows_no_worse_than_ggml(name: str, ggml: GgmlBackend, mine: TorchBackend) -> None:
    t = qtype(name)
    err = err_ggml = 0.0
    for _, rows, importance in real_rows():
        check_exact(name, rows, importance)
        err += weighted_error(rows, decode(t, mine.encode(t, rows, importance), rows.shape[1]), importance)
        err_ggml += weighted_error(rows, decode(t, ggml.encode(t, rows, importance), rows.shape[1]), importance)
    assert err <= MAX_RATIO * err_ggml, (name, err / err_ggml)


def test_backend_batches_rows_and_falls_back_for_other_types(mine: TorchBackend, ggml: GgmlBackend) -> None:
    rows, importance = random_rows(6, n=40, k=256)
    whole = mine.encode(qtype("Q4_K"), rows, importance)
    halves = np.concatenate([mine.encode(qtype("Q4_K"), rows[:20], importance),
                             mine.encode(qtype("Q4_K"), rows[20:], importance)])  # fmt: skip
    np.testing.assert_array_equal(whole, halves)
    mx = qtype("MXFP4")  # not one of dynq's encoders: llama.cpp's encodes it
    np.testing.assert_array_equal(mine.encode(mx, rows, None), ggml.encode(mx, rows, None))
