"""`dynq` that holds still at a known point, so a test can interrupt it there on a machine of any speed.

    python tests/held_run.py MODULE:QUALNAME N -- DYNQ-ARGS...

runs `dynq DYNQ-ARGS` with MODULE.QUALNAME wrapped: after its N-th call returns, the run prints "held" on stdout and
sleeps until it is signalled. A run that ends before that prints nothing. `start_held` starts one and waits for it."""

from __future__ import annotations

import functools
import importlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__)


def start_held(target: str, calls: int, args: list[str], stderr: IO[bytes] | int = subprocess.DEVNULL,
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], bool]:  # fmt: skip
    """Start `dynq ARGS` held after `calls` returns of `target`; returns the process and whether it is held (False:
    it ended first). Its stdout is read here; give `stderr` a file, never a pipe nobody reads."""
    proc = subprocess.Popen([sys.executable, str(HERE), target, str(calls), "--", *args], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline() == "held\n"


def _hold_after(target: str, calls: int) -> None:
    module, qualname = target.split(":")
    owner: Any = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    seen = 0

    @functools.wraps(original)
    def held(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        result = original(*args, **kwargs)
        seen += 1
        if seen == calls:
            print("held", flush=True)
            while True:
                time.sleep(3600)
        return result

    setattr(owner, name, held)


if __name__ == "__main__":
    target, calls, separator, *rest = sys.argv[1:]
    assert separator == "--", __doc__
    # Ctrl-C as at a terminal, even when the test run was started in the background (a shell's `&` ignores SIGINT
    # for its children, and Python then keeps it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _hold_after(target, int(calls))
    sys.argv = ["dynq", *rest]
    from dynq.cli import main

    main()
