"""A Hugging Face checkpoint folder is checked as a whole before any work (sources/checkpoint_check.py): a missing
shard or tensor, an index naming a file elsewhere, a link out of the folder, a pipe or a folder where a file
belongs, a block count beyond the weights, JSON nested a hundred thousand deep, a context length of 2**70 and a
crafted safetensors header each end in one line and no output; a Hugging Face cache snapshot, shards without an
index and links within the folder are read as they are. transformers' own warnings reach the terminal cleaned.

The cases of ../shared/design/probe-2026-12.md N1, N2, N3, N9, N11 (checkpoint) and N12, each on a tiny Qwen2
checkpoint copied into tmp_path (seed files hard-linked: every change replaces a file).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest

import dynq
from dynq.errors import BadInput, DynqError
from dynq.sources.checkpoint import checkpoint_fingerprint
from dynq.sources.checkpoint_check import stored_as_built
from fuzz_checkpoint import INDEX, fresh_copy, index_of, rewrite, save_index, tensors_of, write_st
from hf_checkpoints import tiny_qwen2

pytestmark = pytest.mark.model  # the checkpoints carry the Qwen2.5 tokenizer, exported once from the zoo

SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("single") / "hf")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("sharded") / "hf", shards=2)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynq.cli", *args], capture_output=True, text=True, timeout=120)


def quantize_is_refused(folder: Path, tmp_path: Path, *words: str) -> str:
    """`dynq quantize` of `folder`: exit 1, one line of stderr holding `words`, and nothing under the output."""
    out = tmp_path / "quantized.gguf"
    done = cli("quantize", str(folder), "-r", "q8_0", "-o", str(out))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines[0]
    assert not list(tmp_path.glob("quantized*")) and not list(tmp_path.glob(".quantized*"))
    return lines[0]


class _Hung(Exception):
    pass


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail rather than hang: a pipe opened for reading waits for a writer forever."""

    def hung(signum: int, frame: FrameType | None) -> None:
        raise _Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(folder: Path, *words: str) -> str:
    """`dynq.plan` of `folder` raises one line of BadInput holding `words` (within 60 s: never a hang)."""
    with within(60), pytest.raises(BadInput) as e:
        dynq.plan(str(folder), "q8_0")
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def planned_names(folder: Path) -> list[str]:
    with within(60):
        return [p.info.name for p in dynq.plan(str(folder), "q8_0").tensors]


# --- N1: a shard or a tensor missing, or twice ---------------------------------------------------------------------


def test_a_missing_shard_without_an_index_is_named(sharded: Path, tmp_path: Path) -> None:
    case = fresh_copy(sharded, tmp_path / "hf")
    (case / INDEX).unlink()
    (case / SHARD_2).unlink()
    quantize_is_refused(case, tmp_path, SHARD_2, "missing")


def test_complete_shards_without_an_index_are_read_together(single: Path, sharded: Path, tmp_path: Path) -> None:
    case = fresh_copy(sharded, tmp_path / "hf")
    (case / INDEX).unlink()
    assert planned_names(case) == planned_names(single)


def test_a_tensor_missing_from_the_only_shard_is_named(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    tensors = tensors_of(case / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    write_st(case / "model.safetensors", tensors)
    quantize_is_refused(case, tmp_path, "model.layers.1.mlp.down_proj.weight", "none of its safetensors files")


def test_a_tensor_in_two_shards_is_refused(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    norm = tensors_of(case / "model.safetensors")["model.norm.weight"]
    write_st(case / "model-extra.safetensors", {"model.norm.weight": norm})
    refused(case, "model.norm.weight", "also in model-extra.safetensors")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("removed", "does not name it"),
        ("moved", f"puts it in {SHARD_1}"),
        ("renamed", f"{SHARD_1}: does not hold tensor model.norm.weight.x"),
        ("dropped", "model.norm.weight, which config.json calls for, is in none"),
    ],
)
def test_the_index_and_the_shards_agree(sharded: Path, tmp_path: Path, change: str, says: str) -> None:
    case = fresh_copy(sharded, tmp_path / "hf")
    index = index_of(case)
    weight_map = index["weight_map"]
    shard = weight_map["model.norm.weight"]
    assert shard == SHARD_2
    if change == "removed":
        del weight_map["model.norm.weight"]
    elif change == "moved":
        weight_map["model.norm.weight"] = SHARD_1
    elif change == "renamed":
        weight_map["model.norm.weight.x"] = SHARD_1
    else:  # from the shard and the index alike: only config.json knows it is missing
        del weight_map["model.norm.weight"]
        tensors = tensors_of(case / shard)
        del tensors["model.norm.weight"]
        write_st(case / shard, tensors)
    save_index(case, index)
    refused(case, says)


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (["model-00001-of-00002.safetensors", "model-00002-of-00003.safetensors"], "two numberings"),
        (["model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors"], "numbered 0 of 2"),
    ],
)
def test_shards_are_numbered_one_to_n(sharded: Path, tmp_path: Path, names: list[str], says: str) -> None:
    case = fresh_copy(sharded, tmp_path / "hf")
    (case / INDEX).unlink()
    for old, new in zip((SHARD_1, SHARD_2), names, strict=True):
        if old != new:
            (case / old).rename(case / new)
    refused(case, says)


def test_weights_stored_as_pytorch_bin_are_named(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    (case / "model.safetensors").unlink()
    (case / "pytorch_model.bin").write_bytes(b"PK")
    refused(case, "pytorch_model*.bin", "safetensors")


@pytest.mark.parametrize(
    ("quantization", "all_required"),
    [(None, True), ({"quant_method": "fp8"}, True), ({"quant_method": "gptq"}, False),
     ({"quant_method": "mxfp4"}, False), ({"quant_method": "compressed-tensors"}, False), ("odd", False)],
)  # fmt: skip
def test_quantized_checkpoints_with_other_names_are_checked_by_shape_alone(
    quantization: object, all_required: bool
) -> None:
    """GPTQ stores `qweight` where transformers builds `weight`: requiring every built name would refuse it."""
    config = {} if quantization is None else {"quantization_config": quantization}
    assert stored_as_built(config) is all_required


# --- N3: nothing outside the folder --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "dotdot", "subfolder"])
def test_an_index_naming_a_file_elsewhere_is_refused(sharded: Path, tmp_path: Path, where: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.link(sharded / SHARD_1, outside / "secret.safetensors")
    case = fresh_copy(sharded, tmp_path / "hf")
    target = {"absolute": str(outside / "secret.safetensors"), "dotdot": "../outside/secret.safetensors",
              "subfolder": f"sub/{SHARD_1}"}[where]  # fmt: skip
    if where == "subfolder":
        (case / "sub").mkdir()
        os.link(sharded / SHARD_1, case / "sub" / SHARD_1)
    index = index_of(case)
    index["weight_map"] = {t: target if s == SHARD_1 else s for t, s in index["weight_map"].items()}
    save_index(case, index)
    if where == "absolute":  # the probe's command, end to end
        quantize_is_refused(case, tmp_path, INDEX, "not a file of this folder")
    else:
        refused(case, INDEX, repr(target), "not a file of this folder")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_link_out_of_the_folder_is_refused(single: Path, tmp_path: Path, name: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(single / name, elsewhere / name)
    case = fresh_copy(single, tmp_path / "hf")
    (case / name).unlink()
    (case / name).symlink_to(elsewhere / name)
    refused(case, f"{name}: a link to {elsewhere / name}, outside the checkpoint folder")


def test_a_hugging_face_cache_snapshot_and_links_inside_are_read(single: Path, sharded: Path, tmp_path: Path) -> None:
    """huggingface_hub's layout: models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH; and shards kept in a
    subfolder and linked from the checkpoint's own."""
    repo = tmp_path / "hub" / "models--tiny--qwen2"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, p in enumerate(sorted(sharded.iterdir())):
        os.link(p, repo / "blobs" / f"{i:040x}")
        (snapshot / p.name).symlink_to(f"../../blobs/{i:040x}")
    linked = fresh_copy(sharded, tmp_path / "linked")
    (linked / "store").mkdir()
    for name in (SHARD_1, SHARD_2):
        (linked / name).rename(linked / "store" / name)
        (linked / name).symlink_to(Path("store") / name)
    assert planned_names(snapshot) == planned_names(linked) == planned_names(single)


# --- N12 and N11: pipes, devices and folders where files belong ---------------------------------------------------


def test_a_pipe_named_model_safetensors_does_not_hang(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    (case / "model.safetensors").unlink()
    os.mkfifo(case / "model.safetensors")
    quantize_is_refused(case, tmp_path, "model.safetensors: a pipe")


@pytest.mark.parametrize("name", ["tokenizer.json", INDEX, "notes.txt", "named-by-the-index"])
def test_a_pipe_anywhere_in_the_folder_is_refused_unopened(sharded: Path, tmp_path: Path, name: str) -> None:
    case = fresh_copy(sharded, tmp_path / "hf")
    if name == "named-by-the-index":
        name = "model-pipe.safetensors"
        index = index_of(case)
        index["weight_map"]["model.norm.weight"] = name
        save_index(case, index)
    (case / name).unlink(missing_ok=True)
    os.mkfifo(case / name)
    refused(case, f"{name}: a pipe")
    with within(60), pytest.raises(BadInput, match="a pipe"):  # what finds a cached conversion reads no pipe either
        checkpoint_fingerprint(case, tmp_path / "cache")


@pytest.mark.parametrize("link", [False, True])
def test_a_folder_named_as_a_shard_is_refused(single: Path, tmp_path: Path, link: bool) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    (case / "model.safetensors").unlink()
    if link:
        (tmp_path / "somewhere").mkdir()
        (case / "model.safetensors").symlink_to(tmp_path / "somewhere")
    else:
        (case / "model.safetensors").mkdir()
    refused(case, "model.safetensors", "is a folder")


def test_a_device_as_a_shard_is_refused(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    (case / "model.safetensors").unlink()
    (case / "model.safetensors").symlink_to("/dev/zero")
    refused(case, "model.safetensors: a device")


# --- N2: the block count against the blocks present ---------------------------------------------------------------


def _config(case: Path, **values: object) -> None:
    config = json.loads((case / "config.json").read_text())
    config.update(values)
    config.pop("layer_types", None)
    rewrite(case / "config.json", json.dumps(config).encode())


@pytest.mark.parametrize("layers", [3, 100, 20_000])
def test_more_blocks_than_the_weights_hold_is_refused_at_once(single: Path, tmp_path: Path, layers: int) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    _config(case, num_hidden_layers=layers)
    started = time.perf_counter()
    refused(case, f"num_hidden_layers is {layers}, but the weights hold blocks 0-1 (model.layers.N)")
    assert time.perf_counter() - started < 1.0  # 20,000 took 43 s and 1.5 GB to plan before


def test_the_probes_100_blocks_on_2_is_one_line(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    _config(case, num_hidden_layers=100)
    quantize_is_refused(case, tmp_path, "config.json: num_hidden_layers is 100")


def test_fewer_blocks_than_the_weights_hold_is_refused(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    _config(case, num_hidden_layers=1)
    with pytest.raises(DynqError, match=r"model\.layers\.1"):
        dynq.plan(str(case), "q8_0")


# --- N11: deep JSON, values past their type, crafted headers -----------------------------------------------------


@pytest.mark.parametrize("where", ["config.json", "header", "index"])
def test_json_nested_a_hundred_thousand_deep_is_one_line(sharded: Path, tmp_path: Path, where: str) -> None:
    case = fresh_copy(sharded, tmp_path / "hf")
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "config.json":
        rewrite(case / "config.json", b'{"x": ' + deep + b"}")
        refused(case, "config.json: nests lists or objects more than 64 levels deep")
    elif where == "index":
        rewrite(case / INDEX, deep)
        refused(case, f"{INDEX}: nests lists or objects more than 64 levels deep")
    else:
        rewrite(case / SHARD_1, struct.pack("<Q", len(deep)) + deep)
        refused(case, f"{SHARD_1}: the safetensors header is nested too deeply")


def test_a_context_length_of_2_70_is_refused_by_plan_and_quantize(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    _config(case, max_position_embeddings=2**70)
    refused(case, "max_position_embeddings is 1180591620717411303424")
    quantize_is_refused(case, tmp_path, "max_position_embeddings")


def test_a_hyperparameter_that_is_not_a_number_is_refused(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    config = json.loads((case / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = float("nan")
    rewrite(case / "config.json", json.dumps(config).encode())  # NaN: Python's json writes and reads it
    refused(case, "rope.freq_base is nan, not a finite number")


def _header(case: Path) -> tuple[dict[str, dict[str, object]], bytes]:
    raw = (case / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header: dict[str, dict[str, object]] = json.loads(raw[8 : 8 + n])
    return header, raw[8 + n :]


def _with_header(case: Path, header: bytes, data: bytes) -> None:
    rewrite(case / "model.safetensors", struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    ("craft", "says"),
    [
        ("overlap", "byte range"),  # lm_head reads the embedding's bytes (the probe's st_overlap)
        ("trailing", "bytes follow the last tensor"),
        ("twice", "names model.norm.weight twice"),
        ("huge", "more than the format allows"),
    ],
)
def test_a_crafted_safetensors_header_is_refused(single: Path, tmp_path: Path, craft: str, says: str) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    header, data = _header(case)
    if craft == "overlap":
        header["lm_head.weight"]["data_offsets"] = header["model.embed_tokens.weight"]["data_offsets"]
        _with_header(case, json.dumps(header).encode(), data)
    elif craft == "trailing":
        _with_header(case, json.dumps(header).encode(), data + b"\0" * 8)
    elif craft == "twice":
        text = json.dumps(header)
        norm = json.dumps({"model.norm.weight": header["model.norm.weight"]})[1:-1]
        _with_header(case, (text[:-1] + ", " + norm + "}").encode(), data)
    else:
        rewrite(case / "model.safetensors", struct.pack("<Q", 2**63) + b"{}")
    refused(case, "model.safetensors", says)


# --- N9: transformers' warnings, cleaned --------------------------------------------------------------------------

_EVIL = "\x1b]8;;http://evil\x07 click \x1b]8;;\x07\x1b[31mRED[/x]"


def test_transformers_warnings_reach_the_terminal_cleaned(single: Path, tmp_path: Path) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    config = json.loads((case / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": _EVIL, "rope_theta": 1000000.0}
    rewrite(case / "config.json", json.dumps(config).encode())
    done = cli("plan", str(case), "-r", "q8_0")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert "transformers: Missing validation function" in done.stderr and "\\x1b]8;;http://evil" in done.stderr


def test_relayed_records_come_from_dynqs_logger(single: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    case = fresh_copy(single, tmp_path / "hf")
    config = json.loads((case / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": _EVIL, "rope_theta": 1000000.0}
    rewrite(case / "config.json", json.dumps(config).encode())
    handlers = logging.getLogger("transformers").handlers[:]
    with caplog.at_level(logging.WARNING):
        dynq.open_source(str(case))
    relayed = [r for r in caplog.records if r.getMessage().startswith("transformers: ")]
    assert relayed and all(r.name.startswith("dynq.") and "\x1b" not in r.getMessage() for r in relayed)
    assert logging.getLogger("transformers").handlers == handlers  # put back as they were
