"""Quantizing end to end: tiny synthetic models of real architectures, llama.cpp loading the results, bad input."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

from dynq import RunContext
from dynq.calib.collector import collect_imatrix
from dynq.core.importance import ImatrixEntry
from dynq.core.qtypes import quantizable_qtypes
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.runtime import LlamaRuntime
from dynq.recipe.plan import resolve
from dynq.recipe.presets import load_recipe
from dynq.recipe.rules import recipe_from_dict
from runs import TWO_THREADS, quantize_to
from tiny_models import llama_tensors, write_gguf

CALIB = " ".join(f"the {w} of and to in def return" for w in "abcdefghijklmnopqrstuvwxyz" * 20)
DYN = ["dyn-iq1_s", "dyn-iq1_m", "dyn-iq2_xxs", "dyn-q2_k_xl"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    return {kind: write_synthetic(kind, folder / f"tiny-{kind}.gguf") for kind in ("deepseek2", "qwen3moe", "llama")}


@pytest.fixture(scope="module")
def imatrices(synthetic: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("imatrix")
    out = {}
    for kind, path in synthetic.items():
        imx = collect_imatrix(path, CALIB, ["test-calib"], n_ctx=128, n_chunks=4, ctx=TWO_THREADS)
        out[kind] = folder / f"{kind}.imatrix.gguf"
        write_imatrix_gguf(imx, out[kind])
    return out


def run_llama(path: Path, n_tokens: int = 32) -> np.ndarray:
    """Evaluate a chunk of tokens with llama.cpp and return the logits (the model loaded and ran)."""
    with LlamaRuntime(path, n_ctx=64, threads=2, logits=True) as rt:
        logits = rt.evaluate_chunk(list(range(3, 3 + n_tokens)))
    assert logits is not None
    return logits


def test_collector_covers_every_expert_matrix(synthetic: dict[str, Path], imatrices: dict[str, Path]) -> None:
    imx = read_imatrix(imatrices["deepseek2"])
    assert imx.datasets == ["test-calib"] and imx.chunk_count == 4
    gate = imx.entries["blk.1.ffn_gate_exps.weight"]
    assert gate.sums.shape == (8, 256)
    assert gate.counts.sum() == 4 * 128 * 2  # every token to two experts
    assert imx.entries["blk.0.attn_q_a.weight"].counts.tolist() == [4 * 128]
    assert "blk.0.ffn_down.weight" in imx.entries and "blk.2.ffn_down_shexp.weight" in imx.entries
    plan = resolve(load_recipe("dyn-iq1_s"), GGUFModel(synthetic["deepseek2"]).inventory())
    missing = [t.info.name for t in plan.needing_imatrix() if t.info.name not in imx.entries]
    assert missing == []


@pytest.mark.parametrize("kind", ["deepseek2", "qwen3moe"])
@pytest.mark.parametrize("recipe", DYN)
def test_moe_fixtures_quantize_and_run(
    synthetic: dict[str, Path], imatrices: dict[str, Path], tmp_path: Path, kind: str, recipe: str
) -> None:
    out = tmp_path / f"{kind}-{recipe}.gguf"
    result = quantize_to(synthetic[kind], recipe, out, imatrix=imatrices[kind])
    assert result.files == [out]
    written = GGUFModel(out)
    planned = {t.info.name: t.qtype.name for t in result.plan.tensors}
    assert {t.name: t.dtype.name for t in written.tensors} == planned
    assert sum(t.nbytes for t in written.tensors) == result.plan.total_bytes
    meta = written.metadata
    assert meta["dynq.recipe.name"] == recipe
    recorded = recipe_from_dict(json.loads(meta["dynq.recipe"]), str(out))  # the file says how it was made
    assert resolve(recorded, GGUFModel(synthetic[kind]).inventory()).tensors == result.plan.tensors
    assert meta["dynq.imatrix.datasets"] == ["test-calib"] and meta["quantize.imatrix.chunks_count"] == 4
    assert meta["general.quantization_version"] == 2
    assert meta["tokenizer.ggml.model"] == "llama"
    logits = run_llama(out)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("backend", ["ggml", "torch"])
def test_every_type_loads_in_llama_cpp(
    synthetic: dict[str, Path], imatrices: dict[str, Path], tmp_path: Path, backend: str
) -> None:
    reference = run_llama(synthetic["llama"])
    for t in quantizable_qtypes():
        out = tmp_path / f"llama-{t.name}.gguf"
        quantize_to(synthetic["llama"], f"uniform-{t.name.lower()}", out, imatrix=imatrices["llama"], backend=backend)
        types = {info.name: info.dtype.name for info in GGUFModel(out).tensors}
        assert types["blk.0.attn_q.weight"] == t.name
        logits = run_llama(out)
        assert np.isfinite(logits).all(), t.name
        if t.bpw >= 4:  # close enough to the source that the logits still agree
            corr = np.corrcoef(logits.ravel(), reference.ravel())[0, 1]
            assert corr > 0.9, (t.name, corr)
        out.unlink()


def test_split_output_loads_as_one_model(synthetic: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "single.gguf"
    quantize_to(synthetic["deepseek2"], "dyn-q2_k_xl", single)
    result = quantize_to(synthetic["deepseek2"], "dyn-q2_k_xl", tmp_path / "split.gguf", split_max_size=1_000_000)
    assert len(result.files) > 1
    assert result.files[0].name == f"split-00001-of-{len(result.files):05d}.gguf"
    assert not (tmp_path / "split.gguf").exists()
    a, b = GGUFModel(single), GGUFModel(result.files[0])
    assert len(b.shards) == len(result.files)
    for t in a.tensors:
        np.testing.assert_array_equal(a.raw(t.name), b.raw(t.name))
    np.testing.assert_array_equal(run_llama(single), run_llama(result.files[0]))


def big_llama(path: Path, n_blocks: int = 16, n_embd: int = 1024, n_ff: int = 4096) -> int:
    """A llama in F16 whose float32 image (~1 GB) is far larger than its largest tensor (16 MiB in float32); every
    block holds the same values (cheap to make). Returns the largest tensor's float32 bytes."""
    one = {name.split(".", 2)[2]: (values.astype(np.float16), T.F16 if values.ndim == 2 else T.F32)
           for name, values, _ in llama_tensors(1, n_embd, n_ff, seed=3) if name.startswith("blk.0.")}  # fmt: skip
    tensors = [("token_embd.weight", np.ones((96, n_embd), np.float16), T.F16)]
    tensors += [(f"blk.{i}.{kind}", v, t) for i in range(n_blocks) for kind, (v, t) in one.items()]
    tensors += [("output_norm.weight", np.ones(n_embd, np.float32), T.F32),
                ("output.weight", np.ones((96, n_embd), np.float16), T.F16)]  # fmt: skip
    write_gguf(path, tensors)
    return n_ff * n_embd * 4


# Peak RSS while quantizing, over the process's RSS once the plan is made (imports, headers), in a fresh process.
_GROWTH = """import sys, dynq
from pathlib import Path
from dynq.quantize import peak_rss_bytes
plan = dynq.plan(sys.argv[1], "uniform-q8_0")
rss = lambda: next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                   if l.startswith("VmRSS:"))
before = rss()
assert peak_rss_bytes() < before + 2**26, "the start peaked above its resting size: the growth is not measured"
done = dynq.quantize(plan, sys.argv[2], ctx=dynq.RunContext(threads=2))
print(before, done.peak_rss_bytes - before)
"""


def test_quantize_streams_a_source_far_larger_than_its_memory(tmp_path: Path) -> None:
    source = tmp_path / "big.gguf"
    largest = big_llama(source)
    image = sum(t.n_elements for t in GGUFModel(source).tensors) * 4
    assert image > 60 * largest
    done = subprocess.run([sys.executable, "-c", _GROWTH, str(source), str(tmp_path / "out.gguf")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.split()[-1])
    # a quantizer that read every tensor first would grow by the source's F16 bytes (image / 2) at least
    assert growth < 12 * largest < image / 2, (growth, largest, image)


# --- bad input: one clear line, non-zero exit, nothing under the output name ------------------------------------


def dynq(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "dynq.cli", *args], capture_output=True, text=True, preexec_fn=limit, timeout=300
    )


def assert_clean_failure(done: subprocess.CompletedProcess[str], out: Path, message: str) -> None:
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_truncated_source(synthetic: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(synthetic["llama"].read_bytes()[:1_000_000])
    out = tmp_path / "out.gguf"
    assert_clean_failure(dynq("quantize", str(cut), "-r", "q8_0", "-o", str(out)), out, "truncated")


def test_not_gguf(tmp_path: Path) -> None:
    src = tmp_path / "model.gguf"
    src.write_text("hello, I am a text file")
    out = tmp_path / "out.gguf"
    assert_clean_failure(dynq("quantize", str(src), "-r", "q8_0", "-o", str(out)), out, "not a GGUF file")


def test_imatrix_for_another_model(synthetic: dict[str, Path], imatrices: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    done = dynq("quantize", str(synthetic["qwen3moe"]), "-r", "dyn-iq1_s", "--imatrix", str(imatrices["deepseek2"]),
                "-o", str(out))  # fmt: skip
    assert_clean_failure(done, out, "no data for")
    # same tensor names, other shapes
    imx = read_imatrix(imatrices["llama"])
    imx.entries["blk.0.ffn_up.weight"] = ImatrixEntry(np.ones((1, 128), np.float32), np.ones(1, np.float32))
    other = tmp_path / "other.imatrix.gguf"
    write_imatrix_gguf(imx, other)
    done = dynq("quantize", str(synthetic["llama"]), "-r", "dyn-iq1_s", "--imatrix", str(other), "-o", str(out))
    assert_clean_failure(done, out, "made for another model")


def test_missing_imatrix_stops_before_work(synthetic: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    done = dynq("quantize", str(synthetic["deepseek2"]), "-r", "dyn-iq1_s", "-o", str(out))
    assert_clean_failure(done, out, "need an importance matrix")


def test_output_in_missing_directory(synthetic: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "dir" / "out.gguf"
    done = dynq("quantize", str(synthetic["llama"]), "-r", "q8_0", "-o", str(out))
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert not (tmp_path / "no").exists()


def test_write_failing_part_way(synthetic: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    done = dynq("quantize", str(synthetic["llama"]), "-r", "f16", "-o", str(out), limit_bytes=500_000)
    assert done.returncode == 1 and "writing failed" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
    # what was written is kept for --resume (tests/test_resume.py), in the partial folder only
    assert [p.name for p in tmp_path.iterdir()] == [f".{out.name}.dynq-partial"]


def test_existing_output_survives_a_failed_run(synthetic: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous result")
    done = dynq("quantize", str(synthetic["llama"]), "-r", "f16", "-o", str(out), "--force", limit_bytes=500_000)
    assert done.returncode == 1
    assert out.read_bytes() == b"previous result"


def test_reuse_encoded_gives_identical_files(
    synthetic: dict[str, Path], imatrices: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, imx = synthetic["deepseek2"], imatrices["deepseek2"]
    ctx = RunContext(threads=2, cache_dir=tmp_path / "cache")
    quantize_to(src, "dyn-iq1_s", tmp_path / "plain.gguf", imatrix=imx, ctx=ctx)
    entries = lambda: len(list((tmp_path / "cache" / "encoded").rglob("*.bin")))  # noqa: E731
    first = quantize_to(src, "dyn-iq1_s", tmp_path / "first.gguf", imatrix=imx, reuse_encoded=True, ctx=ctx)
    assert (tmp_path / "first.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    # every tensor was either encoded and put, or read (tensors of the same content and type, the norms)
    first_entries = entries()
    assert first_entries + first.reused == len(first.plan.tensors) and first_entries > first.reused
    again = quantize_to(src, "dyn-iq1_m", tmp_path / "again.gguf", imatrix=imx, reuse_encoded=True, ctx=ctx)
    # dyn-iq1_m shares tensors (the gate/up experts at IQ1_S) with dyn-iq1_s: those are read back, not encoded
    shared = {(p.info.name, p.qtype) for p in first.plan.tensors} & {(p.info.name, p.qtype) for p in again.plan.tensors}
    assert again.reused >= len(shared) > 0
    assert entries() == first_entries + len(again.plan.tensors) - again.reused
    a, b = GGUFModel(tmp_path / "first.gguf"), GGUFModel(tmp_path / "again.gguf")
    np.testing.assert_array_equal(a.raw("blk.2.ffn_up_exps.weight"), b.raw("blk.2.ffn_up_exps.weight"))
    # the same recipe again is read back whole, to the same bytes
    third = quantize_to(src, "dyn-iq1_s", tmp_path / "third.gguf", imatrix=imx, reuse_encoded=True, ctx=ctx)
    assert third.reused == len(first.plan.tensors)
    assert (tmp_path / "third.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()


def test_all_experts_gives_every_expert_data(synthetic: dict[str, Path]) -> None:
    short = "the of and to in"  # 80 tokens, two chunks of 32: most experts see nothing when routed
    routed = collect_imatrix(synthetic["deepseek2"], short * 20, ["t"], n_ctx=32, n_chunks=2, ctx=TWO_THREADS)
    every = collect_imatrix(synthetic["deepseek2"], short * 20, ["t"], n_ctx=32, n_chunks=2, ctx=TWO_THREADS,
                            all_experts=True)  # fmt: skip
    name = "blk.1.ffn_down_exps.weight"
    assert routed.entries[name].counts.sum() == 2 * 32 * 2  # two experts per token
    assert every.entries[name].counts.tolist() == [64.0] * 8  # every token through all eight
    assert (every.entries[name].sums > 0).all()


def with_alignment(source: Path, target: Path, alignment: int) -> Path:
    """`source` rewritten by gguf-py with `general.alignment = alignment` (tensor data laid out accordingly)."""
    model = GGUFModel(source)
    writer = GGUFWriter(target, model.arch)
    writer.add_custom_alignment(alignment)
    for f in model.metadata_fields():
        if f.key != "general.architecture":
            writer.add_key_value(f.key, f.value, f.vtype, f.sub_type)
    for t in model.readers[0].tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_source_alignment_is_honoured(synthetic: dict[str, Path], tmp_path: Path) -> None:
    """A source declaring general.alignment = 64 gives an output laid out with it: gguf-py reads every tensor where
    its info says, the bytes equal those quantized from the 32-aligned source, and llama.cpp runs it alike."""
    aligned = with_alignment(synthetic["llama"], tmp_path / "aligned64.gguf", 64)
    out, plain = tmp_path / "a64-q8.gguf", tmp_path / "a32-q8.gguf"
    quantize_to(aligned, "uniform-q8_0", out)
    quantize_to(synthetic["llama"], "uniform-q8_0", plain)
    written, reference = GGUFReader(out), GGUFReader(plain)
    assert written.alignment == 64 and written.fields["general.alignment"].contents() == 64
    assert {t.data_offset % 64 for t in written.tensors} == {0}
    for a, b in zip(written.tensors, reference.tensors, strict=True):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    np.testing.assert_array_equal(run_llama(out), run_llama(plain))
