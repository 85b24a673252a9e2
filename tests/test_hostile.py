"""Inputs made to break dynq (damaged, odd or crafted by a stranger) end in one clear line naming what is wrong, or in a
correct result: numbers that are not numbers, recipes that try to exhaust memory, GGUF fields that wrap or are empty,
pipes given as files, file names and templates that try to add Modelfile directives."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

import dynq
from dynq.calib import text as text_module
from dynq.calib.text import read_texts
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.deploy.ollama import export_ollama
from dynq.errors import DynqError
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_dat, write_imatrix_gguf
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels.ggml import GgmlBackend
from dynq.lab.synthetic import write_synthetic
from dynq.quantize import encode_matrix
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


def with_floats(source: Path, target: Path, values: dict[str, float | list[float]]) -> Path:
    """A copy of `source` with these float metadata values set (FLOAT32 scalars, FLOAT64 for `.f64` keys, float
    arrays for lists); tensor bytes as stored."""
    model = GGUFModel(source)
    writer = GGUFWriter(target, model.arch)
    for key, field in model.readers[0].fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in values:
            continue
        vtype = GGUFValueType(field.types[0])
        sub_type = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    for key, value in values.items():
        if isinstance(value, list):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        else:
            writer.add_key_value(key, value, GGUFValueType.FLOAT64 if key.endswith(".f64") else GGUFValueType.FLOAT32)
    for info in model.tensors:
        writer.add_tensor(info.name, np.asarray(model.raw(info.name)), raw_dtype=model.ggml_type(info.name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.mark.parametrize(
    "values",
    [
        {"llama.rope.freq_base": float("nan")},  # probe N16: config.json's rope_theta NaN was copied, rc 0
        {"llama.attention.layer_norm_rms_epsilon": float("inf")},
        {"llama.rope.scaling.factor.f64": float("-inf")},
        {"llama.some_scales": [1.0, float("nan")]},
    ],
)
def test_a_float_the_runtime_reads_that_is_not_a_number_is_refused(
    values: dict[str, float | list[float]], tmp_path: Path
) -> None:
    source = with_floats(write_synthetic("llama", tmp_path / "m.gguf"), tmp_path / "bad.gguf", values)
    out = tmp_path / "out.gguf"
    (key,) = values
    assert_one_line_error(cli("quantize", str(source), "-r", "uniform-q8_0", "-o", str(out)), key, "not a finite")
    assert not out.exists()


def test_token_scores_are_not_runtime_numbers(tmp_path: Path) -> None:
    """The vocabulary's scores are carried as they are (a -inf score marks a token some tokenizers never pick)."""
    plain = write_synthetic("llama", tmp_path / "m.gguf")
    scores = [float(x) for x in GGUFModel(plain).readers[0].fields["tokenizer.ggml.scores"].contents()]
    scores[0] = float("-inf")
    source = with_floats(plain, tmp_path / "scores.gguf", {"tokenizer.ggml.scores": scores})
    out = dynq.quantize(dynq.plan(source, "uniform-q8_0"), tmp_path / "out.gguf", ctx=CTX).files[0]
    assert GGUFModel(out).readers[0].fields["tokenizer.ggml.scores"].contents()[0] == float("-inf")


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gguf-py's uint64 sum wraps: no RuntimeWarning may escape
        with pytest.raises(DynqError, match="past the end of the file"):
            GGUFModel(bad)
    done = cli("inspect", str(bad))
    assert_one_line_error(done, "starts at byte 1844674407370955", "past the end of the file")
    assert done.stderr.count("\n") == 1, done.stderr  # the error line alone: no warning above it


def test_tensors_sharing_bytes_are_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    """N16: two tensors whose byte ranges overlap (llama.cpp refuses such a file too)."""
    bad = patched(tiny_gguf, tmp_path / "overlap.gguf", "tensor offset", 0, which=3)
    with pytest.raises(DynqError, match="overlap"):
        GGUFModel(bad)
    assert_one_line_error(cli("quantize", str(bad), "-r", "q8_0", "-o", str(tmp_path / "o.gguf")), "overlap")
    assert not (tmp_path / "o.gguf").exists()


# --- shard sets: complete or refused -----------------------------------------------------------------------------


def shards_of(folder: Path, stem: str, per_shard: int) -> list[Path]:
    """The tiny model written by gguf-py as shards of `per_shard` tensors."""
    folder.mkdir(exist_ok=True)
    write_gguf(folder / f"{stem}.gguf", llama_tensors(), split_max_tensors=per_shard)
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


def test_a_shard_set_with_tensors_missing_is_refused(tmp_path: Path) -> None:
    """N7: shard 1 of a split cut after 12 tensors and shard 2 of one cut after 15, renamed into one set: names and
    split numbers agree, 3 of the 21 tensors are in neither."""
    early, late = shards_of(tmp_path / "a", "a", 12), shards_of(tmp_path / "b", "b", 15)
    assert len(early) == len(late) == 2
    mixed = [tmp_path / "C-00001-of-00002.gguf", tmp_path / "C-00002-of-00002.gguf"]
    mixed[0].write_bytes(early[0].read_bytes())
    mixed[1].write_bytes(late[1].read_bytes())
    with pytest.raises(DynqError, match=r"split\.tensors\.count=21, but its 2 shards hold 18 tensors"):
        GGUFModel(mixed[1])
    with pytest.raises(DynqError, match=r"split\.tensors\.count"):
        dynq.merge(mixed[0], tmp_path / "merged.gguf")
    out = tmp_path / "q.gguf"
    assert_one_line_error(cli("quantize", str(mixed[0]), "-r", "q8_0", "-o", str(out)), "split.tensors.count")
    assert not out.exists() and not (tmp_path / "merged.gguf").exists()


@pytest.mark.parametrize("name", ["Z-00001-of-00000.gguf", "Z-00003-of-00002.gguf", "Z-00000-of-00002.gguf"])
def test_a_shard_name_that_numbers_no_shard(name: str, tiny_gguf: Path, tmp_path: Path) -> None:
    """N11: `-00001-of-00000` was an IndexError in inspect, merge and quantize."""
    path = tmp_path / name
    path.write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(DynqError, match="which no split has"):
        GGUFModel(path)
    with pytest.raises(DynqError, match="which no split has"):
        dynq.merge(path, tmp_path / "m.gguf")
    assert_one_line_error(cli("inspect", str(path)), "which no split has")


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing"])
def test_a_shard_that_is_not_a_file(kind: str, tmp_path: Path) -> None:
    """N11: a shard that is a directory (or a pipe, or absent) is one line naming it, and nothing hangs."""
    shards = shards_of(tmp_path, "m", 12)
    shards[1].unlink()
    if kind == "directory":
        shards[1].mkdir()
    elif kind == "fifo":
        os.mkfifo(shards[1])
    expected = {"directory": "is a directory", "fifo": "not a regular file", "missing": "missing shard"}[kind]
    with pytest.raises(DynqError, match=expected):
        GGUFModel(shards[0])
    out = tmp_path / "q.gguf"
    assert_one_line_error(cli("quantize", str(shards[0]), "-r", "q8_0", "-o", str(out)), expected)
    assert not out.exists()


def test_split_metadata_must_match_the_names(tmp_path: Path) -> None:
    """A shard under a plain name, and shards of two splits with other shard counts, are refused."""
    two, three = shards_of(tmp_path / "two", "t", 12), shards_of(tmp_path / "three", "h", 8)
    lone = tmp_path / "lone.gguf"
    lone.write_bytes(two[0].read_bytes())
    with pytest.raises(DynqError, match=r"split metadata \(split.no=0, split.count=2\) makes it one shard"):
        GGUFModel(lone)
    mixed = [tmp_path / "M-00001-of-00002.gguf", tmp_path / "M-00002-of-00002.gguf"]
    mixed[0].write_bytes(two[0].read_bytes())
    mixed[1].write_bytes(three[1].read_bytes())
    with pytest.raises(DynqError, match=r"split\.no=1, split\.count=3, but its name makes it shard 2 of 2"):
        GGUFModel(mixed[0])


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


def test_a_text_without_end_stops_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--text /dev/zero` read until MemoryError (probe N11); a text is read up to MAX_TEXT_BYTES, pipes included."""
    monkeypatch.setattr(text_module, "MAX_TEXT_BYTES", 1 << 20)
    with pytest.raises(DynqError, match="/dev/zero: more than 1 MiB of text"):
        read_texts([Path("/dev/zero")])


def test_a_dat_imatrix_with_a_negative_count(tmp_path: Path) -> None:
    raw = struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, -4)
    (tmp_path / "neg.dat").write_bytes(raw)
    with pytest.raises(DynqError, match="truncated or not an imatrix"):
        read_imatrix(tmp_path / "neg.dat")


# /sys takes no new file, even from root (a folder's mode bits would not stop root): each command says so before
# any work, where imatrix, profile, card, export-ollama and synthetic ended in a PermissionError (probe N10).
UNWRITABLE = {
    "quantize": ["quantize", "{model}", "-r", "q8_0", "-o", "/sys/x.gguf"],
    "imatrix": ["imatrix", "{model}", "-o", "/sys/i.gguf", "--ctx", "32", "--chunks", "1"],
    "profile": ["profile", "{model}", "-o", "/sys/p.json"],
    "solve": ["solve", "{model}", "--profile", "{model}", "--target", "1MiB", "-o", "/sys/r.yaml"],
    "card": ["card", "{model}", "-o", "/sys/README.md"],
    "export-ollama": ["export-ollama", "{model}", "-o", "/sys/ollama"],
    "synthetic": ["synthetic", "llama", "-o", "/sys/x.gguf"],
}


@pytest.mark.parametrize("command", sorted(UNWRITABLE))
def test_an_output_where_nothing_can_be_written(command: str, tiny_gguf: Path) -> None:
    args = [a.replace("{model}", str(tiny_gguf)) for a in UNWRITABLE[command]]
    started = time.perf_counter()
    done = cli(*args)
    assert_one_line_error(done, "/sys/", "cannot")
    assert time.perf_counter() - started < 60  # refused up front, not after the measuring


def test_an_ollama_export_onto_a_file(tiny_gguf: Path, tmp_path: Path) -> None:
    """The export's output is a folder: a file of that name is one line (a FileExistsError traceback before)."""
    taken = tmp_path / "m.gguf"
    taken.write_bytes(b"mine")
    for extra in ([], ["--force"]):
        done = cli("export-ollama", str(tiny_gguf), "-o", str(taken), *extra)
        assert_one_line_error(done, "is a file, and this output is a folder")
    assert taken.read_bytes() == b"mine"


# imatrix, profile, solve and synthetic replaced an existing -o silently (probe N16): an imatrix or a profile can
# take hours to make. The check comes before the work; the library's calls raise OutputExists.
EXISTING = {
    "imatrix": ["imatrix", "{model}", "-o", "{out}", "--ctx", "32", "--chunks", "1"],
    "profile": ["profile", "{model}", "-o", "{out}"],
    "solve": ["solve", "{model}", "--profile", "{model}", "--target", "1MiB", "-o", "{out}"],
    "synthetic": ["synthetic", "llama", "-o", "{out}"],
}


@pytest.mark.parametrize("command", sorted(EXISTING))
def test_an_existing_output_needs_force(command: str, tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "earlier"
    out.write_bytes(b"an earlier result")
    args = [a.replace("{model}", str(tiny_gguf)).replace("{out}", str(out)) for a in EXISTING[command]]
    assert_one_line_error(cli(*args), str(out), "already exists; remove it or pass --force")
    assert out.read_bytes() == b"an earlier result" and os.listdir(tmp_path) == ["earlier"]


def test_the_library_does_not_overwrite_unless_asked(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(dynq.OutputExists):
        dynq.write_synthetic("llama", out)
    with pytest.raises(dynq.OutputExists):
        dynq.save_imatrix(imatrix_for(tiny_gguf), out)
    assert out.read_bytes() == b"mine"
    assert dynq.write_synthetic("llama", out, overwrite=True) == out and out.read_bytes()[:4] == b"GGUF"
    dynq.save_imatrix(imatrix_for(tiny_gguf), out, overwrite=True)
    assert set(read_imatrix(out).entries) == set(imatrix_for(tiny_gguf).entries)


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
    """Importance so large that the encoder's scales overflow: llama.cpp's row validation catches it, named (an
    imatrix this extreme is refused before, see below: here the encoder is handed the importance directly)."""
    source = model_with(tmp_path / "m.gguf", {})
    huge = imatrix_for(source, 3e38)
    with pytest.raises(DynqError, match=r"blk\.0\.ffn_up\.weight has an importance .* of 3\.75e\+37, above 1e\+12"):
        dynq.quantize(dynq.plan(source, "uniform-iq4_nl"), tmp_path / "o.gguf", imatrix=huge, ctx=CTX)
    planned = next(p for p in dynq.plan(source, "uniform-iq4_nl").tensors if p.info.name == "blk.0.ffn_up.weight")
    row = np.full(planned.info.row_length, 3e38 / 8, np.float32)
    with pytest.raises(DynqError, match=r"blk\.0\.ffn_up\.weight: IQ4_NL: encoded data failed llama\.cpp's valid"):
        encode_matrix(planned, GGUFModel(source).load(planned.info.name), GgmlBackend(threads=2), row)


# Probe N14: importance the encoders cannot weigh gave an all-zero tensor on both backends, silently (finite, so
# the NaN check passed, and all-zero blocks pass llama.cpp's row validation).
EXTREME = {"huge": 1e37, "huge, every column": 3e38, "subnormal": 1e-44, "tiny": 1e-25}


@pytest.mark.parametrize("case", sorted(EXTREME))
@pytest.mark.parametrize("backend", ["ggml", "torch"])
def test_importance_the_encoders_cannot_weigh_is_named_before_encoding(case: str, backend: str, tmp_path: Path) -> None:
    source = model_with(tmp_path / "m.gguf", {}, n_embd=256)
    imatrix = imatrix_for(source)
    value = np.float32(EXTREME[case])
    entry = imatrix.entries["blk.0.ffn_up.weight"]
    if case.startswith("huge, every"):
        entry.sums[:] = value
    else:
        entry.sums = (value * (1 + np.arange(entry.sums.size, dtype=np.float32) % 3)).reshape(entry.sums.shape)
    path = tmp_path / "x.imatrix.gguf"
    write_imatrix_gguf(imatrix, path)  # written as given; reading it back is where it is refused
    out = tmp_path / "out.gguf"
    done = cli("quantize", str(source), "-r", "uniform-q4_k", "--imatrix", str(path), "-o", str(out),
               "--backend", backend, "--device", "cpu")  # fmt: skip
    assert_one_line_error(done, "blk.0.ffn_up.weight", "importance", "written as zeros or damaged")
    assert not out.exists()


def test_importance_within_the_band_encodes_as_well_as_importance_near_one(tmp_path: Path) -> None:
    """The encoders weigh columns relatively: near the band's edges (peaks of 2^-39 and 2^39, about 1.8e-12 and
    5.5e11) a tensor encodes as it does with importance near 1 (to its bytes at the low edge; within a rounding of
    its error at the high one), so the band refuses only what the encoders cannot weigh."""
    source = model_with(tmp_path / "m.gguf", {}, n_embd=256)
    name = "blk.0.ffn_up.weight"
    weights = GGUFModel(source).load(name)
    for recipe in ("uniform-iq2_xxs", "uniform-q4_k", "uniform-q2_k"):
        plan = dynq.plan(source, recipe)
        raw, error = {}, {}
        for power in (0, -38, 40):  # sums of (1..4)·2^power over counts of 8: peaks of 2^(power - 1)
            imatrix = imatrix_for(source)
            entry = imatrix.entries[name]
            entry.sums = ((1 + np.arange(entry.sums.size) % 4) * 2.0**power).astype(np.float32).reshape(1, -1)
            out = GGUFModel(dynq.quantize(plan, tmp_path / f"{recipe}{power}.gguf", imatrix=imatrix, ctx=CTX).files[0])
            raw[power] = out.raw(name)
            error[power] = float(np.linalg.norm(out.load(name) - weights) / np.linalg.norm(weights))
        np.testing.assert_array_equal(raw[-38], raw[0])
        assert error[40] == pytest.approx(error[0], rel=0.01), recipe


# --- promises of docs/reliability.md that each need their own case ------------------------------------------------


NAN_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ1_M", "TQ2_0", "MXFP4"]


@pytest.mark.parametrize("target", NAN_TYPES)
def test_nan_stops_with_the_tensor_name_for_every_type_family(target: str, tmp_path: Path) -> None:
    """Float copies, legacy, K, table and lattice i-quants, ternary and MXFP4: a NaN never reaches ggml."""
    source = model_with(tmp_path / "m.gguf", {"blk.1.ffn_up.weight": lambda v: v.__setitem__((3, 5), np.nan)},
                        n_embd=256)  # fmt: skip
    plan = dynq.plan(source, "f16")
    at = dynq.qtype(target)
    tensors = [dataclasses.replace(p, qtype=at) if p.info.name == "blk.1.ffn_up.weight" else p for p in plan.tensors]
    plan = dataclasses.replace(plan, tensors=tensors)
    imatrix = tmp_path / "m.imatrix.gguf"
    write_imatrix_gguf(imatrix_for(source), imatrix)
    with pytest.raises(DynqError, match=r"blk\.1\.ffn_up\.weight.*NaN"):
        dynq.quantize(plan, tmp_path / "out.gguf", imatrix=imatrix, ctx=dynq.RunContext(threads=1))
    assert not (tmp_path / "out.gguf").exists()


def test_a_recipe_over_one_mib_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nrules:\n" + "  - {match: 'attn_q', type: q4_k}\n" * 40_000)
    assert big.stat().st_size > 2**20
    started = time.perf_counter()
    with pytest.raises(DynqError, match="at most 1 MiB"):
        load_recipe(str(big))
    assert time.perf_counter() - started < 1  # refused by its size, before any parsing


def test_a_modelfile_refuses_what_it_cannot_quote_and_drops_stops_it_cannot_hold(tmp_path: Path) -> None:
    from dynq.deploy.ollama import Vocab, modelfile

    source = write_synthetic("llama", tmp_path / "tiny.gguf")
    chat = with_chat_template(source, tmp_path / "chat.gguf", CHATML)
    vocab = Vocab("<s>", "<|im_end|>", False, ("<|im_end|>", 'say "bye"', "two\nlines", "bell\x07"))
    written = modelfile(GGUFModel(chat), vocab, "chat.gguf", 0.6, 0.05).text
    stops = [line for line in written.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<|im_end|>"']
    quoted = with_chat_template(source, tmp_path / "quoted.gguf", CHATML.replace("named SmolLM", 'named """x'))
    with pytest.raises(DynqError, match='"""'):
        modelfile(GGUFModel(quoted), vocab, "quoted.gguf", 0.6, 0.05)
