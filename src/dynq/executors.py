"""Where independent units of work run: in this process, in local worker processes, or on a Ray cluster.

A unit is a self-describing task (the source's spec and fingerprint, one tensor or one expert of it, its importance
row, the encoder): a worker reopens the source itself from a shared filesystem, so no float32 weights cross the
network, only the encoded bytes come back. `ordered` yields the results in the tasks' order with at most `window`
tasks submitted and not yet consumed, so the driver's memory stays bounded whatever the cluster's size, and a writer
that must write in a declared order takes them as they come.

Faults are Ray's: a task whose worker process or node dies is retried (`max_retries`); a task that fails by itself
(a damaged tensor) fails the run once, with its own message, and is not retried.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

from dynq.errors import DynqError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Retries of a task whose worker died (Ray's own count; an exception raised by the task is never retried).
RAY_RETRIES = 4


class Executor(Protocol):
    name: str
    # Threads a task may use: the CPUs this executor gives each task (None: the caller's own thread count).
    task_threads: int | None

    def ordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """fn(task) for every task, in order."""
        ...

    def close(self) -> None: ...


class Serial:
    """In this process, one task after another."""

    name = "serial"
    task_threads: int | None = None

    def ordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        return map(fn, tasks)

    def close(self) -> None:
        pass


def _bounded(submit: Callable[[T], Any], result: Callable[[Any], R], tasks: Iterable[T], window: int) -> Iterator[R]:
    """Results in order, at most `window` tasks in flight or waiting to be consumed."""
    pending: deque[Any] = deque()
    for task in tasks:
        if len(pending) >= window:
            yield result(pending.popleft())
        pending.append(submit(task))
    while pending:
        yield result(pending.popleft())


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class LocalProcesses:
    """Worker processes on this machine (started fresh, not forked: the parent may hold threads and mapped files),
    at most one per usable CPU: a worker is an interpreter holding its own copy of the encoders (~250 MB), and more
    of them than CPUs only wait for each other (10,000 asked once started 22 and took 5.5 GB for a 2.7 MB model)."""

    def __init__(self, workers: int) -> None:
        cpus = usable_cpus()
        if workers > cpus:
            log.warning("%s worker processes asked for, and this machine gives dynq %s CPUs: using %s", f"{workers:,}",
                        cpus, cpus)  # fmt: skip
        self.workers = max(1, min(workers, cpus))
        self.name = f"{self.workers} local processes"
        self.task_threads: int | None = max(1, cpus // self.workers)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def ordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        def result(f: Future[R]) -> R:
            return f.result()

        return _bounded(lambda t: self._pool.submit(fn, t), result, tasks, 2 * self.workers)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class RayCluster:
    """Tasks on an existing Ray cluster (`address`: `auto` for the one this machine belongs to, or HOST:PORT)."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise DynqError("a Ray cluster needs the ray package: pip install 'ray==2.60.0'") from None
        self._ray = ray
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                         configure_logging=False)  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DynqError(f"Ray at {address}: no Ray cluster reachable there ({first}); start one with "
                                "`ray start --head` or give its address") from None  # fmt: skip
            self._owns_connection = True
        else:
            self._owns_connection = False
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))  # type: ignore[no-untyped-call]
        alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        self.name = f"Ray cluster at {address}: {len(alive)} nodes, {self.cpus} CPUs"
        self._remote: dict[Callable[..., Any], Any] = {}
        self.task_threads: int | None = 1  # each task reserves one CPU (num_cpus=1 below)

    def ordered(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        ray = self._ray
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn).options(num_cpus=1, max_retries=RAY_RETRIES, retry_exceptions=False)
        remote = self._remote[fn]

        def result(ref: Any) -> R:
            try:
                value: R = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause
                if isinstance(cause, DynqError):
                    raise DynqError(str(cause)) from None  # the task's own message, without Ray's traceback
                raise
            return value

        return _bounded(remote.remote, result, tasks, 2 * self.cpus)

    def close(self) -> None:
        if self._owns_connection:
            self._ray.shutdown()


def _check_reachable(address: str) -> None:
    """A HOST:PORT nothing answers on is one line in seconds (Ray itself waits a minute, printing C++ warnings)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise DynqError(f"Ray at {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                        "`ray start --head` or give its address") from None  # fmt: skip


def executor(ray: str | None = None, processes: int = 0) -> Executor:
    """Ray when `ray` names a cluster, else `processes` local worker processes, else this process."""
    if ray:
        return RayCluster(ray)
    if processes > 1:
        return LocalProcesses(processes)
    return Serial()
