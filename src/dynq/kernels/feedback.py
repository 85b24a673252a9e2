"""Error-feedback encoding (GPTQ / OBQ) into the GGUF types, around any block encoder.

A layer computes y = W x; the error its quantized weights make on calibration inputs X is
tr((W − Q) H (W − Q)ᵀ) with H = Σ x xᵀ, the Gram matrix of its inputs. Rounding each block on its own (every
encoder in llama.cpp) ignores H's off-diagonal part. Here columns are taken in GGUF block order; each window of
256 columns (a K-quant super-block, eight 32-blocks) is encoded by the block encoder (llama.cpp's or dynq's torch
encoders) from the weights as updated so far, which fixes its scales; then column by column each element is
rounded on the grid those scales give (code_layout.py), and its error, divided by the diagonal of the Cholesky
factor U of H⁻¹, is handed to the columns not yet rounded through U's row. Types whose codes name groups of
elements (the IQ1/IQ2/IQ3 lattices) keep the block encoder's codes and hand their errors on the same way.

The output is ordinary GGUF of the same type. With a diagonal H no error reaches another column, every element
keeps the block encoder's code, and the bytes are the plain encoder's.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import numpy.typing as npt
import torch

from dynq.core.arrays import F32Array, U8Array
from dynq.core.qtypes import QType
from dynq.errors import DynqError
from dynq.kernels import KernelBackend
from dynq.kernels.code_layout import CodeLayout, affine_grid, code_layout, decode

# H + DAMP · mean(diag H) · I. GPTQ uses 0.01; from some 16k calibration tokens a stronger dampening carries better
# to text the Gram pass never saw (on held-out calibration chunks of qwen2.5-coder-1.5b's block 10 at Q2_K, 0.3 gave
# the lowest output error of the values tried).
DEFAULT_DAMP = 0.3
WINDOW = 256  # columns encoded together: one K-quant super-block, eight 32-element blocks
# Bumped whenever the bytes the feedback encoder writes for the same inputs change (keys caches and resumes).
FEEDBACK_VERSION = 1


def inverse_factor(gram: npt.NDArray[np.floating], damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """U, upper triangular with UᵀU = (H + damp·mean(diag H)·I)⁻¹, in float64.

    From one Cholesky factor of H with its order reversed: J H J = L Lᵀ gives H⁻¹ = UᵀU with U = J L⁻¹ J."""
    h = torch.from_numpy(np.array(gram, dtype=np.float64))
    if not torch.isfinite(h).all():
        raise DynqError("its Gram matrix holds NaN or Inf; collect the Gram file again")
    diag = torch.diagonal(h)
    if (diag < 0).any():
        raise DynqError("its Gram matrix has a negative diagonal, so it is no Gram matrix; collect the Gram file again")
    dead = diag == 0
    diag[dead] = 1.0  # inputs that were always zero: any weight there is free, as GPTQ treats them
    mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    diag += damp * mean
    reversed_h = torch.flip(h, (0, 1))
    factor, info = torch.linalg.cholesky_ex(reversed_h)
    if int(info) != 0:
        raise DynqError("its Gram matrix is not positive definite after dampening; collect the Gram file again")
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    return torch.flip(torch.linalg.solve_triangular(factor, eye, upper=False), (0, 1))


@cache
def _window_independent(backend: str, name: str) -> bool:
    """Whether the block encoder's bytes for a window depend on that window's columns alone. llama.cpp's legacy
    types with an imatrix weigh by the whole row's mean square (sigma2), so they are encoded whole row at a time."""
    from dynq.core.qtypes import qtype
    from dynq.kernels import get_backend

    t = qtype(name)
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((4, 2 * WINDOW)).astype(np.float32) * rng.uniform(0.1, 3, (4, 1)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, 2 * WINDOW).astype(np.float32)
    kernels = get_backend(backend, 1)
    whole = kernels.encode(t, rows, importance)
    part = kernels.encode(t, np.ascontiguousarray(rows[:, :WINDOW]), importance[:WINDOW])
    return bool(np.array_equal(whole[:, : part.shape[1]], part))


class _Window:
    """One window's grid, transposed to [columns, rows] so that the column loop reads contiguous memory."""

    def __init__(self, t: QType, layout: CodeLayout | None, data: U8Array) -> None:
        self.layout, self.data = layout, data
        if layout is None:
            self.fixed = torch.from_numpy(decode(data, t).T.copy())
            return
        self.codes = torch.from_numpy(layout.read_codes(data).T.copy())
        self.lo, self.hi = layout.code_range
        if layout.affine:
            base, step = affine_grid(layout, data)
            self.base, self.step = torch.from_numpy(base.T.copy()), torch.from_numpy(step.T.copy())
        else:
            self.table = torch.from_numpy(layout.levels(data).transpose(1, 0, 2).copy())  # [win, n, L]

    def round(self, j: int, column: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """Column j's values: its elements that errors moved on the grid's nearest level, the others kept."""
        if self.layout is None:
            return self.fixed[j]
        if self.layout.affine:
            step = self.step[j]
            live = moved & (step != 0)
            safe = torch.where(step != 0, step, torch.ones_like(step))
            nearest = torch.round((column - self.base[j]) / safe).clamp_(self.lo, self.hi).to(torch.int32)
            codes = torch.where(live, nearest, self.codes[j])
            self.codes[j] = codes
            return self.base[j] + step * codes
        levels = self.table[j]  # [n, L]
        nearest = (levels - column[:, None]).abs_().argmin(dim=1).to(torch.int32) + self.lo
        codes = torch.where(moved, nearest, self.codes[j])
        self.codes[j] = codes
        return levels.gather(1, (codes - self.lo).long()[:, None])[:, 0]

    def encoded(self) -> U8Array:
        if self.layout is None:
            return self.data
        return self.layout.write_codes(self.data, self.codes.T.contiguous().numpy())


def encode_rows(
    backend: KernelBackend, t: QType, rows: F32Array, importance: F32Array | None,
    gram: npt.NDArray[np.floating] | None,
) -> U8Array:  # fmt: skip
    """`backend`'s encode, with error feedback through `gram` when there is one (on the backend's threads)."""
    if gram is None:
        return backend.encode(t, rows, importance)
    return encode_with_feedback(t, rows, importance, gram, backend, threads=backend.threads)


def encode_with_feedback(
    t: QType, rows: F32Array, importance: F32Array | None, gram: npt.NDArray[np.floating], inner: KernelBackend,
    *, threads: int = 1, damp: float = DEFAULT_DAMP, factor: torch.Tensor | None = None,
) -> U8Array:  # fmt: skip
    """Encode `rows` [n, k] to `t` with error feedback through `gram` [k, k] (the Gram matrix of the layer's inputs),
    each window's scales chosen by `inner` with `importance`. `factor` is `inverse_factor(gram, damp)` when the
    caller encodes the same matrix at several types."""
    n, k = rows.shape
    if gram.shape != (k, k):
        raise DynqError(f"its Gram matrix is {gram.shape[0]}×{gram.shape[1]} but its rows have {k} columns; "
                        "use the Gram file of this model")  # fmt: skip
    if k % t.block_size:
        raise DynqError(f"{t.name} needs rows that are a multiple of {t.block_size}, got {k}")
    layout = code_layout(t.name)
    whole_rows = not _window_independent(inner.name, t.name)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))  # process-wide: set for this call, given back after
    try:
        u = (factor if factor is not None else inverse_factor(gram, damp)).to(torch.float32)
        columns = torch.from_numpy(np.ascontiguousarray(rows.T, dtype=np.float32))  # [k, n]: column j is row j
        original = columns.clone()
        out = np.empty((n, t.row_bytes(k)), dtype=np.uint8)
        bytes_per_column = t.type_size / t.block_size
        for w0 in range(0, k, WINDOW):
            w1 = min(w0 + WINDOW, k)
            b0, b1 = int(w0 * bytes_per_column), int(w1 * bytes_per_column)
            if whole_rows:
                current = np.ascontiguousarray(columns.T.numpy())
                data = inner.encode(t, current, importance)[:, b0:b1]
            else:
                part = np.ascontiguousarray(columns[w0:w1].T.numpy())
                data = inner.encode(t, part, None if importance is None else importance[w0:w1])
            window = _Window(t, layout, np.ascontiguousarray(data))
            errors = torch.empty((w1 - w0, n), dtype=torch.float32)
            for j in range(w0, w1):
                column = columns[j]
                values = window.round(j - w0, column, column != original[j])
                err = (column - values) / u[j, j]
                errors[j - w0] = err
                if j + 1 < w1:
                    columns[j + 1 : w1].addr_(u[j, j + 1 : w1], err, alpha=-1.0)
            if w1 < k:
                columns[w1:].addmm_(u[w0:w1, w1:].T, errors, alpha=-1.0)
            out[:, b0:b1] = window.encoded()
        return out
    finally:
        torch.set_num_threads(previous)
