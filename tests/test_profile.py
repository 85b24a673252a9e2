"""The sensitivity profile: encode errors per type, probe sensitivities from real KL divergence, the work file left
as it was, the JSON file and its cache, and the additive model against the KL divergence of real mixed quants."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dynq
from dynq.budget import profile_file
from dynq.budget.distortion import probe_groups, profiled_tensors, sample_rows, tensor_errors
from dynq.budget.probes import LiveProbes, ProbeFile
from dynq.budget.profile import ProbeTask, profile
from dynq.budget.profile_file import (
    PROFILE_VERSION,
    Method,
    ModelRef,
    Probe,
    Profile,
    TensorProfile,
    TextRef,
    cache_key,
    imatrix_ref,
    text_ref,
)
from dynq.calib.collector import collect_imatrix
from dynq.calib.text import Text
from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.core.qtypes import qtype
from dynq.core.tensors import TensorInfo
from dynq.errors import DynqError
from dynq.eval.evaluate import evaluate
from dynq.gguf_io.reader import GGUFModel
from dynq.kernels.ggml import GgmlBackend
from dynq.lab.synthetic import write_synthetic
from dynq.llamacpp.runtime import LlamaRuntime
from runs import OneThreadTasks

CALIB = " ".join(f"the {w} of and to in def return" for w in "abcdefghijklmnopqrstuvwxyz" * 20)
TEXT = Text(CALIB, "test-calib")
LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
TYPES = ("IQ2_XXS", *LADDER)  # few types: the IQ grids cost seconds to build, once per process


def run_profile(source: Path, imatrix: Imatrix | None, ctx: dynq.RunContext) -> Profile:
    return profile(source, imatrix, TEXT, types=TYPES, rows=128, n_ctx=64, chunks=2, ctx=ctx)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def tiny(folder: Path) -> Path:
    return write_synthetic("llama", folder / "tiny.gguf")  # BF16 matrices, F32 norms


@pytest.fixture(scope="module")
def imatrix(tiny: Path) -> Imatrix:
    return collect_imatrix(tiny, CALIB, [TEXT.provenance], n_ctx=64, n_chunks=2, ctx=dynq.RunContext(threads=2))


@pytest.fixture(scope="module")
def made(tiny: Path, imatrix: Imatrix, folder: Path) -> tuple[Profile, list[dynq.Progress], str]:
    """The profile of the tiny model, the progress it reported, and the reference's sha256 before it ran."""
    before = sha256(tiny)
    steps: list[dynq.Progress] = []
    ctx = dynq.RunContext(threads=2, cache_dir=folder / "cache", progress=steps.append)
    return run_profile(tiny, imatrix, ctx), steps, before


def test_errors_fall_as_bits_rise(made: tuple[Profile, list[dynq.Progress], str]) -> None:
    prof = made[0]
    assert len(prof.tensors) == 16  # 7 matrices x 2 blocks, token_embd, output; norms are kept
    for name, t in prof.tensors.items():
        ladder = [t.errors[k] for k in LADDER]
        assert all(a > b for a, b in itertools.pairwise(ladder)), (name, ladder)
        assert t.errors["IQ2_XXS"] > t.errors["Q2_K"] > 0.01, name
        assert 0 <= t.errors["F16"] < t.errors["Q8_0"] < 1e-3
        assert t.errors["BF16"] == 0.0  # the stored type itself


def test_sensitivities_come_from_probes(made: tuple[Profile, list[dynq.Progress], str]) -> None:
    prof, steps, _ = made
    assert len(prof.probes) == 9  # 7 kinds over blocks 0-3, token_embd, output
    assert all(p.kld > 0 for p in prof.probes)
    assert all(t.sensitivity > 0 and np.isfinite(t.sensitivity) for t in prof.tensors.values())
    q = prof.tensors["blk.0.attn_q.weight"]
    assert q.group == "attn_q.weight@blk.0-3" and prof.tensors["blk.1.attn_q.weight"].sensitivity == q.sensitivity
    probe = next(p for p in prof.probes if p.group == q.group)
    # S_g · Σ e_t(probe type) is the group's measured KLD: the calibration the costs rest on
    total = sum(prof.tensors[n].costs()["Q2_K"] for n in probe.tensors)
    assert total == pytest.approx(probe.kld)
    assert {s.stage for s in steps} >= {"profile-errors", "profile-probes"}
    last = [s for s in steps if s.stage == "profile-probes"][-1]
    assert (last.done, last.total, last.unit) == (9, 9, "probes")
    assert prof.seconds["errors"] > 0 and prof.seconds["probes"] > 0


def test_the_reference_is_never_written_and_the_work_copy_goes(
    made: tuple[Profile, list[dynq.Progress], str], tiny: Path, folder: Path
) -> None:
    assert sha256(tiny) == made[2]
    assert list((folder / "cache" / "profiles").glob(".probe-*")) == []


def _float_copy(tiny: Path, stored: str, out: Path) -> Path:
    if stored == "BF16":
        return tiny
    data = dynq.recipe("f16").to_dict() | {"name": stored.lower()}
    data["rules"] = [{"match": ".", "type": stored}]
    dynq.quantize(dynq.plan(str(tiny), dynq.recipe_from_dict(data, "test")), out, ctx=dynq.RunContext(threads=2))
    return out


@pytest.mark.parametrize("stored", ["BF16", "F16", "F32"])
def test_a_probe_degrades_in_place_and_restores_byte_for_byte(
    tiny: Path, imatrix: Imatrix, tmp_path: Path, stored: str
) -> None:
    ref = _float_copy(tiny, stored, tmp_path / f"ref-{stored}.gguf")
    model = GGUFModel(ref)
    before = sha256(ref)
    infos = {t.name: t for t in profiled_tensors(model)}
    group = [infos["blk.0.ffn_down.weight"], infos["blk.1.ffn_down.weight"]]
    with ProbeFile(model, tmp_path / "work") as work:
        assert sha256(work.path) == before
        work.apply([(t, qtype("Q2_K")) for t in group], imatrix, GgmlBackend(2))
        assert sha256(work.path) != before
        probed = GGUFModel(work.path)
        for t in infos.values():
            a, b = model.load(t.name), probed.load(t.name)
            if t in group:  # Q2_K's damage, nothing more: the bytes went to the right place
                assert 0.01 < float(((a - b) ** 2).sum() / (a**2).sum()) < 0.2
                assert probed.ggml_type(t.name) == model.ggml_type(t.name)
            else:
                assert np.array_equal(a, b), t.name
        del probed
        work.restore()
        assert sha256(work.path) == before
        folder = work.folder
    assert not folder.exists()
    assert sha256(ref) == before


@pytest.mark.parametrize(("stored", "copied"), [("BF16", False), ("F16", False), ("F16", True)])
def test_live_probes_measure_what_a_freshly_loaded_copy_measures(
    tiny: Path, imatrix: Imatrix, tmp_path: Path, stored: str, copied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model stays open while its mapped file is rewritten: each probe must see its own group degraded and
    nothing left of the one before, exactly as a copy written out and loaded anew. `copied`: as if llama.cpp kept
    copies of the weights, so that every probe reloads."""
    if copied:
        opened = LiveProbes._open

        def copying(self: LiveProbes) -> LlamaRuntime:
            runtime = opened(self)
            runtime.weights_mapped = False
            return runtime

        monkeypatch.setattr(LiveProbes, "_open", copying)
    ref = _float_copy(tiny, stored, tmp_path / f"ref-{stored}.gguf")
    model = GGUFModel(ref)
    infos = {t.name: t for t in profiled_tensors(model)}
    ctx = dynq.RunContext(threads=2, cache_dir=tmp_path / "cache")
    groups = [["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"], ["blk.1.attn_v.weight"], ["output.weight"]]
    with LiveProbes(model, ref, TEXT, 64, 2, ctx) as live:
        assert live.runtime.weights_mapped != copied
        measured = [live.kld([(infos[n], qtype("Q2_K")) for n in g], imatrix, GgmlBackend(2)) for g in groups]
    for names, kld in zip(groups, measured, strict=True):
        with ProbeFile(model, tmp_path / "fresh") as work:
            work.apply([(infos[n], qtype("Q2_K")) for n in names], imatrix, GgmlBackend(2))
            fresh = evaluate(work.path, ref, TEXT.text, TEXT.provenance, n_ctx=64, n_chunks=2, ctx=ctx)
        assert kld == fresh.kld_mean > 0, names


def test_profile_file_round_trip(made: tuple[Profile, list[dynq.Progress], str], tmp_path: Path) -> None:
    prof = made[0]
    path = prof.save(tmp_path / "p.json")
    again = Profile.load(path)
    assert again == prof and again.costs() == prof.costs()
    data = json.loads(path.read_text())
    assert data["version"] == PROFILE_VERSION and data["method"]["probe_type"] == "Q2_K"
    assert set(data) >= {"model", "imatrix", "text", "method", "tensors", "probes", "seconds"}
    assert data["imatrix"]["datasets"] == ["test-calib"] and len(data["imatrix"]["sha256"]) == 64
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_call_reads_the_cache(
    made: tuple[Profile, list[dynq.Progress], str], tiny: Path, imatrix: Imatrix, folder: Path
) -> None:
    steps: list[dynq.Progress] = []
    ctx = dynq.RunContext(threads=2, cache_dir=folder / "cache", progress=steps.append)
    again = run_profile(tiny, imatrix, ctx)
    assert again == made[0]
    assert steps == []  # no error measured, no probe run, no reference computed


def test_the_cache_key_changes_with_its_inputs(imatrix: Imatrix) -> None:
    prof_text = text_ref(CALIB, "x")
    base = Method(128, "Q2_K", 4, 64, 2, TYPES)
    key = cache_key("f" * 64, imatrix_ref(imatrix), prof_text, base)
    assert key == cache_key("f" * 64, imatrix_ref(imatrix), prof_text, base)
    assert key != cache_key("e" * 64, imatrix_ref(imatrix), prof_text, base)
    assert key != cache_key("f" * 64, None, prof_text, base)
    assert key != cache_key("f" * 64, imatrix_ref(imatrix), text_ref(CALIB + ".", "x"), base)
    assert key != cache_key("f" * 64, imatrix_ref(imatrix), prof_text, Method(64, "Q2_K", 4, 64, 2, TYPES))


def test_wrong_model_and_bad_files_are_one_line_errors(
    made: tuple[Profile, list[dynq.Progress], str], tiny: Path, tmp_path: Path
) -> None:
    prof = made[0]
    prof.check_model(tiny)
    other = write_synthetic("llama", tmp_path / "other.gguf", seed=1)
    with pytest.raises(DynqError, match="made for another model"):
        prof.check_model(other)
    path = prof.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    bad = {
        "version": {**data, "version": 2},
        "old": {k: v for k, v in data.items() if k != "version"},
        "damaged": {**data, "probes": [{"group": "x"}]},
        "list": [1, 2],
    }
    for name, content in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    (tmp_path / "garbage.json").write_bytes(b"\x00\xffnot json")
    for name in [*bad, "garbage"]:
        with pytest.raises(DynqError) as err:
            Profile.load(tmp_path / f"{name}.json")
        assert "\n" not in str(err.value) and "dynq profile" in str(err.value), name
    with pytest.raises(DynqError, match="version 2"):
        Profile.load(tmp_path / "version.json")


def test_a_quantized_reference_is_refused(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8.gguf"
    dynq.quantize(dynq.plan(str(tiny), "uniform-q8_0"), out, ctx=dynq.RunContext(threads=2))
    with pytest.raises(DynqError, match=r"float reference \(F16/BF16/F32\).*dynq quantize SRC -r f16"):
        run_profile(out, None, dynq.RunContext(threads=2, cache_dir=tmp_path))


MIXES = {
    "high": [("attn_", "Q6_K"), (".", "Q5_K")],
    "middle": [("ffn_", "Q3_K"), (".", "Q4_K")],
    "low": [("ffn_", "IQ2_XXS"), ("attn_", "Q2_K"), (".", "Q3_K")],
}


def test_the_additive_model_predicts_real_mixes(
    made: tuple[Profile, list[dynq.Progress], str], tiny: Path, imatrix: Imatrix, folder: Path, tmp_path: Path
) -> None:
    prof = made[0]
    ctx = dynq.RunContext(threads=2, cache_dir=folder / "cache")
    predicted, measured = {}, {}
    for name, rules in MIXES.items():
        data = dynq.recipe("uniform-q8_0").to_dict() | {"name": name}
        data["rules"] = [{"match": m, "type": t} for m, t in rules]
        plan = dynq.plan(str(tiny), dynq.recipe_from_dict(data, "test"))
        out = tmp_path / f"{name}.gguf"
        dynq.quantize(plan, out, imatrix=imatrix, ctx=ctx)
        predicted[name] = prof.predicted_kld({t.info.name: t.qtype.name for t in plan.tensors if not t.kept})
        measured[name] = dynq.evaluate(out, str(tiny), text=TEXT, n_ctx=64, chunks=2, ctx=ctx).kld_mean
    ratios = {n: predicted[n] / measured[n] for n in MIXES}
    assert all(0.5 < r < 2 for r in ratios.values()), (predicted, measured)  # 0.84-1.09 when written
    assert sorted(MIXES, key=predicted.__getitem__) == sorted(MIXES, key=measured.__getitem__) == list(MIXES)


def test_rows_are_spread_over_every_expert_and_repeat() -> None:
    info = TensorInfo("blk.0.ffn_up_exps.weight", (256, 64, 8), qtype("BF16"))
    idx = sample_rows(info, 256, seed=0)
    assert len(idx) == 256 and len(set(idx.tolist())) == 256 and idx.min() >= 0 and idx.max() < 64 * 8
    assert np.bincount(idx // 64, minlength=8).tolist() == [32] * 8
    assert np.array_equal(idx, sample_rows(info, 256, seed=0))
    assert not np.array_equal(idx, sample_rows(info, 256, seed=1))
    assert len(sample_rows(info, 10_000, seed=0)) == 64 * 8  # never more rows than there are


def test_expert_tensors_use_each_experts_importance(tmp_path: Path) -> None:
    model = GGUFModel(write_synthetic("qwen3moe", tmp_path / "moe.gguf"))
    infos = {t.name: t for t in profiled_tensors(model)}
    info = infos["blk.0.ffn_down_exps.weight"]
    rng = np.random.default_rng(0)
    sums = rng.gamma(0.5, size=(8, info.row_length)).astype(np.float32)
    imx = Imatrix({info.name: ImatrixEntry(sums, np.full(8, 100, np.float32))}, ["synthetic"], 1, 64)
    errors = tensor_errors(model, info, imx, TYPES, 256, GgmlBackend(2), "Q2_K")
    ladder = [errors[k] for k in LADDER]
    assert all(a > b for a, b in itertools.pairwise(ladder))
    assert "IQ2_XXS" in errors  # an imatrix entry lets the types llama.cpp needs one for in
    unweighted = tensor_errors(model, info, None, TYPES, 256, GgmlBackend(2), "Q2_K")
    assert "IQ2_XXS" not in unweighted and unweighted["Q2_K"] != errors["Q2_K"]
    groups = probe_groups(list(infos.values()), 2)
    assert groups["ffn_down_exps.weight@blk.0-1"] == ["blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"]
    assert groups["ffn_down_exps.weight@blk.2-3"] == ["blk.2.ffn_down_exps.weight"]
    with ProbeFile(model, tmp_path / "work") as work:
        work.apply([(info, qtype("Q4_K"))], imx, GgmlBackend(2))
        a, b = model.load(info.name), GGUFModel(work.path).load(info.name)
        assert 1e-4 < float(((a - b) ** 2).sum() / (a**2).sum()) < 0.05


def test_work_copies_of_dead_runs_are_removed(tiny: Path, tmp_path: Path) -> None:
    orphan, live = tmp_path / ".probe-999999999-abc", tmp_path / ".probe-1-abc"  # no such process; init
    for d in (orphan, live):
        d.mkdir()
    with ProbeFile(GGUFModel(tiny), tmp_path):
        assert not orphan.exists() and live.exists()


def test_a_short_text_fails_before_any_encoding(tiny: Path, tmp_path: Path) -> None:
    steps: list[dynq.Progress] = []
    ctx = dynq.RunContext(threads=2, cache_dir=tmp_path, progress=steps.append)
    with pytest.raises(DynqError, match="tokens"):
        profile(tiny, None, Text("the a of", "short"), n_ctx=64, chunks=2, ctx=ctx)
    assert not [s for s in steps if s.stage.startswith("profile")]


def test_probe_tasks_take_the_executors_threads(tiny: Path, imatrix: Imatrix, tmp_path: Path) -> None:
    """A probe task runs on the threads its executor gives it (one CPU per task on Ray), not the driver's count,
    and measures what the driver would."""
    pool = OneThreadTasks()
    ctx = dynq.RunContext(threads=2, cache_dir=tmp_path)
    spread = profile(tiny, imatrix, TEXT, types=LADDER, rows=32, n_ctx=64, chunks=1, ctx=ctx, executor=pool)
    probes = [t for t in pool.tasks if isinstance(t, ProbeTask)]
    assert probes and {t.threads for t in probes} == {1}
    here = profile(tiny, imatrix, TEXT, types=LADDER, rows=32, n_ctx=64, chunks=1,
                   ctx=dynq.RunContext(threads=2, cache_dir=tmp_path / "here"))  # fmt: skip
    # llama.cpp's sums may split differently over 1 and 2 threads: the same measurement, to rounding
    assert [p.kld for p in spread.probes] == pytest.approx([p.kld for p in here.probes], rel=1e-3)


# --- a profile from a stranger ------------------------------------------------------------------------------------

T0 = "blk.0.ffn_down.weight"


def hand_made() -> dict[str, object]:
    """A small valid profile file's content, written without measuring anything."""
    prof = Profile(
        ModelRef("m.gguf", "0" * 64), None, TextRef("text", "0" * 64), Method(128, "Q2_K", 4, 64, 2, LADDER),
        {T0: TensorProfile("ffn_down", 0.5, {"Q2_K": 0.1, "Q4_K": 0.02, "Q8_0": 0.001, "F16": 0.0, "BF16": 0.0})},
        (Probe("ffn_down", (T0,), 0.05, 1.0),),
    )  # fmt: skip
    return prof.to_dict()


def changed(edit: Callable[[dict[str, Any]], None]) -> str:
    data: dict[str, Any] = hand_made()
    edit(data)
    return json.dumps(data)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


CRAFTED_PROFILES = {  # probe N13 and N11: each is one line, read in well under a second
    "a million types": (changed(_set("method/types", ["Q2_K"] * 100_000)), "lists 100,000 types"),
    "a type twice": (changed(_set("method/types", ["Q2_K", "Q2_K"])), "lists a type twice"),
    "an unknown type": (changed(_set("method/types", ["Q99_K"])), "'Q99_K' in method is not a type"),
    "a float probe type": (changed(_set("method/probe_type", "F16")), "'F16' in method is not a type"),
    "errors at types never measured": (
        changed(_set(f"tensors/{T0}/errors", {f"T{i}": 0.1 for i in range(20_000)})),
        "an error at 'T0', a type the profile does not measure",
    ),
    "a negative error": (changed(_set(f"tensors/{T0}/errors/Q2_K", -1e30)), "error -1e+30 at Q2_K is not a finite"),
    "a NaN error": (changed(_set(f"tensors/{T0}/errors/Q2_K", float("nan"))), "error nan at Q2_K"),
    "an infinite error": (changed(_set(f"tensors/{T0}/errors/Q4_K", float("inf"))), "error inf at Q4_K"),
    "a negative sensitivity": (changed(_set(f"tensors/{T0}/sensitivity", -1e300)), "sensitivity -1e+300 is not"),
    "a zero sensitivity": (changed(_set(f"tensors/{T0}/sensitivity", 0.0)), "sensitivity 0.0 is not a finite number"),
    "a huge sensitivity": (
        changed(_set(f"tensors/{T0}/sensitivity", 1e308)),
        "predicted KLD 1e+307 at Q2_K (sensitivity times error), beyond any measurement (at most 1e+06)",
    ),
    "a NaN floor": (changed(_set("method/kld_floor", float("nan"))), "method.kld_floor is nan"),
    "a NaN probe": (
        changed(_set("probes", [{"group": "g", "tensors": [T0], "kld": float("nan"), "seconds": 1}])),
        "probe 'g': KLD nan",
    ),
    "nested lists": ("[" * 200_000 + "]" * 200_000, "JSON nested deeper than any such file is"),
    "nested mappings": (
        '{"version": 1, "tensors": ' + '{"a":' * 100_000 + "1" + "}" * 100_001,
        "JSON nested deeper than any such file is",
    ),
    "not UTF-8": ('{"version": 1, "model": "caf\udce9"}', "not UTF-8 text at byte"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_PROFILES))
def test_a_crafted_profile_is_one_line(case: str, tmp_path: Path) -> None:
    text, message = CRAFTED_PROFILES[case]
    path = tmp_path / "p.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    started = time.perf_counter()
    with pytest.raises(DynqError, match=re.escape(message)) as err:
        Profile.load(path)
    assert time.perf_counter() - started < 5
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: ")


def test_a_hand_made_profile_within_the_bounds_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(hand_made()))
    assert Profile.load(path).tensors[T0].costs()["Q2_K"] == pytest.approx(0.05)
    # one more tensor than a model may have, or one byte more than a profile may be: refused by count, then by size
    monkeypatch.setattr(profile_file, "MAX_PROFILE_TENSORS", 0)
    with pytest.raises(DynqError, match="1 tensors, more than any model has"):
        Profile.load(path)
    monkeypatch.setattr(profile_file, "MAX_PROFILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(DynqError, match=f"more than {path.stat().st_size - 1:,} bytes"):
        Profile.load(path)


def test_a_profile_that_is_not_a_file_is_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # nothing ever writes it: opening it for reading must not wait
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(DynqError, match="not a dynq profile \\(not a regular file\\)"):
            Profile.load(path)
