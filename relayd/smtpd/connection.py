"""The I/O half of an SMTP session: bounded input, replies in order, flow control, timers.

``SMTPServerProtocol`` (``relayd.smtpd.protocol``) decides what a line
means; this base class decides when one is read.  Apart because the rules
here hold whatever the commands are: input is split in batches and
processing stops while any reply is pending (so pipelined commands are
answered strictly in order, even behind an asynchronous check); no buffer
grows without bound (over-long lines are dropped as they arrive, reading
stops when the client does not read our replies or the spool falls
behind); the idle timer times the client, never us; and too many errors end
the session (Postfix smtpd_hard_error_limit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.config import ListenerConfig
from relayd.errors import SMTPReply
from relayd.netio import write_now
from relayd.smtpd.lines import TOO_LONG, CommandLines

if TYPE_CHECKING:
    from relayd.smtpd.factory import SMTPServerFactory

__all__ = ["BDAT", "CLOSING", "COMMAND", "DATA", "PIPELINE_BUFFER_LIMIT", "SMTPConnection"]

log = Logger(namespace="relayd.smtpd")

#: Pipelined input held while a reply is pending; beyond it reading stops
#: (TCP back-pressure) rather than growing the buffer.
PIPELINE_BUFFER_LIMIT = 64 * 1024

COMMAND, DATA, BDAT, CLOSING = "command", "data", "bdat", "closing"
#: Modes in which input is message content, not commands.
_CONTENT = (DATA, BDAT)


@implementer(IHalfCloseableProtocol)
class SMTPConnection(Protocol):
    """Input, output and timers of one session; the commands are the subclass's."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        self._f = factory
        # A session keeps the listener config it started with: a reload
        # (SMTPServerFactory.reconfigure) changes what new sessions get,
        # never the rules in the middle of someone's transaction.
        self._listener: ListenerConfig = factory.listener
        self._lines = CommandLines()
        self._buf = self._lines.buf
        self._mode = COMMAND
        self._waiting = False
        self._in_process = False
        # Reading from the client stops while the transport cannot take our
        # replies (a client that does not read) or while a reply is pending
        # and too much pipelined input is already buffered.
        self._replies_blocked = False
        self._reading_paused = False
        self._producing = False  # registered as the transport's producer
        # ... and while the spool has not caught up with the message's content
        # (a client faster than the disk must not park the message in memory).
        self._spool_behind = False
        self._errors = 0
        #: The client half-closed (readConnectionLost): nothing more will come.
        self._eof = False
        self._idle: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None

    # -- what the subclass says ------------------------------------------------

    @property
    def _client(self) -> str:
        raise NotImplementedError

    def _line(self, line: bytes) -> None:
        """A complete command line (without CRLF) to act on."""
        raise NotImplementedError

    def _too_long(self) -> None:
        """The line that just ended was over ``_line_limit()``."""
        raise NotImplementedError

    def _line_limit(self) -> int:
        raise NotImplementedError

    def _feed_data(self, data: bytes) -> None:
        """Bytes of message content (mode DATA or BDAT)."""
        raise NotImplementedError

    def _close_if_idle(self) -> None:
        """Called while stopping, whenever the session may be idle."""

    def _rejected(self, code: int, enhanced: str | None, text: str) -> None:
        """A refusal is about to be answered: count and log it."""
        raise NotImplementedError

    def _refuse(self, code: int, enhanced: str, text: str) -> None:
        """Refuse and close (421 on policy: too many errors, connections...)."""
        if self._mode != CLOSING:
            self._rejected(code, enhanced, text)
        self._close(code, enhanced, text)

    @property
    def _t(self) -> Any:
        """The transport, with the producer/TLS methods ITransport does not name."""
        return self.transport

    # -- timers ------------------------------------------------------------

    def _touch(self) -> None:
        """Restart the idle timer; called for each command and DATA chunk."""
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._listener.timeout)
        elif self.connected:
            self._idle = self._f.clock.callLater(self._listener.timeout, self._timed_out)

    # -- flow control (IPushProducer, registered with our transport) ---------

    def pauseProducing(self) -> None:
        self._replies_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._replies_blocked = False
        self._update_reading()

    def stopProducing(self) -> None:
        pass

    def _update_reading(self) -> None:
        pause = (self._replies_blocked or self._spool_behind
                 or (self._waiting and len(self._buf) > PIPELINE_BUFFER_LIMIT))
        if (pause != self._reading_paused and self.connected and self._mode != CLOSING
                and not self._eof):
            self._reading_paused = pause
            if pause:
                self._t.pauseProducing()
            else:
                self._t.resumeProducing()

    def _timed_out(self) -> None:
        if self._mode == CLOSING:
            # Our last reply never drained (the client stopped reading).
            self._t.abortConnection()
            return
        log.info("timeout after {mode} from [{client}]", mode=self._mode, client=self._client)
        self._close(421, "4.4.2", f"{self._f.hostname} Error: timeout exceeded")

    def _suspend_timer(self) -> None:
        """RFC 5321 §4.5.3.2.7 times the client, not us: no idle timeout
        while we owe a reply (a slow commit must not become a 421 for a
        message that is then queued anyway, and sent twice)."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _lose(self) -> None:
        """Close after the replies are out.  Twisted's TLS transport holds
        loseConnection back while a producer is registered: without this, a
        TLS session stayed open after its 221 (no close_notify, no FIN) until
        the idle timeout aborted it."""
        if self._producing:
            self._producing = False
            self._t.unregisterProducer()
        self._t.loseConnection()

    def _close(self, code: int, enhanced: str, text: str) -> None:
        if self._mode == CLOSING:
            return
        self.reply(code, enhanced, text)
        self._mode = CLOSING
        self._buf.clear()
        self._lose()
        # If the client does not read, the close never completes: the next
        # idle timeout aborts the connection.
        self._touch()

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == CLOSING:
            return
        if self._mode in _CONTENT and not self._buf and not self._in_process:
            # The common case in DATA/BDAT: no copy into the command buffer.
            self._touch()
            self._feed_data(data)
        else:
            self._buf += data
        self._process()

    def _process(self) -> None:
        """Answer what is buffered until a reply has to wait.

        One loop, never re-entered: a Deferred that fires synchronously
        (``_resume``) lets this loop continue instead of recursing, so any
        number of pipelined messages costs no stack.
        """
        if self._in_process:
            return
        self._in_process = True
        try:
            while self._mode != CLOSING:
                if self._mode in _CONTENT:
                    if not self._buf:
                        break
                    data = bytes(self._buf)
                    self._buf.clear()
                    self._touch()
                    self._feed_data(data)
                    continue
                if self._waiting:
                    break
                line = self._next_line()
                if line is None:
                    break
                self._touch()
                self._line(line)
                if self._f.shutting_down:
                    self._close_if_idle()
        finally:
            self._in_process = False
        if self._eof and not self._waiting and self._mode != CLOSING:
            # The client sent all it will send and everything it sent has
            # been answered: the end (an unfinished message is dropped).
            self._mode = CLOSING
            self._lose()
            return
        self._update_reading()

    def readConnectionLost(self) -> None:
        """IHalfCloseableProtocol: the client shut its sending side (Exim
        does, after a QUIT pipelined behind its last BDAT).  Everything it
        sent is still answered: a message still being made durable gets its
        250 before the connection closes, or the client, seeing no reply,
        would send it again."""
        self._eof = True
        self._process()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol: the client no longer reads; nothing to say."""
        self._t.abortConnection()

    def _next_line(self) -> bytes | None:
        """The next complete line without its CRLF, or None; over-long
        lines are answered with 500 here."""
        while True:
            line = self._lines.next_line(self._line_limit)
            if line is not TOO_LONG:
                return line
            self._too_long()
            if self._mode != COMMAND:
                return None

    def wait(self, d: Deferred[Any]) -> None:
        """Hold further input until ``d`` has been answered."""
        self._waiting = True
        self._suspend_timer()
        d.addErrback(self._async_failed)
        d.addBoth(self._resume)

    def _async_failed(self, failure: Failure) -> None:
        if failure.check(SMTPReply):
            e = failure.value
            assert isinstance(e, SMTPReply)
            self.error_reply(e.code, e.enhanced, e.text)
        else:
            log.failure("error in SMTP session from [{client}]", failure, client=self._client)
            self.error_reply(451, "4.3.0", "Error: internal error")

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self._f.shutting_down:
            self._close_if_idle()
        if self._mode != CLOSING:
            self._touch()
            self._process()

    def _spool_caught_up(self, _: object) -> None:
        self._spool_behind = False
        self._update_reading()

    # -- replies -------------------------------------------------------------

    def reply(self, code: int, enhanced: str | None, text: str) -> None:
        if self._mode == CLOSING:
            return
        line = f"{code} {enhanced} {text}\r\n" if enhanced else f"{code} {text}\r\n"
        write_now(self._t, line.encode("utf-8"))

    def error_reply(self, code: int, enhanced: str, text: str) -> None:
        """A 4xx/5xx: counted, and too many of them end the session
        (Postfix smtpd_hard_error_limit)."""
        self._rejected(code, enhanced, text)
        self.reply(code, enhanced, text)
        self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self._listener.limits.max_errors_per_session:
            self._refuse(421, "4.7.0", f"{self._f.hostname} Error: too many errors")
