"""The versioned-record helper: frozen dataclasses round-trip through JSON by their type hints, a record of another
version is a VersionMismatch, and anything else that does not fit is one BadInput line that says where; the formats
built on it keep the bytes they had and still read what earlier versions wrote."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dynq.budget.profile import ProfileProgress
from dynq.budget.profile_file import Profile
from dynq.core.records import RecordFormat, from_data, to_data
from dynq.errors import BadInput, VersionMismatch
from dynq.eval.bench import read_bench, rows_as_dicts
from dynq.version import __version__


@dataclass(frozen=True)
class Inner:
    name: str
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Outer:
    count: int
    ratio: float
    flag: bool
    inner: Inner
    optional: Inner | None
    by_name: dict[str, Inner]
    pair: tuple[str, int]
    items: list[int]
    anything: Any = None
    extra: dict[str, float] = field(default_factory=dict)


FORMAT = RecordFormat(Outer, "test record", 3, "make it again", header=("writer",))
SAMPLE = Outer(7, 0.5, True, Inner("a", (1.0, 2.5)), None, {"x": Inner("b", ())}, ("p", 2), [1, 2],
               {"free": [1, "form"]}, {"e": 1e-6})  # fmt: skip


def test_a_record_round_trips_through_json() -> None:
    record = FORMAT.to_record(SAMPLE, writer="me")
    assert list(record)[:3] == ["version", "writer", "count"]  # flat: version, header, then the fields in order
    assert record["inner"] == {"name": "a", "weights": [1.0, 2.5]} and record["pair"] == ["p", 2]
    back = FORMAT.from_record(json.loads(json.dumps(record)), "x.json")
    assert back == SAMPLE and isinstance(back.inner.weights, tuple) and isinstance(back.pair, tuple)
    assert from_data(Inner, to_data(SAMPLE.inner), "x") == SAMPLE.inner
    with pytest.raises(TypeError):
        FORMAT.to_record(SAMPLE)  # the header is part of the format


def test_another_version_is_a_version_mismatch() -> None:
    record = FORMAT.to_record(SAMPLE, writer="me")
    for version in (4, 2, "3", True, None):
        with pytest.raises(VersionMismatch, match=r"x.json: test record version .*reads version 3; make it again"):
            FORMAT.from_record(record | {"version": version}, "x.json")
    unversioned = {k: v for k, v in record.items() if k != "version"}
    with pytest.raises(BadInput, match="not a test record") as caught:
        FORMAT.from_record(unversioned, "x.json")
    assert not isinstance(caught.value, VersionMismatch)
    # a format that had no version at first reads a record without one as its first version
    late = RecordFormat(Outer, "test record", 1, "make it again", header=("writer",), unversioned=1)
    assert late.from_record(unversioned, "x.json") == SAMPLE
    with pytest.raises(VersionMismatch):
        RecordFormat(Outer, "test record", 2, "again", header=("writer",), unversioned=1).from_record(unversioned, "x")


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"count": "7"}, "count must be a whole number within 64 bits, not '7'"),
        ({"count": 10**400}, "count must be a whole number within 64 bits"),
        ({"count": 7.0}, "count must be a whole number"),
        ({"count": True}, "count must be a whole number"),
        ({"ratio": None}, "ratio must be a number"),
        ({"flag": 1}, "flag must be true or false"),
        ({"inner": {"name": "a"}}, "inner.weights is missing"),
        ({"inner": {"name": "a", "weights": [1, "x"]}}, r"inner.weights\[1\] must be a number"),
        ({"by_name": {"x": {"name": 1, "weights": []}}}, r"by_name\['x'\].name must be text"),
        ({"pair": ["p"]}, "pair must have 2 items"),
        ({"items": {"a": 1}}, "items must be a list, not a mapping"),
        ({"optional": 3}, "optional must be a mapping"),
        ({"surprise": 1}, r"the record has unknown field\(s\) surprise"),
        ({"ratio": 10**400}, "ratio must be a number"),
    ],
)
def test_a_wrong_field_is_one_line_that_says_where(change: dict[str, Any], where: str) -> None:
    record = FORMAT.to_record(SAMPLE, writer="me") | change
    with pytest.raises(BadInput, match=f"^x.json: not a test record: {where}.*; make it again$") as caught:
        FORMAT.from_record(record, "x.json")
    assert "\n" not in str(caught.value)


def test_not_a_mapping_is_not_a_record() -> None:
    for data in ([1, 2], "text", None):
        with pytest.raises(BadInput, match=r"x\.json: not a test record; make it again"):
            FORMAT.from_record(data, "x.json")
    missing = FORMAT.to_record(SAMPLE, writer="me")
    del missing["count"]
    with pytest.raises(BadInput, match="count is missing"):
        FORMAT.from_record(missing, "x.json")


# A profile as dynq wrote it before the helper (its bytes, the writer's version aside).
OLD_PROFILE = """{
 "version": 1,
 "dynq": "VERSION",
 "model": {"spec": "m.gguf", "fingerprint": "ab"},
 "imatrix": {"datasets": ["a", "b"], "chunk_count": 7, "sha256": "cd"},
 "text": {"provenance": "calib", "sha256": "ef"},
 "method": {"rows": 128, "probe_type": "Q2_K", "group_blocks": 4, "n_ctx": 256, "chunks": 1,
            "types": ["Q4_K", "Q8_0"], "seed": 0, "kld_floor": 1e-06},
 "tensors": {"blk.0.attn_q.weight": {"group": "g0", "sensitivity": 0.5, "errors": {"Q4_K": 0.01, "Q8_0": 1e-05}}},
 "probes": [{"group": "g0", "tensors": ["blk.0.attn_q.weight"], "kld": 0.001, "seconds": 1.5}],
 "seconds": {"errors": 1.0, "probes": 2.5}
}
""".replace("VERSION", __version__)


def test_a_profile_written_before_loads_and_saves_to_the_same_layout(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(OLD_PROFILE)
    loaded = Profile.load(old)
    assert loaded.imatrix is not None and loaded.imatrix.datasets == ("a", "b")
    again = loaded.save(tmp_path / "again.json")
    assert again.read_text() == json.dumps(json.loads(OLD_PROFILE), indent=1) + "\n"


def test_progress_and_bench_rows_from_before_their_version_still_read(tmp_path: Path) -> None:
    old = tmp_path / "progress.json"
    old.write_text('{"key": "k", "errors": {"t": {"Q4_K": 0.5}}, "probes": [{"group": "g", "tensors": ["t"], '
                   '"kld": 0.1, "seconds": 1.0}]}')  # fmt: skip
    progress = ProfileProgress(old, "k")
    progress.load()
    assert progress.errors == {"t": {"Q4_K": 0.5}} and progress.probes[0].tensors == ("t",)
    progress.save()
    assert json.loads(old.read_text())["version"] == 1
    old.write_text(old.read_text().replace('"version": 1', '"version": 2'))
    with pytest.raises(VersionMismatch, match="profile progress file version 2"):
        ProfileProgress(old, "k").load()

    row = {"name": "r", "maker": "dynq", "bytes": 10, "bpw": 3.1, "ppl": 12.5, "kld_mean": 0.25, "kld_p99": 2.0,
           "top1": 0.8, "loop_rate": float("nan"), "quantize_seconds": 1.0}  # fmt: skip
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([row]))
    (read,) = read_bench(bench)
    assert read.name == "r" and read.bytes == 10
    written = rows_as_dicts([read])
    assert written[0]["version"] == 1
    bench.write_text(json.dumps(written))
    assert read_bench(bench)[0].name == "r"
    bench.write_text(json.dumps([written[0] | {"version": 9}]))
    with pytest.raises(VersionMismatch, match="row 1: dynq bench row version 9"):
        read_bench(bench)
