"""One llama-cpp-python version: src/dynq/llamacpp/VERSION. The code and the Makefile read that file; pyproject.toml
and constraints.txt cannot, so they spell it and this test holds them to it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from dynq.llamacpp.sdist import PACKAGE, VERSION

ROOT = Path(__file__).resolve().parents[1]
PIN = ROOT / "src" / "dynq" / "llamacpp" / "VERSION"


def test_the_code_reads_the_version_file() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)
    assert PIN.read_text().strip() == VERSION


def test_pyproject_and_constraints_pin_the_same_release() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in dependencies if d.startswith(PACKAGE)] == [f"{PACKAGE}=={VERSION}"]
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert [c for c in constraints if c.startswith(PACKAGE)] == [f"{PACKAGE}=={VERSION}"]


def test_the_makefile_reads_the_version_file() -> None:
    assert "LLAMA_VERSION := $(shell cat src/dynq/llamacpp/VERSION)" in (ROOT / "Makefile").read_text().splitlines()


def test_the_version_file_is_package_data() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dynq"]
    assert "llamacpp/VERSION" in package_data


def test_no_module_spells_the_version() -> None:
    spelled = [p for p in (ROOT / "src" / "dynq").rglob("*.py") if VERSION in p.read_text()]
    assert spelled == [], "read dynq.llamacpp.sdist.VERSION instead"


def test_the_installed_release_is_the_pinned_one() -> None:
    assert version(PACKAGE) == VERSION
