"""An interrupted quantize goes on with --resume and gives the bytes of an uninterrupted run, of the source as it is
now (a tensor changed since is encoded again, however small the change); a leftover is never silently reused or
overwritten; two runs writing one output refuse each other. The encode cache serves a tensor only for the same
source bytes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFReader

import dynq
from dynq.executors import Serial
from dynq.gguf_io.partial import PartialOutput, partial_dir
from dynq.gguf_io.reader import GGUFModel
from dynq.gguf_io.writer import StreamingWriter
from dynq.lab.synthetic import write_synthetic
from dynq.sources.content import current_digest
from held_run import start_held
from runs import measurements
from tiny_models import llama_tensors, write_gguf

RECIPE = "uniform-q4_k"
JOURNALED = "dynq.gguf_io.partial:PartialOutput.record"  # a tensor's bytes are on disk and in the journal


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic("deepseek2", tmp_path_factory.mktemp("resume") / "tiny-deepseek2.gguf")


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("reference") / "whole.gguf"
    done = run(model, out)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def quantize_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--verbose", "quantize", str(model), "-r", RECIPE, "-o", str(out), "--threads", "1", *extra]


def command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynq.cli", *quantize_args(model, out, *extra)]


def run(model: Path, out: Path, *extra: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(command(model, out, *extra), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)  # fmt: skip


def journaled(out: Path) -> int:
    journal = partial_dir(out) / "journal.jsonl"
    return max(0, len(journal.read_bytes().splitlines()) - 1) if journal.exists() else 0


def resumes_to(reference: bytes, model: Path, out: Path) -> None:
    """`--resume` continues the kept tensors and ends with the uninterrupted run's bytes."""
    done = run(model, out, "--resume")
    assert done.returncode == 0 and "resuming after" in done.stderr, done.stderr
    assert out.read_bytes() == reference


def start_and_kill(model: Path, out: Path, after_tensors: int, sig: int, resume: bool) -> int:
    """Start a quantize, hold it once it has journaled `after_tensors` more tensors and send it `sig` there (a run
    that ends first is not signalled); returns its exit code."""
    args = quantize_args(model, out, *(["--resume"] if resume else []))
    proc, held = start_held(JOURNALED, after_tensors, args)
    if held:
        proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


def test_sigkill_at_random_points_then_resume_gives_identical_bytes(model: Path, reference: bytes,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "out.gguf"
    rng = random.Random(15)
    kills = 0
    for attempt in range(5):
        code = start_and_kill(model, out, rng.randint(1, 12), signal.SIGKILL, resume=attempt > 0)
        if code == -signal.SIGKILL:
            kills += 1
            assert not out.exists()
    assert kills >= 3, "the runs finished before they could be killed: make the model bigger"
    assert journaled(out) > 0
    done = run(model, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference
    assert not partial_dir(out).exists()


def test_sigterm_keeps_the_partial_for_resume(model: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    code = start_and_kill(model, out, 3, signal.SIGTERM, resume=False)
    assert code != 0 and not out.exists()
    assert journaled(out) >= 3
    done = run(model, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference


def test_a_leftover_is_reported_not_reused(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    start_and_kill(model, out, 2, signal.SIGKILL, resume=False)
    done = run(model, out)
    assert done.returncode == 1
    assert "--resume" in done.stderr and "Traceback" not in done.stderr
    assert journaled(out) >= 2 and not out.exists()


def test_resume_from_other_inputs_is_refused(model: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    start_and_kill(model, out, 2, signal.SIGKILL, resume=False)
    other = write_synthetic("llama", tmp_path / "other.gguf")
    done = subprocess.run([sys.executable, "-m", "dynq.cli", "quantize", str(other), "-r", RECIPE, "-o", str(out),
                           "--resume"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "other inputs" in done.stderr, done.stderr
    assert not out.exists()
    # the refused resume lost nothing: the right inputs still continue the kept tensors
    assert journaled(out) >= 2
    resumes_to(reference, model, out)


def test_damaged_partial_is_redone_from_the_damage(model: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    start_and_kill(model, out, 8, signal.SIGKILL, resume=False)
    lines = (partial_dir(out) / "journal.jsonl").read_text().splitlines()
    fourth = json.loads(lines[4])
    shard = partial_dir(out) / out.name
    with shard.open("r+b") as f:  # flip one byte of the fourth tensor
        f.seek(fourth["start"])
        byte = f.read(1)
        f.seek(fourth["start"])
        f.write(bytes([byte[0] ^ 0xFF]))
    done = run(model, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resuming after 3 verified tensors" in done.stderr
    assert out.read_bytes() == reference


def test_a_full_disk_keeps_the_partial_for_resume(model: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    done = run(model, out, limit_bytes=len(reference) // 2)
    assert done.returncode == 1 and "writing failed" in done.stderr and "--resume" in done.stderr, done.stderr
    assert not out.exists() and journaled(out) > 0
    done = run(model, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference


def test_two_writers_of_one_output_refuse_each_other(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    holder = PartialOutput(out)
    holder.lock()  # another run writing this output
    try:
        done = run(model, out)
    finally:
        holder.unlock()
    assert done.returncode == 1 and "another dynq run is writing" in done.stderr, done.stderr
    assert not out.exists()
    done = run(model, out)
    assert done.returncode == 0, done.stderr


def test_existing_output_needs_force(model: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"an earlier result")
    done = run(model, out)
    assert done.returncode == 1 and "--force" in done.stderr
    assert out.read_bytes() == b"an earlier result"
    done = run(model, out, "--force")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference
    assert os.listdir(tmp_path) == ["out.gguf"]


# --- a source that changed: every byte counts (N5) ------------------------------------------------------------------


def interrupt_after(monkeypatch: pytest.MonkeyPatch, tensors: int) -> None:
    """The next quantize is interrupted (as by Ctrl-C) once it has written `tensors` tensors."""
    original = StreamingWriter.write
    calls = 0

    def write(self: StreamingWriter, *args: object, **kwargs: object) -> None:
        nonlocal calls
        if calls == tensors:
            raise KeyboardInterrupt
        calls += 1
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamingWriter, "write", write)


def big_tensor_model(path: Path) -> Path:
    """A llama whose ffn_down tensors (2 MiB of BF16) are larger than the sampled fingerprint reads in full."""
    write_gguf(path, llama_tensors(n_embd=256, n_ff=4096))
    return path


def change_between_windows(path: Path, tensor: str) -> None:
    """10,000 weights of `tensor` set to 10.0, in bytes the sampled fingerprint does not read."""
    start = next(int(t.data_offset) for t in GGUFReader(path).tensors if t.name == tensor)
    fingerprint = GGUFModel(path).fingerprint()
    with path.open("r+b") as f:
        f.seek(start + 70_000)
        f.write(b"\x20\x41" * 10_000)
    assert GGUFModel(path).fingerprint() == fingerprint  # the blind spot: the sampled fingerprint sees no change


def test_a_source_changed_between_fingerprint_windows_is_encoded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = big_tensor_model(tmp_path / "src.gguf")
    ctx = dynq.RunContext(threads=1, cache_dir=tmp_path / "cache")
    out = tmp_path / "out.gguf"
    plan = dynq.plan(str(source), RECIPE, ctx=ctx)
    names = [t.info.name for t in plan.tensors]
    with monkeypatch.context() as m:
        interrupt_after(m, 12)
        with pytest.raises(KeyboardInterrupt):
            dynq.quantize(plan, out, ctx=ctx)
    assert journaled(out) == 12 and names.index("blk.0.ffn_down.weight") < 12
    change_between_windows(source, "blk.0.ffn_down.weight")
    resumed = dynq.quantize(dynq.plan(str(source), RECIPE, ctx=ctx), out, ctx=ctx, resume=True)
    assert "blk.0.ffn_down.weight changed in the source since the interrupted run" in caplog.text
    fresh = dynq.quantize(dynq.plan(str(source), RECIPE, ctx=ctx), tmp_path / "fresh.gguf", ctx=ctx)
    assert resumed.files[0].read_bytes() == fresh.files[0].read_bytes()


@pytest.mark.parametrize("executor", [None, Serial()], ids=["here", "tasks"])
def test_the_journal_holds_each_source_tensors_digest(
    model: Path, reference: bytes, executor: Serial | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Digests made here and by workers (one per expert, combined) are the digests of the tensors as they are."""
    ctx = dynq.RunContext(threads=1, cache_dir=tmp_path / "cache")
    out = tmp_path / "out.gguf"
    plan = dynq.plan(str(model), RECIPE, ctx=ctx)
    with monkeypatch.context() as m:
        interrupt_after(m, 28)  # past the first expert tensors (24-26)
        with pytest.raises(KeyboardInterrupt):
            dynq.quantize(plan, out, ctx=ctx, executor=executor)
    lines = [json.loads(line) for line in (partial_dir(out) / "journal.jsonl").read_text().splitlines()[1:]]
    source = GGUFModel(model)
    infos = {t.name: t for t in source.tensors}
    assert any(len(infos[line["name"]].shape) == 3 for line in lines)  # expert tensors among them
    for line in lines:
        assert line["source"] == current_digest(source, infos[line["name"]]), line["name"]
    done = dynq.quantize(plan, out, ctx=ctx, executor=executor, resume=True)
    assert done.files[0].read_bytes() == reference


def test_reused_encodings_are_for_the_same_source_bytes(tmp_path: Path) -> None:
    source = big_tensor_model(tmp_path / "src.gguf")
    ctx = dynq.RunContext(threads=1, cache_dir=tmp_path / "cache")

    def quantize(name: str, reuse: bool = True) -> bytes:
        plan = dynq.plan(str(source), RECIPE, ctx=ctx)
        return dynq.quantize(plan, tmp_path / name, ctx=ctx, reuse_encoded=reuse).files[0].read_bytes()

    before = quantize("before.gguf")
    change_between_windows(source, "blk.1.ffn_down.weight")
    after = quantize("after.gguf")
    assert after != before and after == quantize("fresh.gguf", reuse=False)
    entries = sorted((tmp_path / "cache" / "encoded").rglob("*.bin"))
    assert entries
    for entry in entries:  # a damaged entry is a miss, encoded again and put back whole
        data = bytearray(entry.read_bytes())
        data[len(data) // 3] ^= 0xFF
        entry.write_bytes(bytes(data))
    assert quantize("again.gguf") == after
    damaged = [e for e in entries if hashlib.sha256(e.read_bytes()[:-32]).digest() != e.read_bytes()[-32:]]
    assert len(damaged) == 1  # only the entry of blk.1.ffn_down's old bytes, which nothing asks for any more


JOURNAL_EDITS: dict[str, Callable[[list[str]], list[str]]] = {
    "null header": lambda lines: ["null", *lines[1:]],
    "list header": lambda lines: ["[1, 2]", *lines[1:]],
    "huge count": lambda lines: [lines[0].replace('"tensors": ', '"tensors": 1e400, "x": '), *lines[1:]],
    "start as text": lambda lines: [lines[0], re.sub(r'"start": (\d+)', r'"start": "\1"', lines[1]), *lines[2:]],
    "negative start": lambda lines: [*lines[:2], lines[2].replace('"start": ', '"start": -'), *lines[3:]],
    "shard -1": lambda lines: [lines[0], lines[1].replace('"shard": 0', '"shard": -1'), *lines[2:]],
    "deep header": lambda lines: ["[" * 100_000 + "]" * 100_000, *lines[1:]],
    "deep tensor line": lambda lines: [lines[0], lines[1], '{"a":' * 100_000, *lines[2:]],
}


@pytest.mark.parametrize("edit", JOURNAL_EDITS)
def test_an_edited_journal_is_never_a_traceback(edit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """N11: a journal edited by hand keeps at most the tensors it still proves; the resume gives the same bytes."""
    source = write_synthetic("llama", tmp_path / "m.gguf")
    ctx = dynq.RunContext(threads=1, cache_dir=tmp_path / "cache")
    plan = dynq.plan(str(source), RECIPE, ctx=ctx)
    whole = dynq.quantize(plan, tmp_path / "whole.gguf", ctx=ctx).files[0].read_bytes()
    out = tmp_path / "out.gguf"
    with monkeypatch.context() as m:
        interrupt_after(m, 6)
        with pytest.raises(KeyboardInterrupt):
            dynq.quantize(plan, out, ctx=ctx)
    journal = partial_dir(out) / "journal.jsonl"
    journal.write_text("\n".join(JOURNAL_EDITS[edit](journal.read_text().splitlines())) + "\n")
    with pytest.raises(dynq.ResumeRequired):
        dynq.quantize(plan, out, ctx=ctx)
    assert dynq.quantize(plan, out, ctx=ctx, resume=True).files[0].read_bytes() == whole


# --- imatrix and profile: the same on their own units (chunks, tensors and probes) ------------------------------

CALIB = " ".join(f"the {w} of and to in def return" for w in "abcdefghijklmnopqrstuvwxyz" * 40)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dense")
    (folder / "calib.txt").write_text(CALIB)
    return write_synthetic("llama", folder / "tiny-llama.gguf"), folder / "calib.txt"


def killed_then_resumed(args: list[str], kept: str, env: dict[str, str]) -> str:
    """Run `dynq ARGS`, SIGKILL it once `kept` (a function that saves its progress) has returned, check that a rerun
    without --resume refuses, then resume; returns the resumed run's stderr."""
    base = [sys.executable, "-m", "dynq.cli", "--verbose", *args]
    proc, held = start_held(kept, 1, ["--verbose", *args], env=env)
    assert held, "the run ended before it saved its progress: give it more work"
    proc.kill()
    proc.wait(timeout=60)
    again = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr, again.stderr
    resumed = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    return resumed.stderr


def test_an_interrupted_imatrix_resumes_to_the_same_bytes(dense: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = dense
    env = os.environ | {"DYNQ_CACHE_DIR": str(tmp_path / "cache")}
    common = ["imatrix", str(model), "--text", str(text), "--ctx", "32", "--threads", "1"]
    whole = subprocess.run([sys.executable, "-m", "dynq.cli", *common, "-o", str(tmp_path / "whole.gguf")],
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out.gguf"
    stderr = killed_then_resumed([*common, "-o", str(out)], "dynq.calib.collector:ChunkProgress.maybe_save", env)
    assert "resuming after" in stderr
    assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert not partial_dir(out).exists()


def test_an_interrupted_profile_resumes_to_the_same_measurements(dense: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = dense
    common = ["profile", str(model), "--text", str(text), "--ctx", "32", "--chunks", "2", "--rows", "64",
              "--group-blocks", "1", "--threads", "1"]  # fmt: skip
    whole_env = os.environ | {"DYNQ_CACHE_DIR": str(tmp_path / "cache-whole")}
    whole = subprocess.run([sys.executable, "-m", "dynq.cli", *common, "-o", str(tmp_path / "whole.json")],
                           capture_output=True, text=True, timeout=600, env=whole_env)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    env = os.environ | {"DYNQ_CACHE_DIR": str(tmp_path / "cache")}
    saved = "dynq.budget.profile:ProfileProgress.save"
    stderr = killed_then_resumed([*common, "-o", str(tmp_path / "out.json")], saved, env)
    assert "resuming after" in stderr
    assert measurements(tmp_path / "out.json") == measurements(tmp_path / "whole.json")
    assert not list((tmp_path / "cache" / "profiles").glob(".*.dynq-partial"))  # kept measurements: gone


def test_ctrl_c_keeps_the_partial_for_resume(model: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    code = start_and_kill(model, out, 3, signal.SIGINT, resume=False)
    assert code == 130 and not out.exists()
    assert journaled(out) >= 3
    resumes_to(reference, model, out)


def test_a_resume_with_another_encoder_is_refused(model: Path, reference: bytes, tmp_path: Path) -> None:
    """The journal holds llama.cpp's encoder's tensors: dynq's torch encoders may not continue them."""
    out = tmp_path / "out.gguf"
    start_and_kill(model, out, 3, signal.SIGKILL, resume=False)
    done = run(model, out, "--resume", "--backend", "torch")
    assert done.returncode == 1 and "other inputs" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and journaled(out) >= 3
    resumes_to(reference, model, out)
