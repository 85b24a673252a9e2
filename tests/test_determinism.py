"""The same inputs give the same bytes: across runs, thread counts and processes, for llama.cpp's encoders (ggml) and
for dynq's torch encoders on the CPU; the file records which encoders wrote it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dynq
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.gguf_io.imatrix import write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic

# every family of encoder: 1-bit and 2-bit grids, K-quants, IQ4, legacy, floats
RECIPE = {
    "name": "every-encoder",
    "rules": [
        {"match": "ffn_gate_exps", "type": "IQ1_S"},
        {"match": "ffn_up_exps", "type": "IQ2_XXS"},
        {"match": "ffn_down_exps", "type": "IQ1_M"},
        {"match": "attn_output", "type": "IQ3_XXS"},
        {"match": "attn_", "type": "Q4_K"},
        {"match": "shexp", "type": "IQ4_XS"},
        {"match": "ffn_", "type": "Q2_K"},
        {"match": "token_embd", "type": "Q8_0"},
    ],
    "default": "Q6_K",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("determinism")
    model = write_synthetic("deepseek2", folder / "tiny-deepseek2.gguf")
    rng = np.random.default_rng(7)
    entries = {}
    for t in GGUFModel(model).tensors:
        if len(t.shape) >= 2:
            n_mat = t.shape[2] if len(t.shape) == 3 else 1
            sums = rng.gamma(2.0, 1.0, (n_mat, t.row_length)).astype(np.float32)
            entries[t.name] = ImatrixEntry(sums, np.full(n_mat, 32, np.float32))
    imatrix = folder / "imatrix.gguf"
    write_imatrix_gguf(Imatrix(entries, ["determinism"], 4, 512), imatrix)
    recipe = folder / "every-encoder.yaml"
    recipe.write_text(__import__("yaml").safe_dump(RECIPE))
    return model, imatrix, recipe


@pytest.mark.parametrize("backend", ["ggml", "torch"])
def test_same_bytes_across_runs_and_thread_counts(backend: str, inputs: tuple[Path, Path, Path],
                                                  tmp_path: Path) -> None:  # fmt: skip
    model, imatrix, recipe = inputs
    plan = dynq.plan(model, str(recipe))
    outputs = []
    for run, threads in enumerate([1, 2, 4, 1]):
        ctx = dynq.RunContext(threads=threads, device="cpu")
        out = tmp_path / f"run{run}-t{threads}.gguf"
        dynq.quantize(plan, out, imatrix=imatrix, ctx=ctx, backend=backend)
        outputs.append(out.read_bytes())
    assert all(o == outputs[0] for o in outputs[1:])
    assert GGUFModel(tmp_path / "run0-t1.gguf").field("dynq.encoder") == f"{backend}:cpu"
    # another process, another thread count: the same bytes
    other = tmp_path / "process.gguf"
    done = subprocess.run([sys.executable, "-m", "dynq.cli", "quantize", str(model), "-r", str(recipe), "--imatrix",
                           str(imatrix), "--backend", backend, "--device", "cpu", "--threads", "3", "-o", str(other)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert other.read_bytes() == outputs[0]
