"""The exception types users see: each message is a single line that says what is wrong and what to do.

`DynqError` is the one base type. Its subclasses carry, as data, what a caller may act on (the output that exists,
the folder an interrupted run left, the command that fetches what is missing), so the CLI can word them in its own
flags while library messages name none.
"""

from __future__ import annotations

from pathlib import Path


class DynqError(Exception):
    """A problem with the user's input (file, recipe, option); the CLI prints it as one line and exits non-zero."""


class BadInput(DynqError):
    """A file, recipe or option that dynq refuses, with the reason (which file, which tensor, what to do)."""


class VersionMismatch(BadInput):
    """A file written in a format version this dynq does not read."""


class OutputExists(DynqError):
    """The output is already there and replacing it was not asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: already exists; remove it or ask to overwrite it (overwrite=True)")


class ResumeRequired(DynqError):
    """An interrupted run of the same output left its work in a folder: resume it, or delete the folder."""

    def __init__(self, subject: str | Path, left: str, folder: str | Path) -> None:
        self.subject, self.left, self.folder = str(subject), left, Path(folder)
        super().__init__(f"{subject}: {left} in {folder}; resume it (resume=True), or delete that folder to start over")


class LeftoverRun(DynqError):
    """An interrupted run of a command that does not resume (a copy: split, merge) left its work in a folder: starting
    over with overwrite clears it, or delete the folder."""

    def __init__(self, subject: str | Path, left: str, folder: str | Path) -> None:
        self.subject, self.left, self.folder = str(subject), left, Path(folder)
        super().__init__(f"{subject}: {left} in {folder}; start over (overwrite=True), or delete that folder")


class NotCached(DynqError):
    """Something a call needs is not in the cache yet; `fetch` is the call or command that brings it."""

    def __init__(self, message: str, fetch: str) -> None:
        self.fetch = fetch
        super().__init__(message)
