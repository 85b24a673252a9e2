"""Frozen dataclasses as versioned JSON records, in the spirit of torchao's config_to_dict/config_from_dict: one
writer and one checked reader in place of a hand-written loader per file format.

A record is flat, `{"version": N, <header keys>, <fields>}`: the layout dynq's profile, description memo and resume
journal already had, so their bytes do not change. A file is read by the one reader its place names (a profile
path, a partial folder), so the kind is not written; it names the format in messages. Fields are converted by the
dataclass's type hints (nested dataclasses, tuples, lists, dicts with text keys, `X | None`, plain scalars), and
anything else in the data (a missing or unknown field, a wrong type) is one `BadInput` that says where.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from dynq.errors import BadInput, VersionMismatch

T = TypeVar("T")
VERSION_KEY = "version"


class _Wrong(Exception):
    """A value that does not fit its type, and where in the record it is."""

    def __init__(self, at: str, problem: str) -> None:
        super().__init__(f"{at or 'the record'} {problem}")


OMIT_IF_DEFAULT = "omit_if_default"


def to_data(value: Any) -> Any:
    """`value` as JSON data: a dataclass as a dict of its fields in order, tuples and lists as lists. A field added to
    a record later (metadata `OMIT_IF_DEFAULT`) is left out while it has its default, so that records which do not
    use it keep the layout, and the digests, they had before it existed."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get(OMIT_IF_DEFAULT) and getattr(value, f.name) == f.default)}  # fmt: skip
    if isinstance(value, tuple | list):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: to_data(v) for k, v in value.items()}
    return value


def from_data(tp: type[T], data: object, where: str) -> T:
    """`data` (as `to_data` makes it) converted to `tp` by its type hints; a mismatch is a BadInput naming `where`
    and the place in the data."""
    try:
        return typing.cast(T, _convert(tp, data, ""))
    except _Wrong as e:
        raise BadInput(f"{where}: {e}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, data: object, at: str) -> Any:
    if tp is Any:
        return data
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass(tp, data, at)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return _union(args, data, at)
    if origin in (tuple, list):
        if not isinstance(data, list):
            raise _Wrong(at, f"must be a list, not {_shown(data)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(data) != len(args):
                raise _Wrong(at, f"must have {len(args)} items, not {len(data)}")
            return tuple(_convert(a, v, f"{at}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True)))
        items = [_convert(args[0], v, f"{at}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise _Wrong(at, f"must be a mapping with text keys, not {_shown(data)}")
        return {k: _convert(args[1], v, f"{at}[{k!r}]") for k, v in data.items()}
    return _scalar(tp, data, at)


def _union(args: tuple[Any, ...], data: object, at: str) -> Any:
    """The first of `args` that `data` fits (None first when allowed: `X | None`)."""
    if data is None and type(None) in args:
        return None
    wrong: _Wrong | None = None
    for a in args:
        try:
            return _convert(a, data, at)
        except _Wrong as e:
            wrong = wrong or e
    assert wrong is not None  # a union has members
    raise wrong


def _scalar(tp: Any, data: object, at: str) -> Any:
    # bool is an int to Python, not to a record; an int is a float to JSON (a hand-written 1 for 1.0)
    if tp is bool and isinstance(data, bool):
        return data
    if tp is int and isinstance(data, int) and not isinstance(data, bool) and abs(data) < 2**63:
        return data  # what a record counts (bytes, tensors, chunks) fits 64 bits; a 400-digit one is not a count
    if tp is float and isinstance(data, float):
        return data
    if tp is float and isinstance(data, int) and not isinstance(data, bool) and abs(data) < 2**1023:
        return float(data)
    if tp is str and isinstance(data, str):
        return data
    if tp is type(None) and data is None:
        return None
    names = {bool: "true or false", int: "a whole number within 64 bits", float: "a number", str: "text",
             type(None): "null"}  # fmt: skip
    if tp not in names:
        raise TypeError(f"records hold no {tp!r}")  # a programmer's error: the dataclass names a type JSON cannot
    raise _Wrong(at, f"must be {names[tp]}, not {_shown(data)}")


def _dataclass(cls: type, data: object, at: str) -> Any:
    if not isinstance(data, dict):
        raise _Wrong(at, f"must be a mapping, not {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise _Wrong(at, f"has unknown field(s) {', '.join(map(str, unknown))}")
    hints = _hints(cls)
    values = {}
    for name, f in fields.items():
        place = f"{at}.{name}" if at else name
        if name in data:
            values[name] = _convert(hints[name], data[name], place)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Wrong(place, "is missing")
    return cls(**values)


def _shown(data: object) -> str:
    return "a mapping" if isinstance(data, dict) else "a list" if isinstance(data, list) else f"{data!r:.40}"


@dataclasses.dataclass(frozen=True)
class RecordFormat(Generic[T]):
    """One versioned file format: records of the frozen dataclass `cls` at `version`. `remedy` ends every message
    about a record this dynq cannot read (what the user does instead); `header` names the keys written beside the
    version (such as the writing dynq's version) that reading skips; `unversioned` is the version a record without a
    version key is read as, for formats that had none at first (None: such a record is refused)."""

    cls: type[T]
    kind: str
    version: int
    remedy: str
    header: tuple[str, ...] = ()
    unversioned: int | None = None

    def to_record(self, obj: T, **header: Any) -> dict[str, Any]:
        if set(header) != set(self.header):
            raise TypeError(f"a {self.kind} record's header is {self.header}, not {tuple(header)}")
        return {VERSION_KEY: self.version, **header, **to_data(obj)}

    def from_record(self, data: object, where: str) -> T:
        """The record `data` (parsed JSON) read back; VersionMismatch for another version, BadInput for anything
        else that is not such a record."""
        if not isinstance(data, dict) or (VERSION_KEY not in data and self.unversioned is None):
            raise BadInput(f"{where}: not a {self.kind}; {self.remedy}")
        version = data.get(VERSION_KEY, self.unversioned)
        if version != self.version or isinstance(version, bool):
            raise VersionMismatch(
                f"{where}: {self.kind} version {version!r}, this dynq reads version {self.version}; {self.remedy}"
            )
        fields = {k: v for k, v in data.items() if k != VERSION_KEY and k not in self.header}
        try:
            return typing.cast(T, _dataclass(self.cls, fields, ""))
        except _Wrong as e:
            raise BadInput(f"{where}: not a {self.kind}: {e}; {self.remedy}") from None
