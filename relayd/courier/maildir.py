"""Delivery into a local maildir (``[route.NAME] maildir = DIR``).

The file name comes from the queue id, not from the time of the attempt, so
delivering the same message twice (a crash between delivery and dequeue)
overwrites one file instead of making a second copy.  Files are written
tmp/ -> fsync -> new/ -> fsync(new/) like any maildir writer that cares
(qmail's maildir spec; Dovecot), with LF line ends as maildir readers expect.

A big message is copied from its spool file a chunk at a time, converting
CRLF to LF on the way (which is why this is no ``os.sendfile``/
``copy_file_range``): the disk thread's memory stays one chunk.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayd.content import Content, as_content
from relayd.diskio import Batch, write_all
from relayd.envelope import DeliveryResult, Envelope
from relayd.errors import TransientDeliveryError
from relayd.interfaces import ICourier

log = Logger(namespace="relayd.courier")

#: Bytes read from the spool file per write into the maildir.
COPY_CHUNK = 64 * 1024


def _safe_hostname(hostname: str) -> str:
    # The maildir spec: '/' and ':' cannot appear in the host part.
    return hostname.replace("/", "\\057").replace(":", "\\072")


@implementer(ICourier)
class MaildirCourier:
    """Writes each message as one file in a maildir.

    :param disk: the ``relayd.diskio`` writer that runs the blocking work;
        deliveries in one batch share the fsync of ``new/``.
    :param clock: when this process started, for telling a redelivery
        after a crash; the reactor when not given.
    """

    def __init__(self, directory: str, disk: Any, hostname: str | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.directory = directory
        self._disk = disk
        self._host = _safe_hostname(hostname or socket.gethostname())
        self._ready = False
        # Messages older than this process may have been delivered by a
        # previous one that crashed before dequeueing them.
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        assert clock is not None
        self._started = clock.seconds()

    @property
    def relay(self) -> str:
        return f"maildir:{self.directory}"

    def stop(self) -> None:
        """Nothing to release: every delivery opens and closes its own files."""
        return None

    def file_name(self, queue_id: str, envelope: Envelope) -> str:
        return f"{int(envelope.arrival)}.R{queue_id}.{self._host}"

    def deliver(self, queue_id: str, envelope: Envelope,
                content: Content | bytes) -> Deferred[DeliveryResult]:
        name = self.file_name(queue_id, envelope)
        trace = [f"Return-Path: <{envelope.sender}>\r\n".encode()]
        trace += [f"X-Original-To: <{r}>\r\n".encode() for r in envelope.recipients]
        head = [b"".join(trace).replace(b"\r\n", b"\n")]
        message = as_content(content)
        if message.data is not None:
            head.append(message.data.replace(b"\r\n", b"\n"))
        older = envelope.arrival < self._started
        d = self._disk.submit(lambda batch: self._write(batch, name, head, message, older))

        def failed(failure: Any) -> None:
            failure.trap(OSError)
            self._ready = False
            raise TransientDeliveryError(f"cannot write to maildir {self.directory}: "
                                         f"{failure.value.strerror or failure.value}")

        return d.addErrback(failed)

    def _write(self, batch: Batch, name: str, head: list[bytes], content: Content,
               older: bool) -> DeliveryResult:
        base = self.directory
        new = os.path.join(base, "new", name)
        if not self._ready:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(base, sub), mode=0o700, exist_ok=True)
            self._ready = True
        if os.path.exists(new) or (older and self._in_cur(name)):
            # The earlier copy's rename may not be durable yet (its fsync of
            # new/ can have failed): sync again before saying so.
            batch.sync_dir(os.path.join(base, "new"))
            return DeliveryResult(self.relay, "250 2.0.0 Ok: already delivered")
        tmp = os.path.join(base, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, head)
            if content.data is None:
                _copy_lf(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, new)
        batch.sync_dir(os.path.join(base, "new"))
        return DeliveryResult(self.relay, f"250 2.0.0 Ok: delivered as {name}")

    def _in_cur(self, name: str) -> bool:
        """Has a reader already moved (and maybe flagged) our copy to cur/?

        A directory scan, so only done for messages from before this process
        started: only those can have been delivered without being dequeued.
        """
        prefix = name + ":"
        with os.scandir(os.path.join(self.directory, "cur")) as entries:
            return any(e.name == name or e.name.startswith(prefix) for e in entries)


def _copy_lf(fd: int, content: Content) -> None:
    """Append a spool file region to ``fd`` with CRLF as LF, a chunk at a time.

    A CR that ends a chunk is held back until the next one shows whether an
    LF follows, so a CRLF split between two reads still becomes one LF.
    """
    carry = b""
    for chunk in content.chunks(COPY_CHUNK):
        if carry:
            chunk = carry + chunk
        if chunk.endswith(b"\r"):
            chunk, carry = chunk[:-1], b"\r"
        else:
            carry = b""
        write_all(fd, [chunk.replace(b"\r\n", b"\n")])
    if carry:
        write_all(fd, [carry])
