"""The IQ lattices: the grid points of the IQ1/IQ2/IQ3 types, from gguf-py's tables.

The order is the index order the files store. Each coordinate is a level index (0..n_levels-1), so a group rounded
level by level has a code, and `index_of_code` says whether that code is a grid point. (llama.cpp then falls back to
lists of nearby points; dynq's encoders search the grid exactly instead.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from gguf import quants

_SOURCES: dict[str, Any] = {  # type -> gguf-py class holding its grid
    "IQ2_XXS": quants.IQ2_XXS,
    "IQ2_XS": quants.IQ2_XS,
    "IQ2_S": quants.IQ2_S,
    "IQ3_XXS": quants.IQ3_XXS,
    "IQ3_S": quants.IQ3_S,
    "IQ1_S": quants.IQ1_S,
    "IQ1_M": quants.IQ1_S,
}


@dataclass(frozen=True)
class Lattice:
    levels: npt.NDArray[np.int64]  # [n_points, dim] level index of every coordinate
    values: npt.NDArray[np.float32]  # [n_points, dim] the value a decoder reads (gguf-py's grid_map)
    n_levels: int  # levels the quantizer rounds to: 3 for IQ1/IQ2, 8 for IQ3
    index_of_code: npt.NDArray[np.int64]  # [n_levels**dim] grid index of a code, -1 when off the grid

    @property
    def dim(self) -> int:
        return int(self.levels.shape[1])

    def code(self, levels: torch.Tensor) -> torch.Tensor:
        """Codes of level groups [..., dim] (int) -> [...]: Σ level_j · n_levels^j."""
        powers = self.n_levels ** torch.arange(self.dim, device=levels.device, dtype=torch.int64)
        return (levels.to(torch.int64) * powers).sum(dim=-1)


@cache
def lattice(type_name: str) -> Lattice:
    cls = _SOURCES[type_name]
    cls.init_grid()
    grid = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    grid_map = np.asarray(cls.grid_map, dtype=np.float32)
    levels = np.abs(grid[..., None] - grid_map).argmin(axis=-1).astype(np.int64)
    n_levels = 3 if type_name.startswith(("IQ1", "IQ2")) else 8
    powers = n_levels ** np.arange(grid.shape[1], dtype=np.int64)
    index_of_code = np.full(n_levels ** grid.shape[1], -1, dtype=np.int64)
    index_of_code[(levels * powers).sum(axis=1)] = np.arange(len(levels))
    return Lattice(levels, grid, n_levels, index_of_code)


@cache
def lattice_tensors(type_name: str, device: str) -> dict[str, torch.Tensor]:
    """The lattice's arrays as tensors on `device`: levels, values, index_of_code."""
    lat = lattice(type_name)
    return {
        "levels": torch.from_numpy(lat.levels).to(device),
        "values": torch.from_numpy(lat.values).to(device),
        "index_of_code": torch.from_numpy(lat.index_of_code).to(device),
    }
