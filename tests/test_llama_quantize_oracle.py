"""What dynq takes from llama.cpp's rules, asked of llama.cpp itself rather than of literals copied from its source:
the types the built llama-quantize refuses without an imatrix, its fallback for a row length a type's block does not
divide (every type at several widths), and a plan's `--llama-args` command run through the real llama-quantize: the
same tensors, byte for byte, as dynq's own quantize of that plan."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import dynq
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.core.qtypes import IMATRIX_REQUIRED, fallback_for, quantizable_qtypes
from dynq.gguf_io.imatrix import write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import TINY_LLAMA, write_random, write_synthetic
from dynq.llamacpp.tools import tool
from dynq.paths import cache_dir
from dynq.recipe.llama_args import llama_quantize_command
from dynq.sources.shapes import dense_tensors
from runs import TWO_THREADS

TYPES = [t.name for t in quantizable_qtypes()]
pytestmark = pytest.mark.model  # builds llama.cpp's tools once (the sdist from the package registry, a compiler)
ROWS = (96, 100, 128, 512, 576, 896)  # a 256-block fits, 32-blocks fit, nothing fits, 256 and 128 widths


@pytest.fixture(scope="module")
def llama_quantize() -> Path:
    dynq.build_tools()  # from the pinned sdist, cached (the tests' one build step; the library never builds)
    return tool("llama-quantize", cache_dir())


def run_tool(binary: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=300)


def stored_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def importance_for(model: Path, out: Path) -> Path:
    rng = np.random.default_rng(5)
    entries = {}
    for t in GGUFModel(model).inventory().tensors:
        if len(t.shape) >= 2:
            n_mat = t.shape[2] if len(t.shape) == 3 else 1
            entries[t.name] = ImatrixEntry(1 + rng.random((n_mat, t.row_length), dtype=np.float32),
                                           np.full(n_mat, 64, np.float32))  # fmt: skip
    write_imatrix_gguf(Imatrix(entries, ["oracle"], 1, 64), out)
    return out


@pytest.fixture(scope="module")
def widths(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path]]:
    """A one-block llama per row length (every block matrix's rows that long), with an imatrix."""
    folder = tmp_path_factory.mktemp("widths")
    made = {}
    for row in ROWS:
        config = dataclasses.replace(TINY_LLAMA, n_layer=1, n_embd=row, n_ff=row, n_head=2, n_head_kv=2)
        model = write_random(folder / f"w{row}.gguf", "llama", *dense_tensors(config))
        made[row] = model, importance_for(model, folder / f"w{row}.imatrix.gguf")
    return made


def every_block_matrix_at(binary: Path, model: Path, out: Path, qtype: str,
                          *imatrix: str | Path) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """llama-quantize with every block matrix overridden to `qtype` (the rest Q8_0), on one thread."""
    return run_tool(binary, "--allow-requantize", *imatrix, "--tensor-type", rf"blk\.={qtype.lower()}", model, out,
                    "Q8_0", "1")  # fmt: skip


def test_the_types_llama_quantize_refuses_without_an_imatrix(llama_quantize: Path,
                                                             widths: dict[int, tuple[Path, Path]],
                                                             tmp_path: Path) -> None:  # fmt: skip
    model, _ = widths[512]
    refused = set()
    for name in TYPES:
        done = every_block_matrix_at(llama_quantize, model, tmp_path / f"{name}.gguf", name)
        if done.returncode != 0:
            assert "requires an importance matrix" in done.stderr + done.stdout, (name, done.stderr[-800:])
            refused.add(name)
    assert refused == IMATRIX_REQUIRED


def test_the_fallback_chain_is_llama_quantizes(llama_quantize: Path, widths: dict[int, tuple[Path, Path]],
                                               tmp_path: Path) -> None:  # fmt: skip
    theirs, ours = {}, {}
    for row, (model, imatrix) in widths.items():
        matrices = [t.name for t in GGUFModel(model).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        for first in range(0, len(TYPES), len(matrices)):  # one type per matrix, as many types a run as matrices
            asked = dict(zip(matrices, TYPES[first:], strict=False))
            overrides = [arg for name, typ in asked.items() for arg in ("--tensor-type", f"^{re.escape(name)}$={typ}")]
            out = tmp_path / f"{row}-{first}.gguf"
            done = run_tool(llama_quantize, "--allow-requantize", "--imatrix", imatrix, *overrides, model, out, "Q8_0",
                            "1")  # fmt: skip
            assert done.returncode == 0, (row, asked, done.stderr[-800:])
            stored = stored_types(out)
            for name, typ in asked.items():
                theirs[(row, typ)] = stored[name]
                ours[(row, typ)] = fallback_for(dynq.qtype(typ), row).name
            out.unlink()
    assert len(ours) == len(ROWS) * len(TYPES)
    assert ours == theirs


def test_llama_args_through_the_real_llama_quantize_give_dynqs_bytes(llama_quantize: Path, tmp_path: Path) -> None:
    model = write_synthetic("deepseek2", tmp_path / "tiny-deepseek2.gguf")
    imatrix = importance_for(model, tmp_path / "imatrix.gguf")
    plan = dynq.plan(model, "dyn-iq1_s")
    ours = dynq.quantize(plan, tmp_path / "ours.gguf", imatrix=imatrix, ctx=TWO_THREADS).files[0]
    command = shlex.split(llama_quantize_command(plan, str(model), str(tmp_path / "theirs.gguf"), str(imatrix),
                                                 requantize=True))  # fmt: skip
    assert command[0] == "llama-quantize"
    done = run_tool(llama_quantize, *command[1:], "2")
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = GGUFModel(ours), GGUFModel(tmp_path / "theirs.gguf")
    assert stored_types(ours) == stored_types(tmp_path / "theirs.gguf")
    different = [t.name for t in a.tensors if not np.array_equal(a.raw(t.name), b.raw(t.name))]
    assert different == [], different
    assert re.search(r"--tensor-type", " ".join(command))
