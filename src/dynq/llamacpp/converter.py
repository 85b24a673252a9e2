"""llama.cpp's Hugging Face converter (`convert_hf_to_gguf.py` and its `conversion/` package), from the
llama-cpp-python source package dynq pins, used as a library.

The converter knows every architecture's tensor names, hyperparameters, tokenizer and chat template; dynq drives it
instead of rewriting it. It is written against the gguf-py of the same llama.cpp commit, which is newer than the
`gguf` release of the same version number on PyPI, and a process can import only one `gguf`: so dynq installs the
source package's gguf-py as its `gguf` (`python -m dynq.llamacpp.converter`, which `make setup` runs) and checks that
the imported one is that copy before it loads the converter.

Fetching is that one explicit step: it takes the converter and gguf-py (about 2 MB) out of the source package
(sdist.py, about 75 MB, downloaded once) into the dynq cache. Everything else only finds them there and, when they
are missing, says which command fetches them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import gguf

from dynq.errors import DynqError
from dynq.llamacpp.sdist import PACKAGE, VERSION, home, unpack
from dynq.paths import cache_dir

log = logging.getLogger(__name__)

_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir(cache: Path) -> Path:
    return home(cache) / "converter"


def _fetch_command() -> str:
    return f"{Path(sys.executable).name} -m dynq.llamacpp.converter"


def find_converter(cache: Path) -> Path:
    """The directory holding the pinned converter, its `conversion` package and gguf-py, fetched before; never
    fetches."""
    target = converter_dir(cache)
    if not (target / "convert_hf_to_gguf.py").is_file():
        raise DynqError(f"llama.cpp's converter is not in {target} yet; run `{_fetch_command()}` (make setup does)")
    return target


def ensure_converter(cache: Path) -> Path:
    """The converter's directory (see `find_converter`), taken from the source package if the cache lacks it."""
    target = converter_dir(cache)
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dynq-converter-", dir=target.parent) as tmp:
        log.info("fetching llama.cpp's converter from %s %s", PACKAGE, VERSION)
        staged = unpack(cache, Path(tmp) / "converter", _PARTS)
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise DynqError(f"{PACKAGE} {VERSION}'s source package holds no convert_hf_to_gguf.py")
        staged.replace(target)
    return target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gguf_is_pinned(cache: Path) -> bool:
    """Whether the imported `gguf` is the converter's own gguf-py (same constants, same writer)."""
    ours = Path(gguf.__file__).parent
    theirs = find_converter(cache) / "gguf-py" / "gguf"
    return all(_digest(ours / f) == _digest(theirs / f) for f in ("constants.py", "gguf_writer.py", "lazy.py"))


def install_pinned_gguf(cache: Path) -> None:
    """Fetch the converter and replace the installed `gguf` with its gguf-py (same version number, newer content)."""
    source = ensure_converter(cache) / "gguf-py"
    if gguf_is_pinned(cache):
        return
    # pip builds from a copy: it writes build files next to the sources, and the cache copy stays pristine.
    with tempfile.TemporaryDirectory(prefix="dynq-gguf-") as tmp:
        copy = Path(tmp) / "gguf-py"
        shutil.copytree(source, copy)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(copy)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DynqError(f"pip could not install llama.cpp's gguf-py from {source}: {last}")


def load_conversion(cache: Path) -> ModuleType:
    """llama.cpp's `conversion` package, imported against the one pinned `gguf`."""
    directory = find_converter(cache)
    if not gguf_is_pinned(cache):
        raise DynqError(
            f"the installed gguf package ({Path(gguf.__file__).parent}) is not the gguf-py llama.cpp's converter "
            f"was written with; run `{_fetch_command()}` once to install it"
        )
    if str(directory) not in sys.path:
        sys.path.append(str(directory))
    try:
        return importlib.import_module("conversion")
    except ImportError as e:
        raise DynqError(f"llama.cpp's converter in {directory} cannot be imported: {e}") from e


def convert(directory: Path, output: Path, cache: Path, outtype: str = "f16") -> None:
    """Run llama.cpp's converter itself on a checkpoint (the yardstick a conversion through dynq is checked and
    timed against), with the one pinned `gguf`."""
    script = find_converter(cache) / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(directory), "--outtype", outtype, "--outfile", str(output)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DynqError(f"llama.cpp's converter failed on {directory}: {last}")


def main() -> None:
    """Fetch the converter and make its gguf-py the installed `gguf` (run once at set-up)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install_pinned_gguf(cache_dir())


if __name__ == "__main__":
    main()
