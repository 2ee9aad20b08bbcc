"""The spool: queued messages as files, made durable before the 250.

Layout under the spool directory::

    tmp/QID          being written; anything here at start is a leftover
    messages/QID     one file per queued message: a JSON envelope line,
                     then the content (CRLF lines, as received)
    state/QID.json   retry state of a deferred or held message, and what
                     happened to it (absent for a message never tried)
    corrupt/QID      files that could not be read, kept for a human
    history.log      the final state of messages that left the queue, one
                     line each (``relayd.queue.journal``; rotated to .1)

One file per message means one fsync and one rename per message, and the
directory fsync is shared by a whole batch (``relayd.diskio``).  The
envelope never changes after the 250; what changes (attempts, next try,
hold) goes to the small state file, rewritten atomically; what happened
to a message after it left goes to ``history.log`` (``relayd.queue.journal``).
It stays one module past 400 lines because writer, recovery and state are
one file format: each commit and removal step is written next to what a
crash at that step costs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayd.content import IN_MEMORY_LIMIT, Content, patch_chunks
from relayd.diskio import Batch, InlineDiskWriter, fsync_dir, write_all
from relayd.envelope import Envelope, QueuedMessage, QueueId, is_queue_id, new_queue_id
from relayd.interfaces import ISpool, ISpoolWriter
from relayd.queue import journal
from relayd.queue.journal import state_json, with_state

log = Logger(namespace="relayd.queue")

#: The envelope line's ``"v"``.  2 (routing): per-recipient ``routes`` and
#: ``originals`` in the envelope.  A version-1 file (written before routing)
#: reads as version 2 with every recipient on the envelope's ``route``, which
#: is exactly what it meant: that is the whole upgrade, done at read time, so
#: a spool survives the package upgrade without a conversion step.  A newer
#: version than this is refused (moved to corrupt/ for a human) rather than
#: misread by an older relayd after a downgrade.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Content held in memory before it goes to the tmp file.  Most relay mail is
#: far smaller, and for it the whole file is written by one writev at commit.
SPILL_THRESHOLD = 1024 * 1024
#: Content handed to the disk thread but not written yet, past which
#: ``SpoolWriter.write`` asks its caller to stop (the SMTP server stops
#: reading the client): a client faster than the disk, or a disk stalled by
#: dirty-page throttling, must not park a whole big message in memory.
MAX_BACKLOG = 4 * SPILL_THRESHOLD
#: An envelope line longer than this is not ours (100 recipients of 2 KB
#: each still fit).
MAX_ENVELOPE_LINE = 4 * 1024 * 1024


def _header(queue_id: QueueId, envelope: Envelope) -> bytes:
    record = {"v": FORMAT_VERSION, "queue_id": queue_id, "envelope": envelope.to_json()}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class CorruptMessage(Exception):
    """A queue file whose envelope cannot be read."""


def read_envelope(f: Any, size: int) -> tuple[Envelope, int]:
    """Parse the envelope line of an open queue file.

    :return: the envelope (with ``size`` set) and the content's offset.
    """
    line = f.readline(MAX_ENVELOPE_LINE)
    if not line.endswith(b"\n"):
        raise CorruptMessage("no envelope line")
    try:
        record = json.loads(line)
        if record.get("v") not in READABLE_VERSIONS:
            raise CorruptMessage(f"unknown format version {record.get('v')!r}")
        envelope = Envelope.from_json(record["envelope"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptMessage(f"bad envelope: {e}") from e
    return evolve(envelope, size=size - len(line)), len(line)


@implementer(ISpoolWriter)
class SpoolWriter:
    """One message on its way into ``messages/``."""

    def __init__(self, spool: Spool, queue_id: QueueId, envelope: Envelope) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self._envelope = envelope
        self._chunks: list[bytes] = [_header(queue_id, envelope)]
        self._content_start = len(self._chunks[0])
        self._held = 0
        self._size = 0
        self._spilled = False
        self._error: BaseException | None = None
        self._done = False
        #: Bytes submitted to the disk thread and not written yet.
        self._backlog = 0
        self._drained: Deferred[None] | None = None

    @property
    def _tmp(self) -> str:
        return self._spool.path("tmp", self.queue_id)

    def write(self, data: bytes) -> Deferred[None] | None:
        """Append ``data``; a Deferred instead of None says the disk thread
        is behind: feed no more until it fires."""
        self._chunks.append(data)
        self._held += len(data)
        self._size += len(data)
        if self._held >= SPILL_THRESHOLD:
            self._spill()
        if self._backlog > MAX_BACKLOG:
            if self._drained is None:
                self._drained = Deferred()
            return self._drained
        return None

    def _spill(self) -> None:
        """Hand what is held to the disk thread; jobs run in order, so the
        commit that follows sees every byte."""
        chunks, size = self._chunks, self._held
        self._chunks, self._held = [], 0
        first = not self._spilled
        self._spilled = True
        tmp = self._tmp

        def append(batch: Batch) -> None:
            if self._error is not None:
                return
            try:
                flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if first else 0)
                fd = os.open(tmp, flags, 0o600)
                try:
                    write_all(fd, chunks)
                finally:
                    os.close(fd)
            except BaseException as e:
                self._error = e

        self._backlog += size
        self._spool.disk.submit(append).addBoth(self._written, size)

    def _written(self, _: object, size: int) -> None:
        self._backlog -= size
        if self._drained is not None and self._backlog <= MAX_BACKLOG // 2:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite content written earlier: in memory if it is still held,
        else in the tmp file by a disk job (jobs run in order: the commit
        that follows sees it)."""
        on_disk = self._size - self._held
        if offset + len(data) > self._size:
            raise ValueError(f"patch beyond the {self._size} bytes written")
        if offset >= on_disk:
            # Before the first spill the envelope line is chunk 0.
            skip = 0 if self._spilled else self._content_start
            patch_chunks(self._chunks, skip + offset - on_disk, data)
            return
        split = min(len(data), on_disk - offset)
        if split < len(data):
            self.patch(offset + split, data[split:])
        where, data = self._content_start + offset, data[:split]
        tmp = self._tmp

        def pwrite(batch: Batch) -> None:
            if self._error is not None:
                return
            try:
                fd = os.open(tmp, os.O_WRONLY)
                try:
                    os.pwrite(fd, data, where)
                finally:
                    os.close(fd)
            except BaseException as e:
                self._error = e

        self._spool.disk.submit(pwrite)

    def commit(self) -> Deferred[QueuedMessage]:
        """Make the message durable; fires with its ``QueuedMessage``.

        The disk thread does the writing (creating a file waits for the
        journal while another fsync commits it: measured at ~10% of the
        reactor's time when done here), with as few system calls as it can:
        each one is a wait for the GIL on the way back.
        """
        self._done = True
        chunks, self._chunks = self._chunks, []
        spilled = self._spilled
        tmp = self._tmp
        final = self._spool.path("messages", self.queue_id)
        messages_dir = self._spool.path("messages")
        message = QueuedMessage(self.queue_id, evolve(self._envelope, size=self._size))
        # Queue ids never repeat within a process and the spool is locked to
        # one daemon, so a name taken now can only be an earlier run's file:
        # checked once here (a lookup, no journal), it cannot appear before
        # the rename.
        if os.path.lexists(final):
            self._spool.discard_tmp(self.queue_id)
            return fail(OSError(errno.EEXIST, "queue id already in use", final))

        def commit(batch: Batch) -> QueuedMessage:
            if self._error is not None:
                raise self._error
            flags = os.O_WRONLY | (os.O_APPEND if spilled else os.O_CREAT | os.O_EXCL)
            fd = os.open(tmp, flags, 0o600)
            try:
                write_all(fd, chunks)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            batch.sync_dir(messages_dir, keep_open=True)
            return message

        d = self._spool.disk.submit(commit)
        d.addErrback(self._cleanup_after_failure)
        return d

    def _cleanup_after_failure(self, failure: Any) -> Any:
        self._spool.discard_tmp(self.queue_id)
        return failure

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._chunks = []
        if self._spilled:
            self._spool.discard_tmp(self.queue_id)


@implementer(ISpool)
class Spool:
    """The spool directory and the operations the queue manager needs."""

    def __init__(self, directory: str, clock: IReactorTime, disk: Any = None) -> None:
        self.directory = directory
        self._clock = clock
        self.disk = disk if disk is not None else InlineDiskWriter()
        #: Queue ids that may have a state file: most messages are delivered
        #: at the first attempt and never get one, and ``remove`` then saves
        #: the disk thread a system call.  A state file missed here is an
        #: orphan that ``recover`` removes at the next start.
        self._stateful: set[QueueId] = set()
        self._journal = journal.Journal(directory)

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def prepare(self) -> None:
        """Create the directories (owner-only) if they are missing.

        Synchronous: called once before listening, when blocking is fine.
        """
        for sub in ("", "tmp", "messages", "state", "corrupt"):
            os.makedirs(self.path(sub), mode=0o700, exist_ok=True)

    def lock(self, blocking: bool = False) -> int | None:
        """Take the spool's lock: one daemon per spool, and the queue
        commands work on the files directly only while no daemon runs.

        :return: the lock's file descriptor (keep it open to keep the lock),
            or None when someone else holds it.
        """
        fd = os.open(self.path("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def writable(self) -> bool:
        """Can we create a file in the spool right now (readiness)?

        A real create and unlink, because permission bits say nothing when
        running as root and nothing about a file system remounted read-only.
        """
        probe = self.path("tmp", f".probe-{os.getpid()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.unlink(probe)
        except OSError:
            return False
        return os.path.isdir(self.path("messages"))

    def free_space(self) -> int:
        """Bytes available to an unprivileged writer on the spool's file system."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def open_message(self, envelope: Envelope) -> SpoolWriter:
        return SpoolWriter(self, new_queue_id(self._clock.seconds()), envelope)

    def discard_tmp(self, queue_id: QueueId) -> None:
        tmp = self.path("tmp", queue_id)

        def unlink(batch: Batch) -> None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

        self.disk.submit(unlink).addErrback(
            lambda f: log.failure("{queue_id}: cannot remove {path}", f, queue_id=queue_id,
                                  path=tmp)
        )

    def recover(self) -> Deferred[list[QueuedMessage]]:
        """Remove partial leftovers and list every queued message, oldest first."""
        return self.disk.submit(lambda batch: self._recover())

    def _recover(self) -> list[QueuedMessage]:
        for name in os.listdir(self.path("tmp")):
            try:
                os.unlink(self.path("tmp", name))
                log.info("removed partial queue file tmp/{name}", name=name)
            except OSError as e:
                log.warn("cannot remove tmp/{name}: {error}", name=name, error=e)
        found: list[QueuedMessage] = []
        present = set()
        for name in os.listdir(self.path("messages")):
            if not is_queue_id(name):
                continue
            try:
                found.append(self._read(name))
                present.add(name)
            except (CorruptMessage, OSError, ValueError) as e:
                log.error("{queue_id}: unreadable queue file moved to corrupt/: {error}",
                          queue_id=name, error=e)
                try:
                    os.rename(self.path("messages", name), self.path("corrupt", name))
                except OSError:
                    pass
        for name in os.listdir(self.path("state")):
            qid = name.removesuffix(".json")
            if qid not in present:
                try:
                    os.unlink(self.path("state", name))
                except OSError:
                    pass
        found.sort(key=lambda m: (m.envelope.arrival, m.queue_id))
        return found

    def _read(self, queue_id: QueueId) -> QueuedMessage:
        with open(self.path("messages", queue_id), "rb") as f:
            envelope, _ = read_envelope(f, os.fstat(f.fileno()).st_size)
        message = QueuedMessage(queue_id, envelope)
        try:
            with open(self.path("state", queue_id + ".json"), "rb") as f:
                state = json.load(f)
        except FileNotFoundError:
            return message
        self._stateful.add(queue_id)
        return with_state(message, state)

    def read(self, queue_id: QueueId) -> Deferred[QueuedMessage]:
        """The envelope and state of one message (for the queue commands)."""
        return self.disk.submit(lambda batch: self._read(queue_id))

    def load(self, queue_id: QueueId) -> Deferred[Content]:
        """The content of a queued message: read here when small (no
        blocking read left for the reactor thread), else the region of the
        queue file after the envelope line, which couriers read in chunks."""
        path = self.path("messages", queue_id)

        def load(batch: Batch) -> Content:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                _, offset = read_envelope(f, size)
                if size - offset <= IN_MEMORY_LIMIT:
                    return Content.of(f.read())
            return Content.region(path, offset, size - offset)

        return self.disk.submit(load)

    def defer(self, message: QueuedMessage) -> Deferred[None]:
        """Persist retry state, so a restart keeps attempts and back-off."""
        state = json.dumps(state_json(message), ensure_ascii=False).encode("utf-8")
        final = self.path("state", message.queue_id + ".json")
        tmp = self.path("tmp", message.queue_id + ".state")
        state_dir = self.path("state")

        self._stateful.add(message.queue_id)

        def write_state(batch: Batch) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, [state])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            batch.sync_dir(state_dir, keep_open=True)

        return self.disk.submit(write_state)

    def remove(self, queue_id: QueueId, final: QueuedMessage | None = None) -> Deferred[None]:
        """Forget a delivered message; ``final`` (its last state and
        history) goes to the journal for ``relayd queue show``.

        No fsync: if the unlink is lost in a crash the message is delivered
        again, which couriers make harmless (the maildir file name is the
        queue id) or at worst a duplicate, never a loss.
        """
        message = self.path("messages", queue_id)
        state = self.path("state", queue_id + ".json") if queue_id in self._stateful else None
        self._stateful.discard(queue_id)

        def unlink(batch: Batch) -> None:
            os.unlink(message)
            if state is not None:
                try:
                    os.unlink(state)
                except FileNotFoundError:
                    pass
            if final is not None:
                # Encoded here, on the disk thread (about 20 us a message):
                # the reactor thread only hands over the frozen value.
                try:
                    self._journal.append(journal.line(final))
                except Exception as e:  # a history never costs the removal itself
                    log.warn("{queue_id}: history not kept: {error}", queue_id=queue_id, error=e)

        return self.disk.submit(unlink)

    def finished(self, queue_id: QueueId) -> Deferred[QueuedMessage | None]:
        """The last state of a message that has left the queue, if the
        journal still has it (``relayd queue show`` of a delivered message)."""
        return self.disk.submit(lambda batch: self._journal.find(queue_id))


def control_socket_path(spool: str) -> str:
    return os.path.join(spool, "control.sock")


def control_socket_address(spool: str) -> str:
    """The path to bind or connect to.

    A Unix socket path is limited to 107 bytes; a deep spool directory is
    reached through ``/proc/self/fd`` of an open directory instead (Linux),
    which keeps the socket in the spool where its permissions protect it.
    The directory descriptor stays open for the life of the process.
    """
    path = control_socket_path(spool)
    if len(os.fsencode(path)) < 100:
        return path
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/control.sock"


__all__ = ["Spool", "SpoolWriter", "CorruptMessage", "read_envelope", "fsync_dir"]
