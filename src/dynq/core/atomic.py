"""The one way dynq writes a file: under a temporary name beside it, fsynced, then renamed over the final name, so a
reader (or a resumed run after a crash) sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dynq.errors import DynqError, OutputExists


def check_output_folder(path: Path) -> None:
    """Say before any work, not after it, that the folder an output goes into is missing or that nothing can be
    written there (read-only, not ours)."""
    if not path.parent.is_dir():
        raise DynqError(f"{path}: the output directory {path.parent} does not exist; create it first")
    _check_writable(path.parent, path)


def _check_writable(folder: Path, shown: Path) -> None:
    """A file is made in `folder` and removed: the filesystem itself says whether outputs can go there (a check of
    the mode bits would pass for root on a read-only mount)."""
    probe = folder / f".dynq-{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return  # made by this very process a moment ago: the folder takes files
    except OSError as e:
        raise DynqError(f"{shown}: cannot write there ({e.strerror or e}); choose a folder you can write to") from None
    with suppress(OSError):
        probe.unlink()


def make_output_folder(folder: Path) -> None:
    """An output that is a folder (with its parents), made before any work; one that cannot be made, or a file of
    that name, is one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DynqError(f"{folder}: is a file, and this output is a folder; choose another name") from None
    except OSError as e:
        raise DynqError(f"{folder}: cannot make the output folder there ({e.strerror or e})") from None
    _check_writable(folder, folder)


def check_new_output(path: Path, overwrite: bool) -> None:
    """Before any work: the output's folder takes files, and an existing output is replaced only when asked."""
    check_output_folder(path)
    if path.exists() and not overwrite:
        raise OutputExists(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; skipped where folders cannot be opened or synced (Windows, some filesystems)."""
    with suppress(OSError):
        _fsync(folder)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` (`.NAME.dynq-PID.tmp`) for the caller to write: on success it is fsynced and
    renamed over `path` (and the folder fsynced); on an exception it is removed and `path` is left as it was."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.dynq-{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        tmp.replace(final)
        _fsync_folder(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
