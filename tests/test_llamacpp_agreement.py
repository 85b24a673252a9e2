"""dynq against llama.cpp's own tools on the same files and text: imatrix and KL divergence must agree.

The tools are built once from the pinned llama-cpp-python source package and cached (a few minutes the first
time, by `dynq.build_tools` in the fixture: the library itself never builds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dynq
from dynq.calib.collector import collect_imatrix
from dynq.eval.evaluate import evaluate
from dynq.gguf_io.imatrix import read_imatrix
from dynq.lab.synthetic import N_VOCAB, write_synthetic
from dynq.llamacpp.compare import llama_imatrix, llama_kld, llama_kld_base
from dynq.paths import cache_dir
from runs import TWO_THREADS, quantize_to

pytestmark = pytest.mark.model  # builds llama.cpp's tools

TEXT = "\n".join(f"the {c} of {c}{c} and to in def return {i}" for i, c in enumerate("abcdefghijklmnopqrstuvwxyz" * 12))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("agree")
    text = d / "text.txt"
    text.write_text(TEXT)
    dynq.build_tools()
    return {"text": text, "dir": d}


@pytest.mark.parametrize("kind", ["llama", "qwen3moe"])
def test_imatrix_agrees_with_llama_imatrix(files: dict[str, Path], kind: str) -> None:
    model = write_synthetic(kind, files["dir"] / f"{kind}.gguf")
    theirs_path = files["dir"] / f"{kind}-llama.imatrix.gguf"
    llama_imatrix(model, files["text"], theirs_path, n_ctx=128, chunks=4, threads=2, cache=cache_dir())
    theirs = read_imatrix(theirs_path)
    ours = collect_imatrix(model, TEXT, ["t"], n_ctx=128, n_chunks=4, ctx=TWO_THREADS)
    assert set(ours.entries) == set(theirs.entries)
    diffs = []
    for name, e in ours.entries.items():
        t = theirs.entries[name]
        np.testing.assert_array_equal(e.counts, t.counts)
        a, b = e.importance(), t.importance()
        diffs.append(float(np.abs(a - b).sum() / np.abs(b).sum()))
    assert float(np.median(diffs)) < 0.01
    assert max(diffs) < 0.02


def test_eval_agrees_with_llama_perplexity(files: dict[str, Path]) -> None:
    ref = write_synthetic("llama", files["dir"] / "ref.gguf")
    quant = files["dir"] / "q4.gguf"
    quantize_to(ref, "uniform-q4_k", quant)
    base = files["dir"] / "base.kld"
    llama_kld_base(ref, files["text"], base, n_ctx=128, chunks=4, threads=2, cache=cache_dir())
    theirs = llama_kld(quant, base, files["text"], n_ctx=128, chunks=4, threads=2, cache=cache_dir())
    ours = evaluate(quant, ref, TEXT, "t", n_ctx=128, n_chunks=4, top_k=N_VOCAB, ctx=TWO_THREADS).to_dict()
    for key in ("ppl", "ref_ppl", "kld_mean", "top1"):
        assert ours[key] == pytest.approx(theirs[key], rel=0.01), key


def test_bench_table_and_plot(files: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from dynq.cli import app

    ref = write_synthetic("llama", files["dir"] / "bench-ref.gguf")
    out = files["dir"] / "results"
    args = ["bench", str(ref), "-r", "q8_0", "-r", "uniform-q4_k", "--llama-mix", "Q4_K_M", "--out-dir", str(out),
            "--ctx", "128", "--chunks", "2", "--loop-tokens", "16", "--name", "tiny"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = (out / "tiny.md").read_text()
    assert "| q8_0 | dynq |" in table and "| Q4_K_M | llama.cpp |" in table
    assert (out / "tiny.png").stat().st_size > 1000
    assert not [p for p in out.iterdir() if p.name.startswith("dynq-bench-")]
    # A resumed run keeps the measured rows and measures only what is new.
    before = json.loads((out / "tiny.json").read_text())
    result = CliRunner().invoke(app, [*args, "-r", "uniform-q8_0", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed: 3 rows kept" in result.output
    after = json.loads((out / "tiny.json").read_text())
    assert after[:3] == before and [r["name"] for r in after[3:]] == ["uniform-q8_0"]
