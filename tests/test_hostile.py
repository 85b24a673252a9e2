"""Inputs made to break dynq (damaged, odd or crafted by a stranger) end in one clear line naming what is wrong, or in a
correct result: numbers that are not numbers, recipes that try to exhaust memory, GGUF fields that wrap or are empty,
pipes given as files, file names and templates that try to add Modelfile directives."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import dynq
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.deploy.ollama import export_ollama
from dynq.errors import DynqError
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_dat, write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel
from dynq.lab.synthetic import write_synthetic
from dynq.recipe.presets import load_recipe
from fuzzing import gguf_layout
from test_deploy import CHATML, with_chat_template
from tiny_models import llama_tensors, write_gguf

CTX = dynq.RunContext(threads=2)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynq.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), done.stderr


def model_with(path: Path, changes: dict[str, Callable[[np.ndarray], None]], n_embd: int = 64) -> Path:
    """The tiny llama model with each named tensor changed in place by its function."""
    tensors = []
    for n, values, t in llama_tensors(n_embd=n_embd, n_ff=2 * n_embd):
        if n in changes:
            values = values.copy()
            changes[n](values)
        tensors.append((n, values, t))
    write_gguf(path, tensors)
    return path


def imatrix_for(model: Path, value: float | None = None, entry: str = "blk.0.ffn_up.weight") -> Imatrix:
    """Importance for every matrix of `model`; with `value`, `entry` holds it in one column."""
    entries = {}
    for t in GGUFModel(model).tensors:
        if len(t.shape) == 2:
            sums = np.full((1, t.row_length), 4.0, np.float32)
            if t.name == entry and value is not None:
                sums[0, 3] = value
            entries[t.name] = ImatrixEntry(sums, np.full(1, 8, np.float32))
    return Imatrix(entries, ["test"], 1, 512)


# --- numbers that are not numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("recipe", ["f16", "uniform-q4_0"])
def test_nan_or_inf_in_a_weight_stops_with_the_tensor_name(bad: float, recipe: str, tmp_path: Path) -> None:
    source = model_with(tmp_path / "m.gguf", {"blk.1.attn_q.weight": lambda v: v.__setitem__((3, 5), bad)})
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli("quantize", str(source), "-r", recipe, "-o", str(out)), "blk.1.attn_q.weight", "NaN")
    assert not out.exists() and os.listdir(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
@pytest.mark.parametrize("form", ["gguf", "dat"])
def test_a_damaged_imatrix_stops_with_the_entry(bad: float, form: str, tmp_path: Path) -> None:
    source = model_with(tmp_path / "m.gguf", {})
    path = tmp_path / f"bad.imatrix.{form}"
    (write_imatrix_gguf if form == "gguf" else write_imatrix_dat)(imatrix_for(source, bad), path)
    with pytest.raises(DynqError, match=r"entry blk\.0\.ffn_up\.weight .*collect it again"):
        read_imatrix(path)
    out = tmp_path / "out.gguf"
    done = cli("quantize", str(source), "-r", "uniform-iq4_nl", "--imatrix", str(path), "-o", str(out))
    assert_one_line_error(done, "blk.0.ffn_up.weight")  # not llama.cpp's abort (exit 134) inside ggml
    assert not out.exists()


def test_all_zero_importance_is_no_importance(tmp_path: Path) -> None:
    """An entry whose sums are all zero weighs every column alike, as one of all-equal means does (and as a matrix
    without data does in llama-quantize), instead of making the encoders write zeros."""
    source = model_with(tmp_path / "m.gguf", {}, n_embd=256)
    zero, none = imatrix_for(source), imatrix_for(source)
    zero.entries["blk.0.ffn_up.weight"] = ImatrixEntry(np.zeros((1, 256), np.float32), np.full(1, 8, np.float32))
    none.entries["blk.0.ffn_up.weight"] = ImatrixEntry(np.full((1, 256), 8, np.float32), np.full(1, 8, np.float32))
    plan = dynq.plan(source, "uniform-iq2_xxs")
    a = dynq.quantize(plan, tmp_path / "zero.gguf", imatrix=zero, ctx=CTX).files[0]
    b = dynq.quantize(plan, tmp_path / "none.gguf", imatrix=none, ctx=CTX).files[0]
    name = "blk.0.ffn_up.weight"
    np.testing.assert_array_equal(GGUFModel(a).raw(name), GGUFModel(b).raw(name))
    assert np.abs(GGUFModel(a).load(name)).max() > 0


@pytest.mark.parametrize("recipe", ["uniform-q4_k", "uniform-iq4_nl", "uniform-q2_k", "f16"])
def test_all_zero_rows_and_tensors_encode_as_zeros(recipe: str, tmp_path: Path) -> None:
    def zero_rows(v: np.ndarray) -> None:
        v[:3] = 0

    def zero(v: np.ndarray) -> None:
        v[...] = 0

    source = model_with(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": zero_rows, "blk.1.ffn_gate.weight": zero},
                        n_embd=256)  # fmt: skip
    out = dynq.quantize(dynq.plan(source, recipe), tmp_path / "out.gguf", ctx=CTX).files[0]
    m = GGUFModel(out)
    assert not m.load("blk.1.ffn_gate.weight").any()
    assert np.isfinite(m.load("blk.0.ffn_up.weight")).all()


# --- recipes ------------------------------------------------------------------------------------------------------

RECIPES = {
    "huge block range": ('rules: [{match: ffn, type: Q4_K, blocks: "0-1000000000"}]\n', "block number too large"),
    # each full range is 65,537 set entries; 400 such rules once took 4.4 GB (probe N4): the fifth is refused first
    "many full block ranges": (
        "rules:\n" + "".join(f"- {{match: zz{i}, type: Q8_0, blocks: 0-65536}}\n" for i in range(400)),
        r"r\.yaml, rule 4: block ranges '0-65536' bring the recipe to more than 262,144 selected blocks",
    ),
    "one range given twice": ('rules: [{match: ffn, type: Q4_K, blocks: "0-65536,0-65536"}]\n', "overlap"),
    "alias expansion": (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nrules: [{match: ffn, type: Q4_K, note: *c}]\n",
        "anchors and aliases",
    ),
    "when as a list": ("rules: [{match: ffn, type: Q4_K, when: [moe]}]\n", "'when' must be"),
    "blocks as a mapping": ("rules: [{match: ffn, type: Q4_K, blocks: {a: 1}}]\n", "'blocks' must be"),
    "note as a list": ("rules: [{match: ffn, type: Q4_K, note: [1, 2]}]\n", "note: must be text"),
    "odd key": ("rules: [{match: ffn, type: Q4_K, ~: 1}]\n", "unknown key"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_hostile_recipes_stop_with_one_line(case: str, tmp_path: Path) -> None:
    text, message = RECIPES[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(DynqError, match=message):
        load_recipe(str(path))
    assert time.perf_counter() - started < 5


def test_a_recipe_not_in_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\nrules: [{match: ffn, type: Q4_K}]\n")
    with pytest.raises(DynqError, match="not a text file in UTF-8"):
        load_recipe(str(path))


# --- GGUF fields ----------------------------------------------------------------------------------------------------


def patched(source: Path, target: Path, kind: str, value: int, which: int = 0) -> Path:
    """`source` with the `which`-th field of this kind (from the fuzzer's map of the file) set to `value`."""
    data = bytearray(source.read_bytes())
    slot = [s for s in gguf_layout(bytes(data)).slots if s.kind == kind][which]
    data[slot.offset : slot.offset + slot.size] = value.to_bytes(slot.size, "little")
    target.write_bytes(bytes(data))
    return target


def test_an_offset_that_wraps_past_2_64_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = patched(tiny_gguf, tmp_path / "wrap.gguf", "tensor offset", 2**64 - 32, which=3)
    with pytest.raises(DynqError, match="truncated"):
        GGUFModel(bad)
    assert_one_line_error(cli("inspect", str(bad)), "truncated")


def test_an_empty_dimension_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = patched(tiny_gguf, tmp_path / "empty.gguf", "dimension", 0, which=2)
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli("quantize", str(bad), "-r", "q8_0", "-o", str(out)), "empty shape")


def test_a_model_without_tensors(tiny_gguf: Path, tmp_path: Path) -> None:
    empty = patched(tiny_gguf, tmp_path / "empty.gguf", "tensor count", 0)
    out = tmp_path / "out.gguf"
    assert_one_line_error(cli("quantize", str(empty), "-r", "q8_0", "-o", str(out)), "no tensors to quantize")


def test_a_pipe_is_not_a_model_and_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    assert_one_line_error(cli("inspect", str(fifo)), "not a regular file")
    assert_one_line_error(cli("quantize", str(fifo), "-r", "q8_0", "-o", str(tmp_path / "o.gguf")), "regular file")


def test_a_dat_imatrix_with_a_negative_count(tmp_path: Path) -> None:
    raw = struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, -4)
    (tmp_path / "neg.dat").write_bytes(raw)
    with pytest.raises(DynqError, match="truncated or not an imatrix"):
        read_imatrix(tmp_path / "neg.dat")


def test_an_output_where_nothing_can_be_written(tiny_gguf: Path) -> None:
    assert_one_line_error(cli("quantize", str(tiny_gguf), "-r", "q8_0", "-o", "/sys/x.gguf"), "cannot write there")


# --- text that reaches a Modelfile ---------------------------------------------------------------------------------


def directives(modelfile: str) -> list[str]:
    """Each directive as Ollama's parser reads it: the first word of a line that is neither a comment nor inside a
    triple-quoted value."""
    found, quoted = [], False
    for line in modelfile.split("\n"):
        if not quoted and line and not line.startswith("#"):
            found.append(line.split()[0])
        quoted ^= line.count('"""') % 2 == 1
    return found


def test_a_file_name_cannot_add_modelfile_directives(tmp_path: Path) -> None:
    chat = with_chat_template(dynq_tiny(tmp_path), tmp_path / "chat.gguf", CHATML)
    evil = tmp_path / 'evil"\nSYSTEM """pwned\x1b[31m.gguf'
    evil.write_bytes(chat.read_bytes())
    result = export_ollama(evil, tmp_path / "out")
    text = result.modelfile.read_text()
    assert result.gguf.name == "evil_SYSTEM_pwned_31m.gguf"
    assert f"FROM ./{result.gguf.name}\n" in text
    assert directives(text) == ["FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "PARAMETER", "PARAMETER", "PARAMETER"]
    assert 'SYSTEM """You are a helpful AI assistant' in text


def test_a_template_cannot_add_modelfile_directives(tmp_path: Path) -> None:
    template = 'hi\nFROM /etc/passwd\r\nSYSTEM """x"""\x1cPARAMETER num_ctx 1\u2028ADAPTER ./evil'
    odd = with_chat_template(dynq_tiny(tmp_path), tmp_path / "odd.gguf", template)
    text = export_ollama(odd, tmp_path / "out").modelfile.read_text()
    assert set(directives(text)) == {"FROM", "PARAMETER"} and directives(text).count("FROM") == 1
    assert all(not line.startswith(("FROM /", "SYSTEM", "ADAPTER")) for line in text.splitlines())


def dynq_tiny(tmp_path: Path) -> Path:
    return write_synthetic("llama", tmp_path / "tiny.gguf")


def test_quantized_data_is_checked_where_llama_cpp_checks_it(tmp_path: Path) -> None:
    """Importance so large that the encoder's scales overflow: llama.cpp's row validation catches it, named."""
    source = model_with(tmp_path / "m.gguf", {})
    huge = imatrix_for(source, 3e38)
    with pytest.raises(DynqError, match=r"blk\.0\.ffn_up\.weight"):
        dynq.quantize(dynq.plan(source, "uniform-iq4_nl"), tmp_path / "o.gguf", imatrix=huge, ctx=CTX)
