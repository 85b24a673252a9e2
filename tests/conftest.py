"""Shared fixtures, and the lanes: a test with none of the markers model, cluster, slow, gpu is marked unit and must
stay offline and model-free (`make check` runs that lane alone); a gpu test skips, saying why, without CUDA."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from dynq.calib import text
from dynq.llamacpp import sdist
from dynq.sources import zoo
from tiny_models import llama_tensors, write_gguf
from tiny_solve import solve_inputs

# Examples are judged on what they find, never on how long one took on a busy machine.
settings.register_profile("dynq", deadline=None, print_blob=True)
settings.load_profile("dynq")

HEAVY = ("model", "cluster", "slow", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in HEAVY):
            item.add_marker(pytest.mark.unit)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not _cuda():
        pytest.skip("needs a CUDA device: torch sees none on this machine")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class LaneError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _unit_lane_stays_offline(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A unit test that reaches a zoo model or another host fails, naming the marker it should carry."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return

    def no_zoo(*args: Any, **kwargs: Any) -> Any:
        raise LaneError("a unit test fetched a zoo model: mark it `model`")

    def not_cached(name: str, cache: Path) -> Any:  # refusing a model not fetched yet is offline (and tested)
        found = cached(name, cache)
        raise LaneError(f"a unit test opened {found}: mark it `model`")

    def no_download(package: str, *args: Any, **kwargs: Any) -> Any:
        raise LaneError(f"a unit test downloaded {package}: mark it `model`")

    def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host[0] if isinstance(host, tuple) else host
        try:
            local = name in ("localhost", None, "") or ipaddress.ip_address(name).is_loopback
        except ValueError:
            local = False
        if not local:
            raise LaneError(f"a unit test reached {name}: mark it `model`")
        return resolve(host, *args, **kwargs)

    resolve, cached = socket.getaddrinfo, zoo.cached_path
    monkeypatch.setattr(zoo, "fetch", no_zoo)
    monkeypatch.setattr(zoo, "cached_path", not_cached)
    for module in (zoo, text, sdist):
        monkeypatch.setattr(module, "download", no_download)
    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    yield


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The solve tests' tiny model, imatrix and profile (tests/tiny_solve.py), built once per test run."""
    return solve_inputs(tmp_path_factory.mktemp("solve"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, llama_tensors())
    return path


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model in shards of 8 tensors; returns the first shard."""
    folder = tmp_path_factory.mktemp("split")
    write_gguf(folder / "tiny.gguf", llama_tensors(), split_max_tensors=8)
    shards = sorted(folder.glob("tiny-*-of-*.gguf"))
    assert len(shards) > 1
    return shards[0]
