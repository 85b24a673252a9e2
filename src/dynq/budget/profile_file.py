"""The sensitivity profile as data: per weight tensor, a measured damage per candidate GGML type that adds up over
tensors to the whole model's KL divergence (KLD ≈ Σ_t S_t · e_t(type_t)), and its versioned JSON file.

`e_t(type)` is the importance-weighted relative squared error of encoding sampled rows of tensor t at `type`;
`S_t` is the sensitivity of t's probe group, measured as the KL divergence of a model whose group alone was
degraded, divided by the group's summed error at the probe type. `costs()` is what a size-budget solver takes.
The measuring is distortion.py's (encode errors), probes.py's (KL divergence of the probes) and profile.py's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from dynq.core.atomic import atomic_write_text
from dynq.core.importance import Imatrix
from dynq.core.jsonfile import read_json
from dynq.core.qtypes import FLOATS, quantizable_qtypes
from dynq.core.records import OMIT_IF_DEFAULT, RecordFormat, to_data
from dynq.core.source import TensorSource
from dynq.errors import BadInput, DynqError, OutputExists
from dynq.gguf_io.reader import GGUFModel
from dynq.version import __version__

PROFILE_VERSION = 1
# A probe whose KL divergence is below this is noise (the sampled tail can even make it slightly negative): its
# group gets this floor instead, a small positive sensitivity, so no tensor looks free to degrade.
KLD_FLOOR = 1e-6
# Profiles are shared (they take hours to make), so a loaded one is held to what a measurement can be. A model has
# a few thousand weight tensors and its profile a few MiB; these bounds are far above any real one.
MAX_PROFILE_BYTES = 64 << 20
MAX_PROFILE_TENSORS = 1 << 16
# The predicted KL divergence (nats) one tensor may add at one type: a measured one is below 10 even for the worst
# low-bit type, so anything near this bound is not a measurement (and sums of such numbers print as nonsense).
MAX_TENSOR_KLD = 1e6
REMEDY = "run `dynq profile` again"


@dataclass(frozen=True)
class ModelRef:
    spec: str
    fingerprint: str


@dataclass(frozen=True)
class ImatrixRef:
    datasets: tuple[str, ...]
    chunk_count: int
    sha256: str


@dataclass(frozen=True)
class TextRef:
    provenance: str
    sha256: str


class ProfileSettings(TypedDict, total=False):
    """The measuring options a caller may set (profile() has the defaults); Method is what they resolve to."""

    types: Sequence[str]
    rows: int
    group_blocks: int
    probe_type: str
    n_ctx: int
    chunks: int


@dataclass(frozen=True)
class Method:
    """Everything besides the model, imatrix and text that the numbers depend on (part of the cache key)."""

    rows: int
    probe_type: str
    group_blocks: int
    n_ctx: int
    chunks: int
    types: tuple[str, ...]
    seed: int = 0
    kld_floor: float = KLD_FLOOR
    # "" for llama.cpp's encoders; else the error-feedback encoder and its Gram file (quantize.encoder_name): the
    # errors and probes describe the encoder the solved mix will be written with
    encoder: str = field(default="", metadata={OMIT_IF_DEFAULT: True})


@dataclass(frozen=True)
class TensorProfile:
    group: str
    sensitivity: float
    errors: dict[str, float]  # type name -> relative weighted squared error

    def costs(self) -> dict[str, float]:
        return {t: self.sensitivity * e for t, e in self.errors.items()}


@dataclass(frozen=True)
class Probe:
    group: str
    tensors: tuple[str, ...]
    kld: float  # as measured, before the floor
    seconds: float


@dataclass(frozen=True)
class Profile:
    model: ModelRef
    imatrix: ImatrixRef | None
    text: TextRef
    method: Method
    tensors: dict[str, TensorProfile]
    probes: tuple[Probe, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # "errors", "probes"

    def costs(self) -> dict[str, dict[str, float]]:
        """costs[tensor][type]: the predicted KL divergence that tensor adds at that type."""
        return {name: t.costs() for name, t in self.tensors.items()}

    def predicted_kld(self, choice: dict[str, str]) -> float:
        """Σ costs of `choice` (tensor -> type); tensors the profile does not cover add nothing."""
        return sum(self.tensors[n].costs()[t] for n, t in choice.items() if n in self.tensors)

    def check_model(self, source: TensorSource | str | os.PathLike[str]) -> None:
        """Refuse a model other than the one profiled (by content fingerprint, not by path)."""
        opened = source if isinstance(source, TensorSource) else GGUFModel(Path(source))
        if opened.fingerprint() != self.model.fingerprint:
            raise DynqError(
                f"this profile was made for another model ({self.model.spec}), not {opened.spec}; "
                "run `dynq profile` on this model"
            )

    def to_dict(self) -> dict[str, Any]:
        return PROFILE_FORMAT.to_record(self, dynq=__version__)

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the JSON under a temporary name and rename it, so a reader never sees half a file. An existing file
        is replaced only with `overwrite`."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and not overwrite:
            raise OutputExists(out)
        return atomic_write_text(out, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Profile:
        """Read and check a profile file: its size, its structure and every number in it (see `check_profile`)."""
        where = str(path)
        data = read_json(path, "a dynq profile", REMEDY, MAX_PROFILE_BYTES)
        profile = PROFILE_FORMAT.from_record(data, where)
        check_profile(profile, where)
        return profile


# The profile file: `{"version": 1, "dynq": WRITER, <Profile's fields>}`; the writer's dynq version is for people.
PROFILE_FORMAT = RecordFormat(Profile, "dynq profile", PROFILE_VERSION, REMEDY, header=("dynq",))


def check_profile(profile: Profile, where: str) -> None:
    """Refuse a profile no measurement makes: more types than exist, a type twice or unknown, more tensors than a
    model has, an error or sensitivity that is not a finite number at least 0 (sensitivity above 0), or a predicted
    KL divergence beyond `MAX_TENSOR_KLD`. One BadInput naming the file and the place."""

    def bad(problem: str) -> BadInput:
        return BadInput(f"{where}: not a usable dynq profile: {problem}; {REMEDY}")

    types = profile.method.types
    known = {t.name for t in quantizable_qtypes()}
    if len(types) > len(known):
        raise bad(f"method.types lists {len(types):,} types, and llama.cpp has {len(known)}")
    for name in {*types, profile.method.probe_type}:
        if name not in known:
            raise bad(f"{name!r:.40} in method is not a type llama.cpp quantizes to")
    if len(set(types)) != len(types):
        raise bad("method.types lists a type twice")
    if not (math.isfinite(profile.method.kld_floor) and profile.method.kld_floor >= 0):
        raise bad(f"method.kld_floor is {profile.method.kld_floor!r}, not a finite number at least 0")
    if len(profile.tensors) > MAX_PROFILE_TENSORS:
        raise bad(f"{len(profile.tensors):,} tensors, more than any model has ({MAX_PROFILE_TENSORS:,})")
    listed = {*types, *FLOATS}  # F16 and the source's own float type are measured beside the listed types
    for name, t in profile.tensors.items():
        if not (math.isfinite(t.sensitivity) and t.sensitivity > 0):
            raise bad(f"tensor {name!r:.80}: sensitivity {t.sensitivity!r} is not a finite number above 0")
        for type_name, e in t.errors.items():
            if type_name not in listed:
                raise bad(f"tensor {name!r:.80}: an error at {type_name!r:.40}, a type the profile does not measure")
            if not (math.isfinite(e) and e >= 0):
                raise bad(f"tensor {name!r:.80}: error {e!r} at {type_name} is not a finite number at least 0")
            if t.sensitivity * e > MAX_TENSOR_KLD:
                raise bad(
                    f"tensor {name!r:.80}: predicted KLD {t.sensitivity * e:.3g} at {type_name} (sensitivity "
                    f"times error), beyond any measurement (at most {MAX_TENSOR_KLD:g})"
                )
    for probe in profile.probes:
        if not math.isfinite(probe.kld):
            raise bad(f"probe {probe.group!r:.80}: KLD {probe.kld!r} is not a finite number")


def imatrix_digest(imatrix: Imatrix) -> str:
    """sha256 of an imatrix's content (entries in name order, sums and counts, datasets, chunk count)."""
    h = hashlib.sha256()
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        h.update(name.encode() + b"\0" + str(e.sums.shape).encode())
        h.update(np.ascontiguousarray(e.sums, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(e.counts, dtype=np.float32).tobytes())
    h.update(json.dumps([imatrix.datasets, imatrix.chunk_count]).encode())
    return h.hexdigest()


def imatrix_ref(imatrix: Imatrix | None) -> ImatrixRef | None:
    if imatrix is None:
        return None
    return ImatrixRef(tuple(imatrix.datasets), imatrix.chunk_count, imatrix_digest(imatrix))


def text_ref(text: str, provenance: str) -> TextRef:
    return TextRef(provenance, hashlib.sha256(text.encode()).hexdigest())


def cache_key(fingerprint: str, imatrix: ImatrixRef | None, text: TextRef, method: Method) -> str:
    """What a cached profile is reused under: the model's content, the imatrix's, the text's, and the method."""
    key = {
        "version": PROFILE_VERSION,
        "model": fingerprint,
        "imatrix": None if imatrix is None else imatrix.sha256,
        "text": text.sha256,
        "method": to_data(method),  # a plain profile keeps the key it had before the encoder was a field
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(cache_dir: Path, stem: str, key: str) -> Path:
    return cache_dir / "profiles" / f"{stem}-{key}.json"
