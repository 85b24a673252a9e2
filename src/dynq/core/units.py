"""Byte units and the three size parsers, one per convention: file sizes in powers of 1000 (`parse_size`, as
llama-gguf-split), memory in powers of 1024 (`parse_memory`, as cards are sold) and a solver target that takes
both spellings or bits per weight (`parse_target`)."""

from __future__ import annotations

import re

from dynq.errors import DynqError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": KIB, "M": MIB, "G": GIB, "T": TIB}

_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_TARGET = re.compile(r"^\s*(?P<n>[0-9]*\.?[0-9]+)\s*(?P<unit>bpw|[kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_TARGET_SCALE = {"": 1, "b": 1, **{p.lower(): s for p, s in _DECIMAL.items()},
                 **{p.lower() + "i": s for p, s in _BINARY.items()}}  # fmt: skip


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GB', '123456' → bytes (powers of 1000, as llama-gguf-split --split-max-size)."""
    s = text.strip().upper().removesuffix("B")
    scale = _DECIMAL.get(s[-1:], 1)
    number = s[:-1] if scale != 1 else s
    try:
        value = float(number) * scale
    except ValueError:
        raise DynqError(f"bad size '{text}'; use e.g. 500M or 2G") from None
    if value <= 0:
        raise DynqError(f"bad size '{text}'; it must be positive")
    return int(value)


def parse_memory(text: str) -> int:
    """'24GB', '80G', '1.5TiB', '512M' -> bytes. Memory is sold in binary units (a '24 GB' card holds 24 GiB),
    so K/M/G/T are powers of 1024 here, unlike file-split sizes."""
    m = _MEMORY.match(text)
    if m is None:
        raise DynqError(f"bad memory size '{text}'; use e.g. 24GB, 80G or 512M")
    value = float(m.group(1)) * (_BINARY[m.group(2).upper()] if m.group(2) else 1)
    if value <= 0:
        raise DynqError(f"bad memory size '{text}'; it must be positive")
    return int(value)


def parse_target(text: str, n_parameters: int) -> int:
    """'600MiB', '0.6GiB', '650M' (powers of 1000, as --split-max-size), '123456', or '2.5bpw' -> bytes of tensor
    data."""
    m = _TARGET.match(text)
    if m is None:
        raise DynqError(f"bad target '{text}'; use a size such as 600MiB or 1.2G, or bits per weight such as 2.5bpw")
    value, unit = float(m.group("n")), (m.group("unit") or "").lower()
    if unit == "bpw":
        target = value * n_parameters / 8
    else:
        target = value * _TARGET_SCALE[unit.removesuffix("b") if unit != "b" else unit]
    if target <= 0:
        raise DynqError(f"bad target '{text}'; it must be positive")
    return int(target)
