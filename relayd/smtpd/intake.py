"""The content phase of an SMTP session: DATA and BDAT, up to the 250 that says "queued".

Between the I/O discipline (``connection``) and the command state machine
(``protocol``) because both ways of carrying a message (RFC 5321 DATA, a
dot-terminated stream; RFC 3030 BDAT, counted chunks) end the same way and
must obey the same rules: the listener's size limit, its bare newline and
NUL policies, back-pressure from the spool, a refusal answered only once the
content has been read, and the 250 only once the message is durable
(design invariant 1).  The transaction itself (MAIL, RCPT) is the
subclass's; this class takes it from ``_tx`` and hands it back reset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.errors import SMTPReply
from relayd.smtpd.chunking import ChunkReader, parse_bdat
from relayd.smtpd.connection import BDAT, COMMAND, DATA, SMTPConnection
from relayd.smtpd.datareader import DataReader
from relayd.smtpd.transaction import Session, Transaction

if TYPE_CHECKING:
    from relayd.smtpd.factory import SMTPServerFactory

__all__ = ["MessageIntake"]

log = Logger(namespace="relayd.smtpd")


class MessageIntake(SMTPConnection):
    """DATA and BDAT for a session whose subclass runs MAIL and RCPT."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        super().__init__(factory)
        self._session: Session | None = None
        self._tx: Transaction | None = None
        self._reader = DataReader()
        # The BDAT chunk being read: (size, LAST, the error to answer) and
        # the octets still to come.
        self._chunk: tuple[int, bool, SMTPReply | None] = (0, False, None)
        self._chunk_left = 0
        #: Messages queued in this session (max_messages_per_session).
        self._messages = 0
        #: What a refusal is about, for its mail-log line: the command, or
        #: END-OF-MESSAGE (``rejectlog``).
        self._stage = "CONNECT"

    def do_DATA(self, arg: bytes) -> None:
        tx = self._tx
        if tx is None:
            raise SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if not tx.recipients:
            raise SMTPReply(554, "5.5.1", "Error: no valid recipients")
        if tx.chunks is not None:
            raise SMTPReply(503, "5.5.1", "Error: DATA in a BDAT transaction")
        if arg:
            raise SMTPReply(501, "5.5.4", "Syntax: DATA")
        assert self._session is not None
        tx.open(self._f.sink, self._session)
        self._reader = DataReader(normalize=self._listener.bare_newline == "normalize",
                                  strip_nul=self._listener.nul == "strip")
        self._mode = DATA
        self._deadline = self._f.clock.callLater(2 * self._listener.timeout, self._timed_out)
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def do_BDAT(self, arg: bytes) -> None:
        """RFC 3030: the ``size`` octets that follow are read whatever the
        answer, so they are never taken for commands."""
        size, last = parse_bdat(arg)
        tx, error = self._tx, None
        if tx is None:
            error = SMTPReply(503, "5.5.1", "Error: need MAIL command")
        elif not tx.recipients:
            error = SMTPReply(554, "5.5.1", "Error: no valid recipients")
        elif tx.chunks is None:
            assert self._session is not None
            tx.open(self._f.sink, self._session)
            tx.chunks = ChunkReader(normalize=self._listener.bare_newline == "normalize",
                                    strip_nul=self._listener.nul == "strip")
        self._chunk = (size, last, error)
        self._chunk_left = size
        self._mode = BDAT
        self._deadline = self._f.clock.callLater(2 * self._listener.timeout, self._timed_out)
        if size == 0:
            self._content_ended(b"")

    def _end_of_chunk(self) -> None:
        size, last, error = self._chunk
        tx = self._tx
        if error is not None:
            self.error_reply(error.code, error.enhanced, error.text)
        elif last:
            assert tx is not None and tx.chunks is not None
            self._write(tx, tx.chunks.finish(), tx.chunks)
            self._end_of_data()
        elif tx is not None and tx.error is not None:
            self.error_reply(tx.error.code, tx.error.enhanced, tx.error.text)
        else:
            self.reply(250, "2.0.0", f"Ok: {size} octets")

    # -- DATA ----------------------------------------------------------------

    def _feed_data(self, data: bytes) -> None:
        tx = self._tx
        if self._mode == BDAT:
            part, rest = data[: self._chunk_left], data[self._chunk_left :]
            self._chunk_left -= len(part)
            if tx is not None and tx.chunks is not None and self._chunk[2] is None:
                self._write(tx, tx.chunks.feed(part), tx.chunks)
            if not self._chunk_left:
                self._content_ended(rest)
            return
        assert tx is not None
        content, end = self._reader.feed(data)
        self._write(tx, content, self._reader)
        if end is not None:
            self._content_ended(end)

    def _write(self, tx: Transaction, content: bytes, reader: DataReader | ChunkReader) -> None:
        """Content to the spool, under the listener's bare newline and NUL rules."""
        behind = tx.write(content, self._listener.max_message_size)
        if behind is not None and not self._spool_behind:
            self._spool_behind = True
            self._update_reading()
            behind.addBoth(self._spool_caught_up)
        if reader.bare_newline and self._listener.bare_newline == "reject":
            tx.refuse(SMTPReply(554, "5.6.0", "Error: bare <CR> or <LF> received"))
        if reader.nul and self._listener.nul == "reject":
            tx.refuse(SMTPReply(554, "5.6.0", "Error: NUL character received"))

    def _content_ended(self, rest: bytes) -> None:
        """The DATA terminator or the last octet of a chunk: commands again."""
        chunk = self._mode == BDAT
        self._mode = COMMAND
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if rest:
            self._buf[:0] = rest
        if chunk:
            self._end_of_chunk()
        else:
            self._end_of_data()

    def _end_of_data(self) -> None:
        tx = self._tx
        assert tx is not None
        if tx.error is not None:
            e = tx.error
            self._stage = "END-OF-MESSAGE"
            self.error_reply(e.code, e.enhanced, e.text)
            self._reset_transaction()
            return
        d = tx.finish()
        d.addCallbacks(self._queued, self._not_queued, callbackArgs=(tx.size,))
        self.wait(d)

    def _queued(self, queue_id: str, size: int) -> None:
        self._reset_transaction()
        self._messages += 1
        self._f.metrics.messages_received.labels(self._listener.name).inc()
        self._f.metrics.message_size.labels(self._listener.name).observe(size)
        self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _not_queued(self, failure: Failure) -> None:
        self._stage = "END-OF-MESSAGE"
        if not failure.check(SMTPReply):
            log.failure("queue file write error for [{client}]", failure, client=self._client)
            self.error_reply(451, "4.3.0", "Error: queue file write error")
        else:
            e = failure.value
            assert isinstance(e, SMTPReply)
            self.error_reply(e.code, e.enhanced, e.text)
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            tx.abort()
