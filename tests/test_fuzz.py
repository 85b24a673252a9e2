"""A fast run of the structure-aware fuzzer (tests/fuzzing.py) in its own process, whose address space is capped: every
case must end in a correct result or a one-line DynqError, within the time limit. `make fuzz` runs the long one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).with_name("fuzzing.py")
pytestmark = pytest.mark.timeout(1200)  # the fuzzer's own limit below


def fuzz(kinds: str, cases: int, seed: int) -> dict[str, dict[str, int]]:
    done = subprocess.run([sys.executable, str(FUZZER), "--cases", str(cases), "--kinds", kinds, "--seed", str(seed)],
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    report = json.loads(done.stdout)
    assert report["findings"] == [], "\n".join(report["findings"])
    assert done.returncode == 0, done.stderr[-2000:]
    counts: dict[str, dict[str, int]] = report["counts"]
    return counts


def test_files_and_recipes_survive_thousands_of_mutations() -> None:
    counts = fuzz("gguf,imatrix-gguf,imatrix-dat,recipe", 4000, seed=15)
    for kind, outcomes in counts.items():
        # the mutations reach both ends: some files still work, most are refused
        assert outcomes.get("ok", 0) > 20 and outcomes.get("error", 0) > 300, (kind, outcomes)


@pytest.mark.model
def test_checkpoints_survive_mutations() -> None:
    counts = fuzz("checkpoint", 120, seed=15)
    assert counts["checkpoint"].get("ok", 0) > 3 and counts["checkpoint"].get("error", 0) > 60


def test_shard_sets_survive_mutations() -> None:
    """Damaged split sets (tests/fuzz_shards.py) are refused in one line or read whole, never with tensors missing."""
    counts = fuzz("shards", 400, seed=15)
    assert counts["shards"].get("ok", 0) > 10 and counts["shards"].get("error", 0) > 200, counts
