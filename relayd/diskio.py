"""Blocking disk work, batched onto one worker thread (group commit).

fsync is the price of "250 means durable".  Paying one thread hop per
message costs more than it saves on a single-reactor process, and fsyncing
the queue directory once per message repeats work; so jobs queue up while
the worker is busy and the next batch runs them all, then fsyncs each
directory they touched once, then reports back to the reactor thread.
One thread also means jobs run strictly in submission order, which the
spool relies on (append, append, commit).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: list[bytes]) -> int:
    """``writev`` until every byte is written; returns the byte count."""
    total = sum(len(c) for c in chunks)
    written = 0
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views[:1024])
        written += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    assert written == total
    return written


class Batch:
    """Handed to each job: where it records the directories to fsync."""

    def __init__(self) -> None:
        self.dirs: set[str] = set()
        self.keep_open: set[str] = set()

    def sync_dir(self, path: str, keep_open: bool = False) -> None:
        """Have ``path`` fsynced after the batch.  ``keep_open``: the
        directory is ours for the life of the process (the spool's), so
        its descriptor can be kept between batches; not for a directory
        someone else may replace (a maildir)."""
        self.dirs.add(path)
        if keep_open:
            self.keep_open.add(path)


Job = Callable[[Batch], Any]


def _run_jobs(jobs: list[Job], dir_fds: dict[str, int] | None = None) -> list[tuple[bool, Any]]:
    """Run each job, then fsync the directories each one needs.

    A job whose directory fsync failed fails too: its rename may not be
    durable, so it must not be acknowledged.  ``dir_fds`` keeps directories
    open between batches (one system call per fsync instead of three).
    """
    results: list[tuple[bool, Any]] = []
    needs: list[set[str]] = []
    keep: set[str] = set()
    for job in jobs:
        batch = Batch()
        try:
            results.append((True, job(batch)))
        except BaseException:
            results.append((False, Failure()))
        needs.append(batch.dirs)
        keep |= batch.keep_open
    failed: dict[str, Failure] = {}
    for path in set().union(*needs) if needs else ():
        try:
            if dir_fds is None or path not in keep:
                fsync_dir(path)
            else:
                fd = dir_fds.get(path)
                if fd is None:
                    fd = dir_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(fd)
        except OSError:
            failed[path] = Failure()
    if failed:
        for i, dirs in enumerate(needs):
            bad = dirs & failed.keys()
            if bad and results[i][0]:
                results[i] = (False, failed[next(iter(bad))])
    return results


class DiskWriter:
    """The single disk worker thread with group commit."""

    def __init__(self, reactor: Any, name: str = "relayd-disk") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, name)
        self._pending: list[tuple[Job, Deferred[Any]]] = []
        self._busy = False
        self._idle_waiters: list[Deferred[None]] = []
        #: Used by the worker thread only; closed when it stops.
        self._dir_fds: dict[str, int] = {}
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> Deferred[None]:
        """Finish what was submitted, then stop the thread."""
        d: Deferred[None] = Deferred()
        if self._busy or self._pending:
            self._idle_waiters.append(d)
        else:
            d.callback(None)

        def stop_pool(_: object) -> None:
            self._pool.stop()
            fds, self._dir_fds = self._dir_fds, {}
            for fd in fds.values():
                os.close(fd)

        d.addCallback(stop_pool)
        return d

    def submit(self, job: Callable[[Batch], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self._pending.append((job, d))
        if not self._busy:
            self._dispatch()
        return d

    def _dispatch(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        self.batches += 1
        self.jobs += len(batch)
        jobs = [job for job, _ in batch]
        deferreds = [d for _, d in batch]

        def work() -> None:
            results = _run_jobs(jobs, self._dir_fds)
            self._reactor.callFromThread(self._done, deferreds, results)

        self._pool.callInThread(work)

    def _done(self, deferreds: list[Deferred[Any]], results: list[tuple[bool, Any]]) -> None:
        self._busy = False
        if self._pending:
            self._dispatch()
        for d, (ok, value) in zip(deferreds, results):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        if not self._busy and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)


class InlineDiskWriter:
    """The same contract, run at once in the calling thread.

    For unit tests (no threads, no reactor) and for the queue commands when
    no daemon runs.
    """

    batches = 0
    jobs = 0

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def submit(self, job: Callable[[Batch], T]) -> Deferred[T]:
        [(ok, value)] = _run_jobs([job])
        return succeed(value) if ok else fail(value)
