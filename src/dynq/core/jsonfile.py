"""Reading a JSON file someone else may have made (a shared profile, bench results): bounded before it is parsed.

The file must be a regular file (a FIFO or a device would block or never end), at most `max_bytes` long (checked
before reading, and again by reading one byte more), UTF-8, and JSON that Python's parser takes: nesting deeper
than its recursion limit is one line too, not a RecursionError. Every failure is a `BadInput` naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from dynq.errors import BadInput


def read_json(path: str | os.PathLike[str], what: str, remedy: str, max_bytes: int) -> object:
    """The parsed content of the JSON file `path`; `what` names the kind of file ("a dynq profile") and `remedy`
    ends every message (what the user does instead)."""
    p = Path(path)
    data = _read_bounded(p, what, remedy, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadInput(f"{p}: not {what} (not UTF-8 text at byte {e.start}); {remedy}") from None
    except RecursionError:
        raise BadInput(f"{p}: not {what} (JSON nested deeper than any such file is); {remedy}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{p}: not {what} (not JSON: {e.msg} at line {e.lineno}); {remedy}") from None


def _read_bounded(p: Path, what: str, remedy: str, max_bytes: int) -> bytes:
    too_big = f"{p}: not {what} (more than {max_bytes:,} bytes); {remedy}"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; for a regular file the flag changes nothing
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BadInput(f"{p}: cannot read {what} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{p}: not {what} (not a regular file); {remedy}")
        if st.st_size > max_bytes:
            raise BadInput(too_big)
        chunks: list[bytes] = []
        left = max_bytes + 1  # one byte more than allowed: a file that grew while being read is seen
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise BadInput(f"{p}: cannot read {what} ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while being read
        raise BadInput(too_big)
    return data
