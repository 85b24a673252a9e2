"""Short ways for tests to drive the public API the way a user's script does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dynq

TWO_THREADS = dynq.RunContext(threads=2)


def quantize_to(source: str | Path, recipe: str, output: Path, **options: Any) -> dynq.QuantizeResult:
    """Plan `recipe` on `source` and quantize it into `output` on two threads (options go to dynq.quantize)."""
    options.setdefault("ctx", TWO_THREADS)
    return dynq.quantize(dynq.plan(str(source), recipe), output, **options)


def measurements(profile_file: Path) -> dict[str, Any]:
    """A saved profile without its timings: what two runs of the same profile must agree on."""
    data: dict[str, Any] = json.loads(profile_file.read_text())
    data.pop("seconds")
    for p in data["probes"]:
        p.pop("seconds")
    return data
