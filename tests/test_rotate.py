"""`dynq rotate`: the rotated reference computes what the original does, in llama.cpp, and refuses what it cannot
rotate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dynq
import dynq.lab.rotate as rotation
from dynq.errors import DynqError
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.runtime import LlamaRuntime
from runs import TWO_THREADS, quantize_to

TEXT = " ".join(f"the {w} of and to in def return {i}" for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 12))


def logits(path: Path) -> np.ndarray:
    with LlamaRuntime(path, n_ctx=64, threads=2, logits=True) as rt:
        out = rt.evaluate_chunk(list(range(3, 43)))
    assert out is not None
    return np.asarray(out, dtype=np.float64)


def test_haar_is_orthogonal_and_seeded() -> None:
    q = rotation.haar_orthogonal(64, 3)
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    assert np.array_equal(q, rotation.haar_orthogonal(64, 3)) and not np.array_equal(q, rotation.haar_orthogonal(64, 4))


@pytest.mark.model
def test_smollm2_rotated_is_the_same_model(tmp_path: Path) -> None:
    """A real model: its F16 reference and the rotated one agree in llama.cpp to F16 rounding of the new weights."""
    ref = quantize_to("zoo:smollm2-135m", "f16", tmp_path / "ref.gguf").files[0]
    out = subprocess.run([sys.executable, "-m", "dynq", "rotate", str(ref), "-o", str(tmp_path / "rot.gguf")],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rot = tmp_path / "rot.gguf"
    rotated, original = GGUFModel(rot), GGUFModel(ref)
    assert "output.weight" in {t.name for t in rotated.tensors}  # smollm2 ties its output to token_embd
    assert not np.allclose(rotated.load("blk.3.attn_q.weight"), original.load("blk.3.attn_q.weight"), atol=1e-2)
    result = dynq.evaluate(rot, ref, text=dynq.Text(TEXT, "test"), n_ctx=128, chunks=2, ctx=TWO_THREADS)
    assert result.kld_mean < 1e-4 and result.top1 > 0.99, result


def test_an_moe_model_rotated_is_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Router, experts' gate/up as readers and experts' down as writers (a tiny qwen3moe); with the experts' down
    left unrotated the same check fails, so it can."""
    model = write_synthetic("qwen3moe", tmp_path / "moe.gguf")
    a = logits(model)

    def off(path: Path) -> float:
        return float(np.abs(logits(path) - a).max() / np.abs(a).max())

    assert off(dynq.rotate(model, tmp_path / "moe-rot.gguf", seed=5)) < 2e-2
    monkeypatch.setattr(rotation, "_WRITES", tuple(w for w in rotation._WRITES if w != "ffn_down_exps"))
    monkeypatch.setattr(rotation, "_UNTOUCHED", (*rotation._UNTOUCHED, "ffn_down_exps"))
    assert off(dynq.rotate(model, tmp_path / "broken.gguf", seed=5)) > 0.1


def test_what_cannot_be_rotated_is_one_line(tmp_path: Path) -> None:
    deepseek = write_synthetic("deepseek2", tmp_path / "ds.gguf")
    with pytest.raises(DynqError, match="architecture deepseek2"):
        dynq.rotate(deepseek, tmp_path / "x.gguf")
    llama = write_synthetic("llama", tmp_path / "llama.gguf")
    q4 = quantize_to(llama, "uniform-q4_k", tmp_path / "q4.gguf").files[0]
    with pytest.raises(DynqError, match="needs a float reference"):
        dynq.rotate(q4, tmp_path / "x.gguf")
    with pytest.raises(DynqError, match="overwrite the source"):
        dynq.rotate(llama, llama, overwrite=True)
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(DynqError):
        dynq.rotate(llama, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine" and not (tmp_path / "x.gguf").exists()
    assert dynq.rotate(llama, tmp_path / "a.gguf").read_bytes() == dynq.rotate(llama, tmp_path / "b.gguf").read_bytes()
