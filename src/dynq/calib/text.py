"""Calibration and evaluation texts that every machine running dynq has: the Python interpreter's own standard
library (code, PSF license) and its documentation topics (`pydoc_data.topics`, prose about code).

The two sets are disjoint by construction: different modules, and the documentation goes to calibration only.
Each text carries a provenance line that is recorded in the imatrix and in the quantized files.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from dynq.errors import DynqError

CALIBRATION_MODULES = ("argparse", "textwrap", "heapq", "fractions", "dataclasses", "csv", "shlex", "string")
EVALUATION_MODULES = ("difflib", "statistics", "calendar", "pprint", "bisect", "colorsys")


@dataclass(frozen=True)
class Text:
    text: str
    provenance: str


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise DynqError(f"the standard library module {name} has no Python source here")
    return Path(spec.origin).read_text(encoding="utf-8")


def _docs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_text() -> Text:
    code = "\n\n".join(_module_source(m) for m in CALIBRATION_MODULES)
    return Text(
        _docs() + "\n\n" + code,
        f"python-{platform.python_version()} pydoc_data.topics + stdlib {','.join(CALIBRATION_MODULES)}",
    )


def evaluation_text() -> Text:
    return Text(
        "\n\n".join(_module_source(m) for m in EVALUATION_MODULES),
        f"python-{platform.python_version()} stdlib {','.join(EVALUATION_MODULES)}",
    )


def read_texts(paths: list[Path]) -> Text:
    """User-given calibration files, concatenated; provenance = their names."""
    parts = []
    for p in paths:
        try:
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise DynqError(f"{p}: cannot read calibration text ({e.strerror})") from None
    return Text("\n\n".join(parts), ",".join(p.name for p in paths))
