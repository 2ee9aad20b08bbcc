"""Delivery to a smarthost over ESMTP (``[route.NAME] smarthost = [...]``).

Our own client protocol, not ``twisted.mail.smtp.ESMTPClient``, which
dot-stuffs per chunk (a ``.`` line at a 16 KiB boundary or on the first line
goes out unstuffed: outbound SMTP smuggling), acts on plaintext injected
after STARTTLS, has no PIPELINING/SIZE/8BITMIME/SMTPUTF8 and no per-phase
timeouts (research/twisted-audit.md §2).  Here:

* Replies are split in batches from one buffer (multi-line replies, replies
  split across reads, several replies in one read), bounded in size.
* Dot-stuffing is one ``bytes`` operation over the whole message when it is
  in memory, so the first line and every chunk join are covered; a big
  message is read from its spool file and stuffed a 64 KiB chunk at a time
  by :class:`DotStuffer`, which carries the line state (a ``.`` or a CR/LF
  split at a chunk join) across chunks, with output identical to
  :func:`dot_stuff` of the whole.  The body goes out with a pull producer:
  the next chunk is read and written only when the transport has sent the
  last one (back-pressure), so a 50 MB message costs a few chunks of memory.
* STARTTLS: any byte received after the ``220`` and before the handshake is
  an attack (CVE-2011-0411 class); the attempt fails.  After TLS all state is
  discarded and EHLO is sent again; AUTH never goes out in the clear.
* Every phase has the RFC 5321 §4.5.3.2 timeout, on the injected clock.
* Connections are cached per route (Postfix's connection cache): at most
  ``concurrency`` at once, reused with RSET, closed with QUIT when idle.

Failure classes (what qmgr sees): anything before or at MAIL FROM — a refused
connection, a 4xx *or* 5xx greeting/EHLO/STARTTLS/AUTH/MAIL, TLS trouble, a
timeout, a lost connection before the final reply — is a
``TransientDeliveryError``: a 5xx there means our configuration (a rotated
password) or the smarthost is wrong, never the message.  Per-recipient
answers (RCPT and the reply to the final dot) become ``RecipientResult``\\ s.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPullProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import tls
from relayd.config import Rate, RouteConfig, Smarthost
from relayd.content import Content, as_content, has_bare_newline
from relayd.envelope import (
    BOUNCED,
    DEFERRED,
    SENT,
    DeliveryResult,
    Envelope,
    RecipientResult,
)
from relayd.errors import DeliveryError, TransientDeliveryError
from relayd.interfaces import ICourier
from relayd.metrics import Metrics
from relayd.netio import write_now

log = Logger(namespace="relayd.courier")

# RFC 5321 §4.5.3.2 timeouts, seconds.
CONNECT_TIMEOUT = 30.0
GREETING_TIMEOUT = 300.0
COMMAND_TIMEOUT = 300.0  # EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET
DATA_INIT_TIMEOUT = 120.0  # DATA -> 354
DATA_BLOCK_TIMEOUT = 180.0  # no progress while sending the body
DATA_END_TIMEOUT = 600.0  # final dot -> reply: long, so a slow host causes no duplicate
TLS_HANDSHAKE_TIMEOUT = 300.0
#: An unused cached connection is closed (with QUIT) after this long.
IDLE_TIMEOUT = 5.0
#: How long a QUIT may take before the connection is aborted.
QUIT_TIMEOUT = 5.0

#: Bounds on one reply (Postfix: line_length_limit and a line count).
MAX_REPLY_BYTES = 64 * 1024
MAX_REPLY_LINES = 100
#: Size of one write of the body; bodies up to it go out in one write.  Also
#: the size of one read of a spooled body.
BODY_CHUNK = 64 * 1024
#: How much of the start of a message is searched for the header section
#: (cleanup's limit): the SMTPUTF8 check never reads a big body for it.
HEADER_LIMIT = 256 * 1024

_CRLF = b"\r\n"
_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?:\s|$)")


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


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


class _SessionError(Exception):
    """This connection cannot be used (any more): the text names the host."""


class _ProtocolError(_SessionError):
    pass


def dot_stuff(content: bytes) -> tuple[bytes, bytes]:
    """``(stuffed, terminator)`` for ``content`` (CRLF lines, not stuffed).

    One bytes operation over the whole message, never per chunk: every line
    that starts with ``.`` gets another one, the first line included.  A bare
    CR or LF (the server normalises them, so this is a guard) becomes CRLF,
    so no ``<LF>.<LF>`` can reach a lenient smarthost.
    """
    if has_bare_newline(content):
        content = _BARE_NEWLINE.sub(b"\r\n", content)
    if content[:1] == b".":
        content = b"." + content
    if b"\r\n." in content:
        content = content.replace(b"\r\n.", b"\r\n..")
    if not content or content.endswith(_CRLF):
        return content, b".\r\n"
    return content, b"\r\n.\r\n"


class DotStuffer:
    """:func:`dot_stuff` a chunk at a time, for bodies read from the spool.

    ``feed`` each piece of the content in order, then ``finish``: the
    outputs joined are exactly ``b"".join(dot_stuff(whole))``.  What crosses
    a chunk join is carried over: whether the next byte starts a line (a
    ``.`` there is stuffed, the first line's included), and a CR that ends a
    chunk, held back until the next one shows whether an LF follows (CRLF
    stays one line end; a bare CR becomes CRLF).
    """

    def __init__(self) -> None:
        self._line_start = True
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        prefix = b""
        if self._cr and data:
            self._cr = False
            prefix = _CRLF
            if data[:1] == b"\n":
                data = data[1:]
            self._line_start = True
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if data:
            if has_bare_newline(data):
                data = _BARE_NEWLINE.sub(b"\r\n", data)
            if self._line_start and data[:1] == b".":
                data = b"." + data
            if b"\r\n." in data:
                data = data.replace(b"\r\n.", b"\r\n..")
            self._line_start = data.endswith(_CRLF)
        return prefix + data if prefix else data

    def finish(self) -> bytes:
        """The rest: a held-back CR as CRLF, then the terminator."""
        if self._cr:
            self._cr = False
            return _CRLF + b".\r\n"
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


def _stuffed_chunks(content: Content) -> Iterator[bytes]:
    """The stuffed body of a spooled message and its terminator, a chunk at
    a time, read only as the consumer asks for the next one.  The terminator
    goes with the last chunk (one write and one reactor turn fewer)."""
    stuffer = DotStuffer()
    left = content.size
    for chunk in content.chunks(BODY_CHUNK):
        left -= len(chunk)
        out = stuffer.feed(chunk)
        if not left:
            yield out + stuffer.finish()
            return
        if out:
            yield out
    yield stuffer.finish()


def _slices(body: bytes, terminator: bytes) -> Iterator[bytes]:
    """An in-memory stuffed body in ``BODY_CHUNK`` writes, the terminator
    in the last."""
    start = 0
    while len(body) - start > BODY_CHUNK:
        yield body[start : start + BODY_CHUNK]
        start += BODY_CHUNK
    yield body[start:] + terminator


class _Message:
    """What one delivery needs to know about the message, computed once.

    For content in memory the stuffed body is made once and reused by every
    transaction; a spooled body is scanned here (8-bit or not, for
    ``BODY=8BITMIME``: a chunk at a time, unless the client declared it) and
    streamed again for each transaction.
    """

    def __init__(self, envelope: Envelope, content: Content) -> None:
        self.content = content
        self.size = content.size
        self.eight_bit = envelope.body == "8BITMIME" or not content.isascii()
        addresses = (envelope.sender, *envelope.recipients)
        self.utf8_envelope = not all(a.isascii() for a in addresses)
        # Like Postfix: non-ASCII headers need SMTPUTF8 only in a message that
        # was submitted with SMTPUTF8; legacy raw 8-bit headers go as before.
        self.utf8_header = False
        if envelope.smtputf8 and self.eight_bit:
            head = content.head(HEADER_LIMIT)
            end = head.find(b"\r\n\r\n")
            self.utf8_header = not (head if end < 0 else head[:end]).isascii()
        self.smtputf8 = envelope.smtputf8 or self.utf8_envelope
        self._stuffed: tuple[bytes, bytes] | None = None
        if content.data is not None:
            self._stuffed = dot_stuff(content.data)

    @property
    def needs_smtputf8(self) -> bool:
        return self.utf8_envelope or self.utf8_header

    def send(self, conn: SMTPClientProtocol) -> Deferred[Reply]:
        """Send the body after a 354; fires with the reply to the final dot."""
        if self._stuffed is not None:
            return conn.send_body(*self._stuffed)
        return conn.send_stream(_stuffed_chunks(self.content))


def _address(address: str, utf8: bool) -> bytes:
    if any(c in address for c in "\r\n<>") or any(ord(c) < 0x20 for c in address):
        raise ValueError(address)
    return address.encode("utf-8" if utf8 else "ascii")


# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------


@implementer(IPullProducer)
class _BodyProducer:
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
            proto.abort(f"cannot read the queued message: {_why(e)}")
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

    The session logic (what to send when) lives in :class:`SmarthostCourier`;
    this class offers :meth:`exchange`: write some commands, get a Deferred
    for the list of their replies, in order.  Only one exchange is
    outstanding at a time; a reply nobody asked for is a protocol error.
    """

    transport: Any

    def __init__(
        self,
        clock: IReactorTime,
        smarthost: Smarthost,
        implicit_tls: Any | None = None,
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
        self._tls_creator: Any | None = None
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
            return defer.fail(_SessionError(self.error or f"connection to {self.name} closed"))
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

    def starttls(self, creator: Any) -> Deferred[Reply]:
        """Send STARTTLS; on ``220`` switch to TLS and fire once the handshake
        is done (with the 220).  Any other reply fires at once."""
        self._tls_creator = creator
        return self.command(b"STARTTLS\r\n", COMMAND_TIMEOUT, "sending STARTTLS")

    def send_body(self, body: bytes, terminator: bytes) -> Deferred[Reply]:
        """Send the (already stuffed) body and its terminator; the Deferred
        fires with the reply to the final dot."""
        if len(body) <= BODY_CHUNK:
            return self._send(None, [body, terminator])
        return self._send(_slices(body, terminator), [])

    def send_stream(self, pieces: Iterator[bytes]) -> Deferred[Reply]:
        """Send a stuffed body as ``pieces`` yields it, the terminator last,
        one piece whenever the transport has room: the body is never whole
        in memory.  A piece that cannot be read aborts the connection."""
        return self._send(pieces, [])

    def _send(self, pieces: Iterator[bytes] | None, whole: list[bytes]) -> Deferred[Reply]:
        if self.lost or self.closing or self.error is not None:
            return defer.fail(_SessionError(self.error or f"connection to {self.name} closed"))
        assert self._d is None and self._body_d is None
        self._phase = "sending message body"
        d: Deferred[list[Reply]] = Deferred()
        self._body_d = d
        if pieces is None:
            write_now(self.transport, b"".join(whole))
            self._body_written()
        else:
            self._progress()
            self.transport.registerProducer(_BodyProducer(self, pieces), False)
        return d.addCallback(lambda replies: replies[0])

    def _progress(self) -> None:
        self._arm(DATA_BLOCK_TIMEOUT)

    def _body_written(self) -> None:
        d, self._body_d = self._body_d, None
        assert d is not None
        if self.lost or self.error is not None:
            d.errback(_SessionError(self.error or f"lost connection with {self.name}"))
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
            d.errback(_SessionError(why))

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


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], SMTPClientProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: object) -> SMTPClientProtocol:
        p = self._make()
        p.factory = self
        return p


# ---------------------------------------------------------------------------
# Rate limit
# ---------------------------------------------------------------------------


class _TokenBucket:
    """``rate.count`` tokens per ``rate.per`` seconds, a burst of at most
    ``rate.count``.  Reservations may go into debt, so waiters are served in
    order and each one knows at once how long it waits."""

    def __init__(self, rate: Rate, clock: IReactorTime) -> None:
        self._clock = clock
        self._capacity = float(rate.count)
        self._per_second = rate.count / rate.per
        self._tokens = self._capacity
        self._last = clock.seconds()

    def take(self) -> Deferred[None]:
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._per_second)
        self._last = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._clock.callLater(-self._tokens / self._per_second, d.callback, None)
        return d


# ---------------------------------------------------------------------------
# The courier
# ---------------------------------------------------------------------------


def _status(reply: Reply, soft_bounce: bool) -> str:
    if 200 <= reply.code < 300:
        return SENT
    if reply.code >= 500 and not soft_bounce:
        return BOUNCED
    return DEFERRED


@implementer(ICourier)
class SmarthostCourier:
    """Delivers a route's mail to its smarthosts, in order (failover).

    :param route: the ``[route.NAME]`` config; its TLS files are read here
        (``ConfigError`` if they cannot be used).
    :param hostname: our EHLO name (``server.hostname``).
    :param reactor: for connecting (``IReactorTCP`` and a name resolver).
    :param clock: all timers; defaults to ``reactor``.
    :param endpoint_factory: ``Smarthost -> IStreamClientEndpoint``; tests
        connect in memory with it.  Default: ``HostnameEndpoint``.

    Call :meth:`stop` at shutdown: it closes the cached idle connections.
    """

    def __init__(
        self,
        route: RouteConfig,
        hostname: str,
        reactor: Any,
        clock: IReactorTime | None = None,
        *,
        endpoint_factory: Callable[[Smarthost], IStreamClientEndpoint] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not route.smarthost:
            raise ValueError(f"route {route.name} has no smarthost")
        self.route = route
        self._hostname = hostname
        self._ehlo_name = hostname.encode("idna") if not hostname.isascii() else hostname.encode()
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._endpoint_factory = endpoint_factory or self._endpoint
        self._metrics = metrics
        # Every context built now: a bad file or key fails start-up.
        self._tls = tls.route_client_tls(route)
        if route.tls in ("starttls", "implicit") and not route.tls_verify:
            log.warn(
                "route {route}: tls_verify = false: the smarthost's certificate is not "
                "checked; a man in the middle can read the mail and the password",
                route=route.name,
            )
        self._bucket = _TokenBucket(route.max_rate, self._clock) if route.max_rate else None
        self._idle: list[SMTPClientProtocol] = []
        self._conns: set[SMTPClientProtocol] = set()
        self._opening = 0
        self._waiters: deque[Deferred[SMTPClientProtocol | None]] = deque()
        self._stopping = False

    # -- public --------------------------------------------------------------

    def deliver(  # type: ignore[override]
        self, queue_id: str, envelope: Envelope, content: Content | bytes
    ) -> Deferred[DeliveryResult]:
        return Deferred.fromCoroutine(self._deliver(queue_id, envelope, as_content(content)))

    def stop(self) -> Deferred[None]:
        """Close the idle connections (QUIT) and stop caching; fires when
        they are closed.  Deliveries in flight finish and then close."""
        self._stopping = True
        idle, self._idle = self._idle, []
        waits = []
        for conn in idle:
            waits.append(conn.when_lost())
            conn.quit()
        for d in list(self._waiters):
            self._waiters.remove(d)
            d.errback(TransientDeliveryError(f"route {self.route.name}: shutting down"))
        return defer.gatherResults(waits).addCallback(lambda _: None)

    @property
    def connections(self) -> int:
        """Connections open or being opened (for status pages and tests)."""
        return len(self._conns) + self._opening

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    # -- connection pool ---------------------------------------------------

    def _slots_free(self) -> bool:
        return len(self._conns) + self._opening < self.route.concurrency

    def _acquire(self) -> Deferred[SMTPClientProtocol | None]:
        """An idle connection, or ``None``: a slot to open a new one in."""
        if self._stopping:
            return defer.fail(TransientDeliveryError(f"route {self.route.name}: shutting down"))
        if self._idle and not self._waiters:
            return defer.succeed(self._take_idle())
        if self._slots_free() and not self._waiters:
            self._opening += 1
            return defer.succeed(None)
        d: Deferred[SMTPClientProtocol | None] = Deferred()
        self._waiters.append(d)
        return d

    def _take_idle(self) -> SMTPClientProtocol:
        conn = self._idle.pop()
        if conn.idle_call is not None and conn.idle_call.active():
            conn.idle_call.cancel()
        conn.idle_call = None
        return conn

    def _wake(self) -> None:
        while self._waiters:
            if self._idle:
                self._waiters.popleft().callback(self._take_idle())
            elif self._slots_free():
                self._opening += 1
                self._waiters.popleft().callback(None)
            else:
                return

    def _conn_lost(self, conn: SMTPClientProtocol) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake()

    def _detach(self, conn: SMTPClientProtocol) -> None:
        """Take a dead connection's slot over (to open a fresh one in it)."""
        conn.on_lost = None
        self._conns.discard(conn)
        self._opening += 1

    def _release(self, conn: SMTPClientProtocol, reusable: bool) -> None:
        if not reusable or self._stopping or conn.lost or conn.closing:
            if not conn.lost:
                if reusable:
                    conn.quit()
                else:
                    conn.abort()
            return
        if self._waiters:
            self._waiters.popleft().callback(conn)
            return
        self._idle.append(conn)
        conn.idle_call = self._clock.callLater(IDLE_TIMEOUT, self._idle_timeout, conn)

    def _idle_timeout(self, conn: SMTPClientProtocol) -> None:
        conn.idle_call = None
        if conn in self._idle:
            self._idle.remove(conn)
        conn.quit()

    def _endpoint(self, smarthost: Smarthost) -> IStreamClientEndpoint:
        return HostnameEndpoint(
            self._reactor, smarthost.host, smarthost.port, timeout=CONNECT_TIMEOUT
        )

    async def _connection(self, queue_id: str) -> SMTPClientProtocol:
        while True:
            cached = await self._acquire()
            if cached is None:
                break
            cached.uses += 1
            try:
                reply = await cached.command(b"RSET\r\n", COMMAND_TIMEOUT, "sending RSET")
            except _SessionError as e:
                log.debug("{queue_id}: cached connection unusable: {why}",
                          queue_id=queue_id, why=str(e))
                reply = None
            if reply is not None and 200 <= reply.code < 300:
                return cached
            # Dead or confused: open a fresh one in its place, or, if its
            # slot went already (it was lost), ask for another.
            if cached in self._conns:
                self._detach(cached)
                cached.abort()
                break
            cached.abort()
        # We hold a slot (``_opening``) until a connection is up or all failed.
        errors: list[str] = []
        opened: SMTPClientProtocol | None = None
        try:
            for smarthost in self.route.smarthost:
                try:
                    opened = await self._open(smarthost)
                except _SessionError as e:
                    errors.append(str(e))
                    log.info("{queue_id}: {error}", queue_id=queue_id, error=str(e))
                    continue
                self._conns.add(opened)
                opened.on_lost = self._conn_lost
                opened.uses = 1
                return opened
        finally:
            self._opening -= 1
            if opened is None:
                self._wake()
        raise TransientDeliveryError("; ".join(errors))

    def _protocol(self, smarthost: Smarthost, implicit: Any) -> SMTPClientProtocol:
        proto = SMTPClientProtocol(self._clock, smarthost, implicit)
        metrics = self._metrics
        if metrics is not None:
            counter = metrics.smarthost_tls_handshakes
            route = self.route.name
            proto.on_tls_result = lambda result: counter.labels(route, result).inc()
        return proto

    async def _open(self, smarthost: Smarthost) -> SMTPClientProtocol:
        implicit = None
        if self.route.tls == "implicit":
            assert self._tls is not None
            implicit = self._tls.creator(smarthost.host)
        factory = _ProtocolFactory(lambda: self._protocol(smarthost, implicit))
        where = (
            f"[{smarthost.host}]:{smarthost.port}"
            if ":" in smarthost.host
            else f"{smarthost.host}:{smarthost.port}"
        )
        d = self._endpoint_factory(smarthost).connect(factory)
        d.addTimeout(CONNECT_TIMEOUT, self._clock)
        try:
            proto: SMTPClientProtocol = await d  # type: ignore[assignment]
        except defer.TimeoutError:
            raise _SessionError(f"connect to {where}: timed out") from None
        except Exception as e:
            raise _SessionError(f"connect to {where}: {_why(e)}") from None
        try:
            await self._session_setup(proto)
        except _SessionError:
            proto.abort()
            raise
        except BaseException:
            proto.abort()
            raise
        return proto

    async def _session_setup(self, proto: SMTPClientProtocol) -> None:
        route = self.route
        assert proto.greeting is not None
        greeting = (await proto.greeting)[0]
        if greeting.code != 220:
            raise _SessionError(f"host {proto.name} refused to talk to me: {greeting}")
        await self._ehlo(proto)
        if route.tls in ("starttls", "opportunistic") and not proto.tls_active:
            if "STARTTLS" in proto.extensions:
                assert self._tls is not None
                verify = route.tls == "starttls"
                reply = await proto.starttls(self._tls.creator(proto.smarthost.host, verify=verify))
                if reply.code == 220:
                    await self._ehlo(proto)
                elif route.tls == "starttls":
                    raise _SessionError(
                        f"host {proto.name} said: {reply} (in reply to STARTTLS command)"
                    )
            elif route.tls == "starttls":
                raise _SessionError(
                    f"TLS is required, but was not offered by host {proto.name}"
                )
        if route.username is not None:
            if not proto.tls_active and route.tls != "none":
                raise _SessionError(f"refusing to send AUTH to {proto.name} without TLS")
            await self._auth(proto)

    async def _ehlo(self, proto: SMTPClientProtocol) -> None:
        reply = await proto.command(
            b"EHLO " + self._ehlo_name + _CRLF, COMMAND_TIMEOUT, "sending EHLO"
        )
        if 200 <= reply.code < 300:
            proto.extensions = _extensions(reply)
            return
        if (
            reply.code >= 500
            and self.route.tls == "none"
            and self.route.username is None
        ):
            reply = await proto.command(
                b"HELO " + self._ehlo_name + _CRLF, COMMAND_TIMEOUT, "sending HELO"
            )
            if 200 <= reply.code < 300:
                proto.extensions = {}
                return
            raise _SessionError(f"host {proto.name} said: {reply} (in reply to HELO command)")
        raise _SessionError(f"host {proto.name} said: {reply} (in reply to EHLO command)")

    async def _auth(self, proto: SMTPClientProtocol) -> None:
        route = self.route
        assert route.username is not None and route.password is not None
        mechanisms = set(proto.extensions.get("AUTH", "").upper().split())
        if not mechanisms and "AUTH" not in proto.extensions:
            raise _SessionError(
                f"SASL authentication is required, but AUTH was not offered by host {proto.name}"
            )
        user = route.username.encode("utf-8")
        password = route.password.encode("utf-8")
        phase = "sending AUTH"
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await proto.command(b"AUTH PLAIN " + token + _CRLF, COMMAND_TIMEOUT, phase)
        elif "LOGIN" in mechanisms:
            reply = await proto.command(b"AUTH LOGIN\r\n", COMMAND_TIMEOUT, phase)
            if reply.code == 334:
                reply = await proto.command(
                    base64.b64encode(user) + _CRLF, COMMAND_TIMEOUT, phase
                )
            if reply.code == 334:
                reply = await proto.command(
                    base64.b64encode(password) + _CRLF, COMMAND_TIMEOUT, phase
                )
        else:
            offered = " ".join(sorted(mechanisms)) or "none"
            raise _SessionError(
                f"no supported SASL mechanism offered by host {proto.name} "
                f"(offered: {offered}; relayd speaks PLAIN and LOGIN)"
            )
        if reply.code != 235:
            raise _SessionError(f"host {proto.name} said: {reply} (in reply to AUTH command)")

    # -- delivery ----------------------------------------------------------------

    async def _deliver(
        self, queue_id: str, envelope: Envelope, content: Content
    ) -> DeliveryResult:
        try:
            try:
                message = _Message(envelope, content)
            except OSError as e:
                raise TransientDeliveryError(f"cannot read the queued message: {_why(e)}") from e
            if self._bucket is not None:
                await self._bucket.take()
            conn = await self._connection(queue_id)
        except DeliveryError:
            raise
        except Exception as e:
            log.failure("{queue_id}: internal error", Failure(), queue_id=queue_id)
            raise TransientDeliveryError(f"internal error: {_why(e)}") from e
        reusable = False
        try:
            result = await self._transactions(queue_id, conn, envelope, message)
            reusable = not conn.closing and not conn.lost and conn.error is None
        except _SessionError as e:
            log.info("{queue_id}: {error}", queue_id=queue_id, error=str(e))
            raise TransientDeliveryError(str(e)) from None
        except DeliveryError:
            raise
        except Exception as e:
            log.failure("{queue_id}: internal error", Failure(), queue_id=queue_id)
            raise TransientDeliveryError(f"internal error: {_why(e)}") from e
        finally:
            self._release(conn, reusable)
        return result

    async def _transactions(
        self,
        queue_id: str,
        conn: SMTPClientProtocol,
        envelope: Envelope,
        message: _Message,
    ) -> DeliveryResult:
        route = self.route
        soft = route.soft_bounce
        recipients = envelope.recipients
        results: dict[int, RecipientResult] = {}

        def everyone(reply: str, status: str) -> DeliveryResult:
            for i, rcpt in enumerate(recipients):
                results.setdefault(i, RecipientResult(rcpt, status, reply))
            return self._result(conn, recipients, results, reply)

        hard = DEFERRED if soft else BOUNCED
        ext = conn.extensions
        limit = _size_limit(ext)
        if limit and message.size > limit:
            return everyone("552 5.3.4 Message size exceeds fixed limit of smarthost", hard)
        if message.needs_smtputf8 and "SMTPUTF8" not in ext:
            code = "5.6.7" if message.utf8_envelope else "5.6.9"
            return everyone(
                f"550 {code} SMTPUTF8 is required, but was not offered by host {conn.name}", hard
            )
        utf8 = message.smtputf8 and "SMTPUTF8" in ext
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % message.size
        if message.eight_bit and "8BITMIME" in ext:
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        try:
            mail = b"MAIL FROM:<" + _address(envelope.sender, utf8) + b">" + params + _CRLF
        except (ValueError, UnicodeError):
            return everyone("501 5.1.7 Bad sender address syntax", hard)

        pending = list(range(len(recipients)))
        batch_size = route.max_recipients_per_transaction or len(pending) or 1
        need_rset = False
        final: Reply | None = None
        first = True
        while pending:
            batch, pending = pending[:batch_size], pending[batch_size:]
            try:
                if not first and self._bucket is not None:
                    await self._bucket.take()
                if need_rset:
                    reply = await conn.command(b"RSET\r\n", COMMAND_TIMEOUT, "sending RSET")
                    if not 200 <= reply.code < 300:
                        raise _SessionError(
                            f"host {conn.name} said: {reply} (in reply to RSET command)"
                        )
                retry, need_rset, data_reply = await self._transaction(
                    conn, message, mail, recipients, batch, utf8, results, soft
                )
            except _SessionError as e:
                if not results:
                    raise
                # Some recipients have their answer already: report them,
                # the rest waits (a Transient error would send them twice).
                return everyone(str(e), DEFERRED)
            first = False
            if data_reply is not None:
                final = data_reply
            pending = retry + pending
        return self._result(conn, recipients, results, str(final) if final else None)

    async def _transaction(
        self,
        conn: SMTPClientProtocol,
        message: _Message,
        mail: bytes,
        recipients: tuple[str, ...],
        batch: list[int],
        utf8: bool,
        results: dict[int, RecipientResult],
        soft: bool,
    ) -> tuple[list[int], bool, Reply | None]:
        """One MAIL transaction for ``batch``.

        :return: ``(retry, need_rset, final_reply)``: recipients refused with
            452 to send in a further transaction; whether the transaction
            was left open; the reply to the final dot, if it got that far.
        """
        rcpts: list[tuple[int, bytes]] = []
        for i in batch:
            try:
                rcpts.append((i, b"RCPT TO:<" + _address(recipients[i], utf8) + b">\r\n"))
            except (ValueError, UnicodeError):
                results[i] = RecipientResult(
                    recipients[i],
                    DEFERRED if soft else BOUNCED,
                    "501 5.1.3 Bad recipient address syntax",
                )
        if not rcpts:
            return [], False, None
        data_reply: Reply | None
        if "PIPELINING" in conn.extensions:
            replies = await conn.exchange(
                mail + b"".join(line for _, line in rcpts) + b"DATA\r\n",
                [COMMAND_TIMEOUT] * (1 + len(rcpts)) + [DATA_INIT_TIMEOUT],
                "sending MAIL/RCPT/DATA",
            )
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await conn.command(mail, COMMAND_TIMEOUT, "sending MAIL FROM")
            rcpt_replies = []
            data_reply = None
            if 200 <= mail_reply.code < 300:
                for _, line in rcpts:
                    rcpt_replies.append(
                        await conn.command(line, COMMAND_TIMEOUT, "sending RCPT TO")
                    )
        if not 200 <= mail_reply.code < 300:
            if data_reply is not None and data_reply.code == 354:
                await conn.send_body(b"", b".\r\n")
            raise _SessionError(
                f"host {conn.name} said: {mail_reply} (in reply to MAIL FROM command)"
            )
        accepted: list[int] = []
        too_many: list[int] = []
        for (i, _), reply in zip(rcpts, rcpt_replies):
            if 200 <= reply.code < 300:
                accepted.append(i)
            elif reply.code == 452:
                too_many.append(i)
            else:
                results[i] = RecipientResult(recipients[i], _status(reply, soft), str(reply))
        if too_many and not accepted:
            # No progress: a further transaction would get the same answer.
            for i, reply in zip(batch, rcpt_replies):
                if i in too_many:
                    results[i] = RecipientResult(recipients[i], DEFERRED, str(reply))
            too_many = []
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                await conn.send_body(b"", b".\r\n")
            return too_many, True, None
        if data_reply is None:
            data_reply = await conn.command(b"DATA\r\n", DATA_INIT_TIMEOUT, "sending DATA")
        if data_reply.code != 354:
            for i in accepted:
                results[i] = RecipientResult(
                    recipients[i], _status(data_reply, soft), str(data_reply)
                )
            return too_many, True, None
        final = await message.send(conn)
        for i in accepted:
            results[i] = RecipientResult(recipients[i], _status(final, soft), str(final))
        return too_many, False, final

    def _result(
        self,
        conn: SMTPClientProtocol,
        recipients: tuple[str, ...],
        results: dict[int, RecipientResult],
        reply: str | None,
    ) -> DeliveryResult:
        ordered = tuple(results[i] for i in range(len(recipients)))
        if reply is None:
            reply = ordered[0].reply if ordered else "250 2.0.0 Ok"
        return DeliveryResult(relay=conn.relay, reply=reply, recipients=ordered,
                              conn_use=conn.uses)


def _why(e: BaseException) -> str:
    return (str(e) or e.__class__.__name__).rstrip(".")


def _extensions(reply: Reply) -> dict[str, str]:
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


def _size_limit(ext: dict[str, str]) -> int:
    value = ext.get("SIZE", "")
    if value.isascii() and value.isdigit():
        return int(value)
    return 0

