"""Error-feedback encoding: the Gram pass and file, the code layouts learned from the decoder, the encoder's error
against the plain encoders' on real weights and a real Gram matrix, and the wiring (quantize, CLI, tasks, bad input).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import dynq
from dynq.calib.gram import add_upper, mirrored
from dynq.core.qtypes import QUANTIZABLE, qtype
from dynq.errors import DynqError
from dynq.gguf_io.gram import GramFile, GramSet, write_gram
from dynq.gguf_io.imatrix import write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel, field_value
from dynq.kernels import get_backend
from dynq.kernels.code_layout import affine_grid, code_layout, decode
from dynq.kernels.feedback import encode_with_feedback, inverse_factor
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.runtime import LlamaRuntime
from runs import TWO_THREADS, OneThreadTasks, quantize_to

CALIB = " ".join(f"the {w} of and to in def return {i}" for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 40))
AFFINE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ2_0"}
TABLE = {"IQ4_NL", "IQ4_XS", "IQ2_S"}  # IQ2_S: its sign bits, one per element
MATRIX = "blk.10.ffn_down.weight"  # 576 rows of 1536 columns: a multiple of every block size
ROWS = 96  # rows of it encoded per type (the error compared is per row, so a slice is as telling)


@pytest.fixture(scope="module")
def real() -> dict[str, object]:
    """smollm2-135m's weights and a Gram pass over calibration text (real activations, not random ones)."""
    model = dynq.fetch("zoo:smollm2-135m")
    imx, grams = dynq.collect_gram(model, text=dynq.Text(CALIB, "test-calib"), n_ctx=256, chunks=6, ctx=TWO_THREADS)
    return {"model": model, "imatrix": imx, "grams": grams}


@pytest.mark.model
def test_the_pass_shares_inputs_and_its_diagonal_is_the_imatrix(real: dict[str, object], tmp_path: Path) -> None:
    imx, grams = real["imatrix"], real["grams"]
    assert isinstance(imx, dynq.Imatrix) and isinstance(grams, GramSet)
    inputs = grams.inputs
    assert inputs["blk.3.attn_q.weight"] == inputs["blk.3.attn_k.weight"] == inputs["blk.3.attn_v.weight"]
    assert inputs["blk.3.ffn_gate.weight"] == inputs["blk.3.ffn_up.weight"] != inputs["blk.3.attn_q.weight"]
    assert len(set(inputs.values())) == 4 * 30  # attention in, attention out, FFN in, FFN down: per block
    path = write_gram(grams, tmp_path / "g.gram.gguf")
    g = GramFile(path)
    for weight in ("blk.0.attn_k.weight", "blk.7.attn_output.weight", "blk.29.ffn_up.weight", MATRIX):
        h = g.matrix(weight)
        assert h is not None and np.array_equal(h, grams.matrices[inputs[weight]])  # the round trip
        assert np.allclose(h, h.T)
        np.testing.assert_allclose(np.diagonal(h), imx.entries[weight].sums[0], rtol=1e-4)
        assert g.tokens_of(weight) == imx.entries[weight].counts[0]
    g.check_against(imx, list(inputs), "the imatrix")


def test_add_upper_is_half_of_xtx() -> None:
    x = np.random.default_rng(0).standard_normal((300, 2100)).astype(np.float32)
    upper = np.zeros((2100, 2100), np.float32)
    add_upper(upper, x)
    np.testing.assert_allclose(mirrored(upper), x.T @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_code_layouts_come_from_the_decoder(name: str) -> None:
    layout = code_layout(name)
    kind = None if layout is None else "affine" if layout.affine else "table"
    assert kind == ("affine" if name in AFFINE else "table" if name in TABLE else None)
    if layout is None:
        return
    t = qtype(name)
    rows = np.random.default_rng(3).standard_normal((8, 512)).astype(np.float32)
    data = get_backend("torch", 1).encode(t, rows, None)  # dynq's encoders, not the ones the layout was learned on
    codes = layout.read_codes(data)
    assert np.array_equal(layout.write_codes(data, codes), data)
    if layout.affine:
        base, step = affine_grid(layout, data)
        np.testing.assert_allclose(base + step * codes, decode(data, t), rtol=1e-5, atol=1e-6)


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    e = (w - q).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, h.astype(np.float64), e))


@pytest.mark.model
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_feedback_beats_the_plain_encoder_on_real_weights(real: dict[str, object], name: str) -> None:
    """tr((W−Q)H(W−Q)ᵀ) with the Gram matrix of the calibration pass: lower with feedback, for every type."""
    t = qtype(name)
    grams = real["grams"]
    imx = real["imatrix"]
    assert isinstance(grams, GramSet) and isinstance(imx, dynq.Imatrix)
    h = grams.matrices[grams.inputs[MATRIX]]
    w = GGUFModel(real["model"]).load(MATRIX)[:ROWS]  # type: ignore[arg-type]
    importance = imx.entries[MATRIX].importance()[0]
    ggml = get_backend("ggml", 2)
    plain = output_error(w, decode(ggml.encode(t, w, importance), t), h)
    fed = output_error(w, decode(encode_with_feedback(t, w, importance, h, ggml, threads=2), t), h)
    # smollm2's file is Q4_1: at Q4_1 both encoders give its weights back exactly, and so must feedback
    assert fed < plain or fed == plain == 0, f"{name}: feedback {fed:.4g} vs plain {plain:.4g}"


@pytest.mark.parametrize("backend", ["ggml", "torch"])
@pytest.mark.parametrize("name", ["Q2_K", "Q4_0", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ1_M"])
def test_a_diagonal_gram_gives_the_plain_bytes(name: str, backend: str) -> None:
    """No error reaches another column, so every element keeps the block encoder's code."""
    t = qtype(name)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    importance = rng.uniform(0.2, 3.0, 512).astype(np.float32)
    kernels = get_backend(backend, 1)
    fed = encode_with_feedback(t, w, importance, np.diag(importance * 100).astype(np.float32), kernels)
    assert np.array_equal(fed, kernels.encode(t, w, importance))


@pytest.mark.model
def test_the_same_bytes_at_any_thread_count(real: dict[str, object]) -> None:
    grams = real["grams"]
    assert isinstance(grams, GramSet)
    h = grams.matrices[grams.inputs[MATRIX]]
    w = GGUFModel(real["model"]).load(MATRIX)[:64]  # type: ignore[arg-type]
    one = encode_with_feedback(qtype("Q3_K"), w, None, h, get_backend("ggml", 1), threads=1)
    two = encode_with_feedback(qtype("Q3_K"), w, None, h, get_backend("ggml", 2), threads=2)
    assert np.array_equal(one, two)


def test_bad_gram_matrices_are_one_line() -> None:
    w = np.ones((2, 256), np.float32)
    kernels = get_backend("ggml", 1)
    nan = np.eye(256, dtype=np.float32)
    nan[3, 5] = np.nan
    with pytest.raises(DynqError, match="NaN or Inf"):
        encode_with_feedback(qtype("Q4_K"), w, None, nan, kernels)
    indefinite = np.eye(256, dtype=np.float32)
    indefinite[0, 1] = indefinite[1, 0] = 10.0
    with pytest.raises(DynqError, match="not positive definite"):
        inverse_factor(indefinite)
    with pytest.raises(DynqError, match="512 columns"):
        encode_with_feedback(qtype("Q4_K"), np.ones((2, 512), np.float32), None, np.eye(256, dtype=np.float32), kernels)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama, its imatrix and Gram file from one pass, written by the CLI."""
    folder = tmp_path_factory.mktemp("fb")
    model = write_synthetic("llama", folder / "tiny.gguf")
    text = folder / "calib.txt"
    text.write_text(CALIB)
    imx, gram = folder / "tiny.imatrix.gguf", folder / "tiny.gram.gguf"
    done = subprocess.run([sys.executable, "-m", "dynq", "imatrix", str(model), "-o", str(imx), "--gram", str(gram),
                           "--text", str(text), "--ctx", "128", "--chunks", "4", "--threads", "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Gram matrices for 14 weights" in done.stdout
    return {"model": model, "imatrix": imx, "gram": gram, "folder": folder}


def test_quantize_with_feedback_runs_in_llama_cpp(tiny: dict[str, Path]) -> None:
    out = tiny["folder"] / "fb.gguf"
    done = subprocess.run([sys.executable, "-m", "dynq", "quantize", str(tiny["model"]), "-r", "uniform-q2_k", "-o",
                           str(out), "--imatrix", str(tiny["imatrix"]), "--gram", str(tiny["gram"]), "--threads", "2"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    encoder = field_value(GGUFReader(out), "dynq.encoder")
    assert str(encoder).startswith("feedback-v1-damp0.3(ggml):cpu:gram-")
    plain = quantize_to(tiny["model"], "uniform-q2_k", tiny["folder"] / "plain.gguf", imatrix=tiny["imatrix"])
    fed, ref = GGUFModel(out), GGUFModel(plain.files[0])
    assert [(t.name, t.shape) for t in fed.tensors] == [(t.name, t.shape) for t in ref.tensors]
    assert all(fed.raw(t.name).nbytes == ref.raw(t.name).nbytes for t in ref.tensors)  # the same types
    name = "blk.1.ffn_down.weight"
    assert fed.raw(name).tobytes() != ref.raw(name).tobytes()  # fed back, not the plain bytes
    assert fed.raw("token_embd.weight").tobytes() == ref.raw("token_embd.weight").tobytes()  # no Gram: plain
    with LlamaRuntime(out, n_ctx=64, threads=2, logits=True) as rt:
        logits = rt.evaluate_chunk(list(range(3, 35)))
    assert logits is not None and np.isfinite(logits).all()


def test_the_task_path_gives_the_same_bytes(tiny: dict[str, Path]) -> None:
    """As Ray or local processes run it: the task names the Gram file and the worker opens it."""
    a = quantize_to(tiny["model"], "uniform-q3_k", tiny["folder"] / "local.gguf", imatrix=tiny["imatrix"],
                    gram=tiny["gram"])  # fmt: skip
    pool = dynq.executor(processes=2)
    try:
        b = quantize_to(tiny["model"], "uniform-q3_k", tiny["folder"] / "tasks.gguf", imatrix=tiny["imatrix"],
                        gram=tiny["gram"], executor=pool)  # fmt: skip
    finally:
        pool.close()
    assert a.files[0].read_bytes() == b.files[0].read_bytes()


def test_a_gram_file_of_another_model_is_refused(tiny: dict[str, Path]) -> None:
    other = tiny["folder"] / "other.imatrix.gguf"
    imx = dynq.read_imatrix(tiny["imatrix"])
    for entry in imx.entries.values():
        entry.sums *= 1.5
    write_imatrix_gguf(imx, other)
    out = tiny["folder"] / "refused.gguf"
    done = subprocess.run([sys.executable, "-m", "dynq", "quantize", str(tiny["model"]), "-r", "uniform-q4_k", "-o",
                           str(out), "--imatrix", str(other), "--gram", str(tiny["gram"])],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and not out.exists()
    assert len(done.stderr.strip().splitlines()) == 1 and "not from the pass" in done.stderr
    with pytest.raises(DynqError, match="needs the imatrix"):
        quantize_to(tiny["model"], "uniform-q4_k", out, gram=tiny["gram"])
    with pytest.raises(DynqError, match="not a Gram file"):
        quantize_to(tiny["model"], "uniform-q4_k", out, imatrix=tiny["imatrix"], gram=tiny["imatrix"])
    assert not out.exists()


def test_nan_in_a_gram_file_writes_nothing(tiny: dict[str, Path]) -> None:
    g = GramFile(tiny["gram"])
    matrices = {str(i): np.array(g.matrix(w)) for w, i in g.inputs.items()}
    grams = GramSet(matrices, {str(i): g.tokens_of(w) for w, i in g.inputs.items()},
                    {w: str(i) for w, i in g.inputs.items()})  # fmt: skip
    grams.matrices[str(g.inputs["blk.0.ffn_down.weight"])][5, 7] = np.nan
    bad = write_gram(grams, tiny["folder"] / "nan.gram.gguf")
    out = tiny["folder"] / "nan.gguf"
    with pytest.raises(DynqError, match="NaN or Inf"):
        quantize_to(tiny["model"], "uniform-q4_k", out, imatrix=tiny["imatrix"], gram=bad)
    assert not out.exists()


LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q6_K")


def test_a_profile_measures_the_encoder_that_will_write(tiny: dict[str, Path], tmp_path: Path) -> None:
    """With the Gram file, a profile's errors are the feedback encoder's output errors (a cache entry of its own);
    its tasks carry the Gram file to the worker and measure the same; quantize_for refuses a profile of the other
    encoder and writes with feedback when they agree."""
    imx = dynq.read_imatrix(tiny["imatrix"])
    text = dynq.Text(CALIB, "test-calib")
    ctx = dynq.RunContext(threads=2, cache_dir=tmp_path)
    settings: dict[str, object] = {"types": LADDER, "rows": 64, "n_ctx": 64, "chunks": 1}
    plain = dynq.profile(tiny["model"], imatrix=imx, text=text, ctx=ctx, **settings)  # type: ignore[arg-type]
    fed = dynq.profile(tiny["model"], imatrix=imx, text=text, ctx=ctx, gram=tiny["gram"], **settings)  # type: ignore[arg-type]
    assert plain.method.encoder == "" and fed.method.encoder.startswith("feedback-v1")
    down = "blk.1.ffn_down.weight"
    assert fed.tensors[down].errors["Q2_K"] != plain.tensors[down].errors["Q2_K"]
    assert fed.tensors[down].errors["Q2_K"] > fed.tensors[down].errors["Q3_K"] > fed.tensors[down].errors["Q6_K"]
    pool = OneThreadTasks()
    there = dynq.profile(tiny["model"], imatrix=imx, text=text, gram=tiny["gram"], executor=pool,  # type: ignore[arg-type]
                         ctx=dynq.RunContext(threads=2, cache_dir=tmp_path / "tasks"), **settings)  # fmt: skip
    assert pool.tasks and all(getattr(t, "gram", None) == str(tiny["gram"].resolve()) for t in pool.tasks)
    assert there.tensors[down].errors == pytest.approx(fed.tensors[down].errors, rel=1e-6)
    assert [p.kld for p in there.probes] == pytest.approx([p.kld for p in fed.probes], rel=1e-3)
    out = tmp_path / "solved.gguf"
    with pytest.raises(DynqError, match="the profile measured llama"):
        dynq.quantize_for(tiny["model"], "3.5bpw", out, imatrix=imx, profile=plain, gram=tiny["gram"], ctx=ctx)
    with pytest.raises(DynqError, match="would write with llama"):
        dynq.quantize_for(tiny["model"], "3.5bpw", out, imatrix=imx, profile=fed, ctx=ctx)
    assert not out.exists()
    done = dynq.quantize_for(tiny["model"], "3.5bpw", out, imatrix=imx, profile=fed, gram=tiny["gram"], ctx=ctx)
    assert str(field_value(GGUFReader(done.result.files[0]), "dynq.encoder")).startswith("feedback-v1")
