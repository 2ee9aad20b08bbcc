"""An in-memory ``ISpool`` with the real spool's semantics (the contract
suite runs both)."""

from __future__ import annotations

import errno
import os

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from relayd.content import Content, patch_chunks
from relayd.envelope import Envelope, QueuedMessage, QueueId, new_queue_id
from relayd.interfaces import (
    ISpool,
    ISpoolWriter,
)


@implementer(ISpoolWriter)
class MemorySpoolWriter:
    """One message on its way into a :class:`MemorySpool`.

    Like ``SpoolWriter``, the queue id is fixed when writing starts (it goes
    into ``Received:``) and nothing is visible to ``recover``/``load`` until
    ``commit`` has succeeded.  ``write`` after ``commit``/``abort`` raises
    ``AssertionError``: the real writer would silently lose such bytes, so a
    caller doing it is a bug the fake should make loud.
    """

    def __init__(self, spool: MemorySpool, queue_id: QueueId, envelope: Envelope) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.envelope = envelope
        self.chunks: list[bytes] = []
        #: "open", then "committed", "failed" or "aborted".
        self.state = "open"

    @property
    def content(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert self.state == "open", f"write() after {self.state}"
        assert isinstance(data, bytes), f"write() of {type(data).__name__}"
        self.chunks.append(data)

    def patch(self, offset: int, data: bytes) -> None:
        assert self.state == "open", f"patch() after {self.state}"
        patch_chunks(self.chunks, offset, data)

    def commit(self) -> Deferred[QueuedMessage]:
        assert self.state == "open", f"commit() after {self.state}"
        spool = self._spool
        if spool.fail_commit is not None:
            self.state = "failed"
            return fail(spool.fail_commit)
        if self.queue_id in spool.contents:
            # The real spool's exclusive rename: never overwrite a queued message.
            self.state = "failed"
            return fail(OSError(errno.EEXIST, "queue id already in use", self.queue_id))
        content = self.content
        message = QueuedMessage(self.queue_id, attrs.evolve(self.envelope, size=len(content)))
        spool.messages[self.queue_id] = message
        spool.contents[self.queue_id] = content
        spool.committed.append(self.queue_id)
        self.state = "committed"
        return succeed(message)

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
            self.chunks = []
            self._spool.aborted.append(self.queue_id)


@implementer(ISpool)
class MemorySpool:
    """An ``ISpool`` in dictionaries, with ``relayd.queue.spool.Spool``'s semantics.

    Why: the queue manager and cleanup are about *which* spool operations
    happen and in what order, not about files; a dictionary makes those
    tests fast and lets them inject failures the disk rarely produces.
    ``tests/unit/test_spool_contract.py`` runs the same tests against this and the
    real spool, so the two cannot drift apart.

    Every Deferred has already fired when returned (as with
    ``InlineDiskWriter``).  Missing messages fail ``load``/``read``/``remove``
    with ``FileNotFoundError``, as the real spool's ``open``/``unlink`` do.

    Knobs, set as attributes: ``fail_commit``, ``fail_load``, ``fail_defer``,
    ``fail_remove``, ``fail_recover``: an exception instance to fail that
    operation with (``None``: work normally).  ``is_writable``: what
    ``writable()`` answers.

    Records: ``loads``, ``removes`` (queue ids, every call), ``defers`` (the
    ``QueuedMessage`` of every ``defer`` call), ``committed``/``aborted``
    (queue ids), ``writers`` (every writer opened).

    :param directory: only for ``Cleanup``'s free-space check (``statvfs``).
    """

    def __init__(self, clock: IReactorTime | None = None, directory: str = os.curdir) -> None:
        self.clock = clock if clock is not None else Clock()
        self.directory = directory
        self.messages: dict[QueueId, QueuedMessage] = {}
        self.contents: dict[QueueId, bytes] = {}
        #: What ``remove`` was told the removed messages ended as.
        self.finished_messages: dict[QueueId, QueuedMessage] = {}
        self.fail_commit: BaseException | None = None
        self.fail_load: BaseException | None = None
        self.fail_defer: BaseException | None = None
        self.fail_remove: BaseException | None = None
        self.fail_recover: BaseException | None = None
        self.is_writable = True
        self.prepared = False
        self.loads: list[QueueId] = []
        self.removes: list[QueueId] = []
        self.defers: list[QueuedMessage] = []
        self.committed: list[QueueId] = []
        self.aborted: list[QueueId] = []
        self.writers: list[MemorySpoolWriter] = []

    def __len__(self) -> int:
        return len(self.messages)

    def prepare(self) -> None:
        self.prepared = True

    def writable(self) -> bool:
        return self.is_writable

    def free_space(self) -> int:
        """What the file system of ``directory`` has free (``statvfs``), so
        cleanup's free-space tests can point it at a real or missing path."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def open_message(self, envelope: Envelope) -> MemorySpoolWriter:
        writer = MemorySpoolWriter(self, new_queue_id(self.clock.seconds()), envelope)
        self.writers.append(writer)
        return writer

    def add(self, message: QueuedMessage, content: bytes) -> QueuedMessage:
        """Put a message straight in, as if an earlier run had queued it
        (for recovery tests); ``envelope.size`` is set from ``content``."""
        message = attrs.evolve(message, envelope=attrs.evolve(message.envelope, size=len(content)))
        self.messages[message.queue_id] = message
        self.contents[message.queue_id] = content
        return message

    def recover(self) -> Deferred[list[QueuedMessage]]:
        if self.fail_recover is not None:
            return fail(self.fail_recover)
        return succeed(sorted(self.messages.values(),
                              key=lambda m: (m.envelope.arrival, m.queue_id)))

    def read(self, queue_id: QueueId) -> Deferred[QueuedMessage]:
        if queue_id not in self.messages:
            return fail(FileNotFoundError(errno.ENOENT, "no such queued message", queue_id))
        return succeed(self.messages[queue_id])

    def load(self, queue_id: QueueId) -> Deferred[Content]:
        """Always ``Content`` in memory: there is no file to point into."""
        self.loads.append(queue_id)
        if self.fail_load is not None:
            return fail(self.fail_load)
        if queue_id not in self.contents:
            return fail(FileNotFoundError(errno.ENOENT, "no such queued message", queue_id))
        return succeed(Content.of(self.contents[queue_id]))

    def defer(self, message: QueuedMessage) -> Deferred[None]:
        """Keep only the retry state, as the real spool's state file does
        (the envelope stays the one committed); unknown ids are ignored,
        as the real spool's orphan state files are at recovery."""
        self.defers.append(message)
        if self.fail_defer is not None:
            return fail(self.fail_defer)
        stored = self.messages.get(message.queue_id)
        if stored is not None:
            self.messages[message.queue_id] = attrs.evolve(
                stored,
                attempts=message.attempts,
                next_attempt=message.next_attempt,
                last_error=message.last_error,
                held=message.held,
                done=message.done,
                history=message.history,
                history_omitted=message.history_omitted,
            )
        return succeed(None)

    def remove(self, queue_id: QueueId, final: QueuedMessage | None = None) -> Deferred[None]:
        self.removes.append(queue_id)
        if self.fail_remove is not None:
            return fail(self.fail_remove)
        if queue_id not in self.messages:
            return fail(FileNotFoundError(errno.ENOENT, "no such queued message", queue_id))
        del self.messages[queue_id]
        del self.contents[queue_id]
        if final is not None:
            self.finished_messages[queue_id] = final
        return succeed(None)

    def finished(self, queue_id: QueueId) -> Deferred[QueuedMessage | None]:
        return succeed(self.finished_messages.get(queue_id))
