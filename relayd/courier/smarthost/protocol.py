"""The SMTP client state machine: one connection to a smarthost.

Our own client, not ``twisted.mail.smtp.ESMTPClient``, which dot-stuffs per
chunk, acts on plaintext injected after STARTTLS, has no
PIPELINING/SIZE/8BITMIME/SMTPUTF8 and no per-phase timeouts
(research/twisted-audit.md §2).  Here:

* Replies are split in batches from one buffer (multi-line replies, replies
  split across reads, several replies in one read), bounded in size.
* The body goes out with a pull producer: the next chunk is read and written
  only when the transport has sent the last one (back-pressure), so a 50 MB
  message costs a few chunks of memory.
* STARTTLS: any byte received after the ``220`` and before the handshake is
  an attack (CVE-2011-0411 class); the attempt fails.  After TLS all state is
  discarded (the caller sends EHLO again); AUTH never goes out in the clear.
* Every phase has the RFC 5321 §4.5.3.2 timeout, on the injected clock.

What to send when is not decided here: :mod:`.session` opens a session,
:mod:`.transaction` runs the mail transactions, :mod:`.pool` caches the
connections.  This module stays whole (over 400 lines) because it is one
state machine: the reply parser, the timers, STARTTLS and the body producer
share the connection's phase and must change together.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPullProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.config import Smarthost
from relayd.courier.smarthost.dotstuff import BODY_CHUNK, slices
from relayd.netio import write_now

# RFC 5321 §4.5.3.2 timeouts, seconds.
CONNECT_TIMEOUT = 30.0
GREETING_TIMEOUT = 300.0
COMMAND_TIMEOUT = 300.0  # EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET
DATA_INIT_TIMEOUT = 120.0  # DATA -> 354
DATA_BLOCK_TIMEOUT = 180.0  # no progress while sending the body
DATA_END_TIMEOUT = 600.0  # final dot -> reply: long, so a slow host causes no duplicate
TLS_HANDSHAKE_TIMEOUT = 300.0
#: How long a QUIT may take before the connection is aborted.
QUIT_TIMEOUT = 5.0

#: Bounds on one reply (Postfix: line_length_limit and a line count).
MAX_REPLY_BYTES = 64 * 1024
MAX_REPLY_LINES = 100

_CRLF = b"\r\n"
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?:\s|$)")


class Reply:
    """One (possibly multi-line) SMTP reply."""

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        """The lines joined with spaces; an enhanced status code repeated on
        continuation lines is kept only once (as Postfix logs replies)."""
        if not self.lines:
            return ""
        first = self.lines[0]
        m = _ENHANCED.match(first)
        out = [first]
        for line in self.lines[1:]:
            if m is not None and line.startswith(m.group(0).rstrip()):
                line = line[len(m.group(0).rstrip()) :].lstrip()
            out.append(line)
        return " ".join(x for x in out if x)

    def __str__(self) -> str:
        text = self.text
        return f"{self.code} {text}" if text else str(self.code)

    def __repr__(self) -> str:
        return f"<Reply {self}>"


class SessionError(Exception):
    """This connection cannot be used (any more): the text names the host."""


@implementer(IPullProducer)
class BodyProducer:
    """Writes the stuffed body, one piece of ``pieces`` each time the
    transport asks for more (it asks once it has sent what it had: that is
    the back-pressure); each request is progress for the data-block timeout.

    One piece is fetched ahead, so the write of the last one (it ends with
    the terminator) is known to be the last and the reply to the final dot
    is expected from then on, whenever it comes.
    """

    def __init__(self, proto: SMTPClientProtocol, pieces: Iterator[bytes]) -> None:
        self._proto = proto
        self._pieces = pieces
        self._next: bytes | None = None
        self._done = False

    def resumeProducing(self) -> None:
        if self._done:
            return
        proto = self._proto
        proto._progress()
        try:
            piece = self._next if self._next is not None else next(self._pieces)
            self._next = next(self._pieces, None)
        except Exception as e:
            # The spool file went away or could not be read: never end the
            # DATA with a dot (a truncated message would be accepted).
            self._done = True
            proto.transport.unregisterProducer()
            proto.abort(f"cannot read the queued message: {why(e)}")
            return
        proto.transport.write(piece)
        if self._next is None:
            self._done = True
            proto.transport.unregisterProducer()
            proto._body_written()

    def stopProducing(self) -> None:
        self._done = True
        self._pieces = iter(())


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """One connection to a smarthost: reply parsing, timeouts, STARTTLS.

    What to send when lives in :mod:`.session` and :mod:`.transaction`;
    this class offers :meth:`exchange`: write some commands, get a Deferred
    for the list of their replies, in order.  Only one exchange is
    outstanding at a time; a reply nobody asked for is a protocol error.
    """

    #: A TCP transport that can start TLS and take a producer (Twisted's
    #: ``ITCPTransport``, ``ITLSTransport`` and ``IConsumer`` at once, which
    #: no single interface names).
    transport: Any

    def __init__(
        self,
        clock: IReactorTime,
        smarthost: Smarthost,
        implicit_tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self._clock = clock
        self.smarthost = smarthost
        self._implicit_tls = implicit_tls
        self._buf = bytearray()
        self._scan = 0
        self._lines: list[str] = []
        self._code = b""
        self._reply_bytes = 0
        self._timeouts: deque[float] = deque()
        self._replies: list[Reply] = []
        self._d: Deferred[list[Reply]] | None = None
        self._timer: IDelayedCall | None = None
        self._phase = "greeting"
        self._tls_creator: IOpenSSLClientConnectionCreator | None = None
        self._tls_started = False
        self._tls_waiting = False
        self.tls_active = False
        #: Told the outcome of a TLS handshake once: "success",
        #: "verification_failed" or "failure" (the route's metric).
        self.on_tls_result: Callable[[str], None] | None = None
        self.peer_ip = "?"
        self.extensions: dict[str, str] = {}
        self.error: str | None = None
        self.lost = False
        self.closing = False
        self.idle_call: IDelayedCall | None = None
        self.on_lost: Callable[[SMTPClientProtocol], None] | None = None
        self.uses = 0
        self._lost_waiters: list[Deferred[None]] = []
        self.greeting: Deferred[list[Reply]] | None = None
        self._body_d: Deferred[list[Reply]] | None = None

    # -- names ---------------------------------------------------------------

    @property
    def name(self) -> str:
        """``host[ip]`` as Postfix names a peer."""
        return f"{self.smarthost.host}[{self.peer_ip}]"

    @property
    def relay(self) -> str:
        """``host[ip]:port`` for the mail log and ``DeliveryResult.relay``."""
        return f"{self.name}:{self.smarthost.port}"

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_ip = str(getattr(peer, "host", "?"))
        self.greeting = self.exchange(b"", [GREETING_TIMEOUT], "greeting")
        if self._implicit_tls is not None:
            self._tls_started = True
            try:
                self.transport.startTLS(self._implicit_tls)
            except Exception as e:
                self.abort(f"TLS setup for {self.name} failed: {e}")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.lost:
            return
        self.lost = True
        self.closing = True
        self._cancel_timer()
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
        self.idle_call = None
        if self.error is None:
            if self._tls_started and not self.tls_active:
                why = reason.getErrorMessage() if reason is not None else "connection lost"
                if reason is not None and reason.check(*tls_verification_error()):
                    self.error = f"server certificate verification failed for {self.name}: {why}"
                    self._tls_result("verification_failed")
                else:
                    self.error = f"TLS handshake with {self.name} failed: {why}"
                    # An unknown CA ends in OpenSSL's own check, not ours.
                    self._tls_result("verification_failed" if "certificate verify failed" in why
                                     else "failure")
            else:
                self.error = f"lost connection with {self.name} while {self._phase}"
        self._errback(self.error)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def when_lost(self) -> Deferred[None]:
        if self.lost:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def abort(self, why: str | None = None) -> None:
        """Drop the connection now; it is never used again."""
        if why is not None and self.error is None:
            self.error = why
        self.closing = True
        self._cancel_timer()
        if not self.lost:
            self.transport.abortConnection()
        if why is not None:
            self._errback(why)

    def quit(self) -> None:
        """Polite close of an idle connection (QUIT, then close)."""
        if self.lost or self.closing:
            return
        self.closing = True
        self._cancel_timer()
        self._phase = "sending QUIT"
        self.transport.write(b"QUIT\r\n")
        self.transport.loseConnection()
        self._timer = self._clock.callLater(QUIT_TIMEOUT, self._quit_timed_out)

    def _quit_timed_out(self) -> None:
        self._timer = None
        if not self.lost:
            self.transport.abortConnection()

    # -- exchanges -------------------------------------------------------------

    def exchange(
        self, data: bytes, timeouts: Sequence[float], phase: str
    ) -> Deferred[list[Reply]]:
        """Write ``data`` and collect one reply per entry in ``timeouts``.

        The timer runs for the reply at the head of the line, with its own
        timeout, so pipelined commands each get RFC 5321's allowance.
        """
        if self.lost or self.closing or self.error is not None:
            return defer.fail(SessionError(self.error or f"connection to {self.name} closed"))
        assert self._d is None, "one exchange at a time"
        d: Deferred[list[Reply]] = Deferred()
        self._d = d
        self._phase = phase
        self._timeouts = deque(timeouts)
        self._replies = []
        if data:
            write_now(self.transport, data)
        self._arm(self._timeouts[0])
        return d

    def command(self, line: bytes, timeout: float, phase: str) -> Deferred[Reply]:
        d = self.exchange(line, [timeout], phase)
        return d.addCallback(lambda replies: replies[0])

    def starttls(self, creator: IOpenSSLClientConnectionCreator) -> Deferred[Reply]:
        """Send STARTTLS; on ``220`` switch to TLS and fire once the handshake
        is done (with the 220).  Any other reply fires at once."""
        self._tls_creator = creator
        return self.command(b"STARTTLS\r\n", COMMAND_TIMEOUT, "sending STARTTLS")

    def send_body(self, body: bytes, terminator: bytes) -> Deferred[Reply]:
        """Send the (already stuffed) body and its terminator; the Deferred
        fires with the reply to the final dot."""
        if len(body) <= BODY_CHUNK:
            return self._send(None, [body, terminator])
        return self._send(slices(body, terminator), [])

    def send_stream(self, pieces: Iterator[bytes]) -> Deferred[Reply]:
        """Send a stuffed body as ``pieces`` yields it, the terminator last,
        one piece whenever the transport has room: the body is never whole
        in memory.  A piece that cannot be read aborts the connection."""
        return self._send(pieces, [])

    def _send(self, pieces: Iterator[bytes] | None, whole: list[bytes]) -> Deferred[Reply]:
        if self.lost or self.closing or self.error is not None:
            return defer.fail(SessionError(self.error or f"connection to {self.name} closed"))
        assert self._d is None and self._body_d is None
        self._phase = "sending message body"
        d: Deferred[list[Reply]] = Deferred()
        self._body_d = d
        if pieces is None:
            write_now(self.transport, b"".join(whole))
            self._body_written()
        else:
            self._progress()
            self.transport.registerProducer(BodyProducer(self, pieces), False)
        return d.addCallback(lambda replies: replies[0])

    def _progress(self) -> None:
        self._arm(DATA_BLOCK_TIMEOUT)

    def _body_written(self) -> None:
        d, self._body_d = self._body_d, None
        assert d is not None
        if self.lost or self.error is not None:
            d.errback(SessionError(self.error or f"lost connection with {self.name}"))
            return
        self._d = d
        self._phase = "waiting for the reply to the end of data"
        self._timeouts = deque([DATA_END_TIMEOUT])
        self._replies = []
        self._arm(DATA_END_TIMEOUT)

    def _tls_result(self, result: str) -> None:
        report, self.on_tls_result = self.on_tls_result, None
        if report is not None:
            report(result)

    def handshakeCompleted(self) -> None:
        if self.lost or self.closing or self._tls_layer_closing():
            # Twisted 22.4 reports a completed handshake even when the
            # certificate check has just failed and aborted the connection;
            # connectionLost follows with the VerificationError.
            return
        self.tls_active = True
        self._tls_result("success")
        if self._tls_waiting:
            # STARTTLS: RFC 3207 §4.2, forget everything learned in the clear.
            self._tls_waiting = False
            self.extensions = {}
            self._cancel_timer()
            d, self._d = self._d, None
            replies, self._replies = self._replies, []
            assert d is not None
            d.callback(replies)

    def _tls_layer_closing(self) -> bool:
        transport = self.transport
        for layer in (transport, getattr(transport, "protocol", None)):
            if getattr(layer, "disconnecting", False) is True:
                return True
        return False

    # -- timers ------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self._clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.abort(f"conversation with {self.name} timed out while {self._phase}")

    def _errback(self, why: str) -> None:
        d, self._d = self._d, None
        if d is None:
            d, self._body_d = self._body_d, None
        if d is not None:
            d.errback(SessionError(why))

    # -- input ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.lost:
            return
        buf = self._buf
        buf += data
        while True:
            idx = buf.find(b"\n", self._scan)
            if idx < 0:
                self._scan = len(buf)
                if self._reply_bytes + len(buf) > MAX_REPLY_BYTES:
                    self._protocol_error("reply too long")
                return
            raw = bytes(buf[:idx])
            del buf[: idx + 1]
            self._scan = 0
            if not self._line(raw):
                return

    def _line(self, raw: bytes) -> bool:
        """Handle one reply line; False stops the input loop."""
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        self._reply_bytes += len(raw) + 2
        if self._reply_bytes > MAX_REPLY_BYTES or len(self._lines) >= MAX_REPLY_LINES:
            self._protocol_error("reply too long")
            return False
        if len(raw) < 3 or not raw[:3].isdigit() or (len(raw) > 3 and raw[3:4] not in b" -"):
            self._protocol_error(f"malformed reply line {raw[:40]!r}")
            return False
        if self._lines and raw[:3] != self._code:
            self._protocol_error("multi-line reply with mixed codes")
            return False
        self._code = raw[:3]
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if raw[3:4] == b"-":
            return True
        reply = Reply(int(raw[:3]), self._lines)
        self._lines = []
        self._reply_bytes = 0
        return self._reply(reply)

    def _reply(self, reply: Reply) -> bool:
        if self._d is None or self._tls_waiting:
            if self._phase == "sending QUIT":
                return False
            self._protocol_error(f"unexpected reply {reply}")
            return False
        self._replies.append(reply)
        self._timeouts.popleft()
        if self._timeouts:
            self._arm(self._timeouts[0])
            return True
        creator, self._tls_creator = self._tls_creator, None
        if creator is not None and reply.code == 220:
            if self._buf or self._lines:
                # CVE-2011-0411 class: whatever follows the 220 in the clear
                # would be taken as a reply from inside TLS.
                self.abort(f"plaintext injected after STARTTLS by {self.name}")
                return False
            self._tls_started = True
            self._tls_waiting = True
            self._phase = "TLS handshake"
            self._arm(TLS_HANDSHAKE_TIMEOUT)
            try:
                self.transport.startTLS(creator)
            except Exception as e:
                self.abort(f"TLS setup for {self.name} failed: {e}")
            return False
        self._cancel_timer()
        d, self._d = self._d, None
        replies, self._replies = self._replies, []
        d.callback(replies)
        return not (self.closing or self.lost)

    def _protocol_error(self, what: str) -> None:
        self.abort(f"protocol error from {self.name} while {self._phase}: {what}")


def tls_verification_error() -> tuple[type[BaseException], ...]:
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return ()
    return (VerificationError,)


class ProtocolFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], SMTPClientProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: object) -> SMTPClientProtocol:
        p = self._make()
        p.factory = self
        return p


def why(e: BaseException) -> str:
    return (str(e) or e.__class__.__name__).rstrip(".")


def extensions(reply: Reply) -> dict[str, str]:
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            # Old (pre RFC 4954) spelling still sent by some servers.
            params = (keyword[5:] + " " + params).strip()
            keyword = "AUTH"
            if "AUTH" in ext:
                params = ext["AUTH"] + " " + params
        if keyword:
            ext[keyword] = params.strip()
    return ext


def size_limit(ext: dict[str, str]) -> int:
    value = ext.get("SIZE", "")
    if value.isascii() and value.isdigit():
        return int(value)
    return 0

