"""llama.cpp's reference command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built once from the
llama-cpp-python source package this project pins (sdist.py) and cached under the dynq cache. They are the
yardstick dynq is measured against, run side by side in the same process environment. A second tool set, built with
llama.cpp's RPC backend, lets a local ggml-rpc-server stand in for a GPU where llama.cpp's own placement is what is
checked.

`build_tools` is the one place that compiles (and downloads the source package if the cache lacks it); `tool` only
finds a built tool and, when there is none, says which command builds it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dynq.core.atomic import atomic_path
from dynq.errors import DynqError, NotCached
from dynq.llamacpp.sdist import VERSION, unpack

log = logging.getLogger(__name__)

# Native code, but without AMX: some virtual machines advertise AMX and fault on its instructions.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""


@dataclass(frozen=True)
class ToolSet:
    """Some of llama.cpp's tools built with one set of CMake options, cached in their own folder."""

    folder: str
    tools: tuple[str, ...]
    cmake_flags: tuple[str, ...] = ()


REFERENCE = ToolSet(f"llama.cpp-{VERSION}", ("llama-quantize", "llama-imatrix", "llama-perplexity"))
RPC = ToolSet(f"llama.cpp-rpc-{VERSION}", ("ggml-rpc-server", "llama-perplexity"), ("-DGGML_RPC=ON",))


def tools_dir(cache: Path, tool_set: ToolSet = REFERENCE) -> Path:
    return cache / tool_set.folder / "bin"


def tools_built(cache: Path, tool_set: ToolSet = REFERENCE) -> bool:
    return all((tools_dir(cache, tool_set) / name).exists() for name in tool_set.tools)


def tool(name: str, cache: Path, tool_set: ToolSet = REFERENCE) -> Path:
    """The path of a built llama.cpp tool."""
    if name not in tool_set.tools:
        raise DynqError(f"unknown llama.cpp tool '{name}'; built: {', '.join(tool_set.tools)}")
    path = tools_dir(cache, tool_set) / name
    if not path.exists():
        how = "run `dynq build-tools`" if tool_set == REFERENCE else "build_tools(cache, tool_set) builds it"
        raise NotCached(
            f"llama.cpp's {name} is not built in {cache / tool_set.folder} yet; {how} (about 4 minutes)", "build-tools"
        )
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise DynqError(f"building llama.cpp failed at '{' '.join(cmd[:3])}': {tail}")


def build_tools(cache: Path, tool_set: ToolSet = REFERENCE) -> None:
    """Build the tools from the pinned sdist (downloaded once, sdist.py) into the cache (~4 min on 2 cores); skipped
    when built."""
    if tools_built(cache, tool_set):
        return
    if shutil.which("cmake") is None:
        raise DynqError("building llama.cpp's tools needs cmake (apt-get install cmake, or pip install cmake)")
    target = tools_dir(cache, tool_set)
    with tempfile.TemporaryDirectory(prefix="dynq-llama-") as tmp:
        work = Path(tmp)
        log.info("building llama.cpp %s tools in %s", VERSION, work)
        src = unpack(cache, work)
        flags = [f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}", *tool_set.cmake_flags]
        _run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DGGML_NATIVE=ON", *flags], src)  # fmt: skip
        _run(["cmake", "--build", "build", "--target", *tool_set.tools, "-j", str(os.cpu_count() or 2)], src)
        target.mkdir(parents=True, exist_ok=True)
        for name in tool_set.tools:
            built = src / "build" / "bin" / name
            with atomic_path(target / name) as tmp_target:
                shutil.copy2(built, tmp_target)
