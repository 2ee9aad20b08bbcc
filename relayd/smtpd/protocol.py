"""The ESMTP server: relayd's own state machine (RFC 5321, 1870, 2920, 3207, 3463, 4954,
6152, 6531).

Not ``twisted.mail.smtp.ESMTP``: that one executes pipelined lines while an
asynchronous check is pending, turns an over-long DATA line into command mode
and buffers without bound (see the design notes).  Here input is split in
batches, processing stops while any reply is pending (so pipelined commands
are answered strictly in order), DATA is a byte-stream transform that only
``<CRLF>.<CRLF>`` can end, and every buffer, count and phase is bounded.

The protocol never touches the spool: accepted mail goes to an
``ISubmissionSink``; credentials go to an ``IAuthBackend``.

STARTTLS (RFC 3207 §4.2, design invariant 3): everything the client sent
after the STARTTLS line is thrown away unread (CVE-2011-0411 class command
injection), and the session forgets its HELO, transaction and any AUTH; the
client must say EHLO again.  AUTH (PLAIN, LOGIN) is offered only under TLS,
or to loopback clients on a ``plaintext_auth`` listener.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.config import ListenerConfig
from relayd.errors import SMTPReply
from relayd.interfaces import IAuthBackend, IMessageReceiver, ISession, ISubmissionSink
from relayd.ipaddr import is_loopback
from relayd.metrics import Metrics
from relayd.netio import write_now
from relayd.smtpd.address import AddressSyntaxError, parse_params, parse_path
from relayd.smtpd.authlimit import AuthFailureTracker
from relayd.smtpd.datareader import DataReader
from relayd.smtpd.policy import ListenerPolicy, UserSenders
from relayd.smtpd.ratelimit import MessageRateLimiter
from relayd.tls import handshake_failure_reason, tls_version

log = Logger(namespace="relayd.smtpd")
maillog = Logger(namespace="relayd.mail")

#: RFC 5321 §4.5.3.1.4: 512 octets including CRLF.
COMMAND_LINE_LIMIT = 512
#: MAIL and RCPT carry parameters (SIZE, BODY, SMTPUTF8, later DSN's ORCPT);
#: Postfix's line_length_limit.
PATH_LINE_LIMIT = 2048
#: RFC 4954 §4: an AUTH line may carry a 12288-octet initial response.
AUTH_LINE_LIMIT = 12288
#: Pipelined input held while a reply is pending; beyond it reading stops
#: (TCP back-pressure) rather than growing the buffer.
PIPELINE_BUFFER_LIMIT = 64 * 1024
#: Postfix smtpd_recipient_overshoot_limit: RCPTs past max_recipients that
#: are answered 452 before they start counting as errors.
RECIPIENT_OVERSHOOT_LIMIT = 1000
#: Postfix smtpd_junk_command_limit: NOOP/VRFY/HELP/RSET before they count
#: as errors.
JUNK_COMMAND_LIMIT = 100

#: A failed AUTH is answered this many seconds late (brute-force slowing;
#: input stays held meanwhile, so a pipelining client gains nothing).
AUTH_FAILURE_DELAY = 1.0
#: A backend that has not answered by then gets 454 (never 535).
AUTH_BACKEND_TIMEOUT = 30.0

COMMAND, DATA, CLOSING = "command", "data", "closing"

#: HTTP methods and header lines: never SMTP (Postfix smtpd_forbidden_commands).
_FORBIDDEN_VERBS = frozenset({b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT", b"OPTIONS"})

_JUNK = frozenset({b"NOOP", b"VRFY", b"HELP", b"RSET", b"HELO", b"EHLO"})
#: Commands allowed before STARTTLS on a require_tls listener (Postfix's
#: SMTPD_CMD_FLAG_PRE_TLS set, plus HELP).
_PRE_TLS = frozenset({b"HELO", b"EHLO", b"STARTTLS", b"RSET", b"NOOP", b"QUIT", b"HELP"})

#: RFC 4954 §4: the LOGIN prompts, base64 of "Username:" and "Password:".
_LOGIN_USERNAME = "VXNlcm5hbWU6"
_LOGIN_PASSWORD = "UGFzc3dvcmQ6"


class _AuthBackendTimeout(Exception):
    """The backend did not answer within AUTH_BACKEND_TIMEOUT."""


def _b64(text: bytes) -> bytes:
    """Decode an AUTH response; ``=`` is the empty response (RFC 4954 §4)."""
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SMTPReply(501, "5.5.2", "Cannot decode response") from None


def _printable(arg: bytes) -> bool:
    """A HELO name we are willing to copy into Received: and the log: no
    control characters (a bare CR there would inject a header downstream)."""
    return bool(arg) and not any(b < 0x20 or b == 0x7F for b in arg)


@implementer(ISession)
@define
class Session:
    """What is known about the client, handed to the sink with each message."""

    listener: str
    client_address: str
    route: str
    helo: str = ""
    user: str | None = None
    protocol: str = "SMTP"


class SMTPServerFactory(ServerFactory):
    """One per listener: its config, policy and where mail goes."""

    noisy = False

    def __init__(
        self,
        listener: ListenerConfig,
        hostname: str,
        sink: ISubmissionSink,
        clock: IReactorTime,
        metrics: Metrics,
        *,
        tls: object | None = None,
        auth_backend: IAuthBackend | None = None,
        auth_limiter: AuthFailureTracker | None = None,
    ) -> None:
        """
        :param tls: the server TLS connection creator (``relayd.tls.ServerTLS``
            or anything ``transport.startTLS`` takes) for STARTTLS; ``None``
            on listeners without TLS.  Implicit TLS is wrapped around the
            factory by the caller; the session just starts as TLS.
        :param auth_backend: checks AUTH credentials; ``None``: no AUTH.
        :param auth_limiter: the per-IP AUTH failure tracker shared by the
            sessions (default: a new one from ``listener.limits``).
        """
        self.listener = listener
        self.hostname = hostname
        self.sink = sink
        self.clock = clock
        self.metrics = metrics
        self.policy = ListenerPolicy.from_config(listener)
        self.connections = 0
        self.connections_per_ip: dict[str, int] = {}
        self.tls = tls
        self.auth_backend = auth_backend
        self.auth_limiter = auth_limiter or AuthFailureTracker(
            clock, listener.limits.auth_failures, listener.limits.auth_block
        )
        limits = listener.limits
        self.user_rate = (MessageRateLimiter(clock, limits.messages_per_user)
                          if limits.messages_per_user else None)
        self.ip_rate = (MessageRateLimiter(clock, limits.messages_per_ip)
                        if limits.messages_per_ip else None)
        self.auth_failure_delay = AUTH_FAILURE_DELAY
        self.auth_timeout = AUTH_BACKEND_TIMEOUT
        #: Sessions open now, for a graceful stop.
        self.sessions: set[SMTPServerProtocol] = set()
        self.shutting_down = False
        self._shutdown_done: Deferred[None] | None = None
        self._shutdown_timer: IDelayedCall | None = None

    def reconfigure(
        self,
        listener: ListenerConfig,
        *,
        tls: object | None = None,
        auth_backend: IAuthBackend | None = None,
    ) -> None:
        """A config reload: new sessions get the new policy, limits and TLS
        certificate; sessions in progress keep theirs, but check AUTH
        against the new backend.

        What clients have done so far stays counted: connections per IP,
        AUTH failures (a reload must not lift a brute-force block) and the
        message rate windows, whose limits change in place.
        """
        old = self.listener.limits
        self.listener = listener
        self.policy = ListenerPolicy.from_config(listener)
        self.tls = tls
        self.auth_backend = auth_backend
        limits = listener.limits
        self.auth_limiter.failures = limits.auth_failures
        self.auth_limiter.block = limits.auth_block
        if limits.messages_per_user != old.messages_per_user:
            self.user_rate = (MessageRateLimiter(self.clock, limits.messages_per_user)
                              if limits.messages_per_user else None)
        if limits.messages_per_ip != old.messages_per_ip:
            self.ip_rate = (MessageRateLimiter(self.clock, limits.messages_per_ip)
                            if limits.messages_per_ip else None)

    def shutdown(self, grace: float) -> Deferred[None]:
        """Stop gracefully: idle sessions get ``421 4.3.2`` now, a session in
        the middle of a transaction finishes it (its message is queued and
        answered 250) and is then told 421; whatever is still open after
        ``grace`` seconds is cut off, its message never acknowledged.

        Fires when every session is gone.
        """
        self.shutting_down = True
        done: Deferred[None] = Deferred()
        if not self.sessions:
            done.callback(None)
            return done
        self._shutdown_done = done
        for session in list(self.sessions):
            session.shutdown()
        self._shutdown_timer = self.clock.callLater(grace, self._cut_off)
        return done

    def _cut_off(self) -> None:
        if self.sessions:
            log.warn("stopping: {count} SMTP sessions still open after the grace period; "
                     "closing them (their transactions were not acknowledged)",
                     count=len(self.sessions), listener=self.listener.name)
        for session in list(self.sessions):
            session.transport.abortConnection()  # type: ignore[union-attr]

    def _session_ended(self, session: SMTPServerProtocol) -> None:
        self.sessions.discard(session)
        done = self._shutdown_done
        if done is not None and not self.sessions:
            self._shutdown_done = None
            timer = self._shutdown_timer
            if timer is not None and timer.active():
                timer.cancel()
            done.callback(None)

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        p = SMTPServerProtocol(self)
        p.factory = self
        return p


@implementer(IHandshakeListener)
class SMTPServerProtocol(Protocol):
    """One SMTP session."""

    @property
    def _t(self) -> Any:
        """The transport, with the producer/TLS methods ITransport does not name."""
        return self.transport

    def __init__(self, factory: SMTPServerFactory) -> None:
        self._f = factory
        # A session keeps the listener config it started with: a reload
        # (SMTPServerFactory.reconfigure) changes what new sessions get,
        # never the rules in the middle of someone's transaction.  The AUTH
        # backend is the exception: credentials are checked against the
        # current one, so a password removed by a reload stops working at
        # once, even on a connection that was open before.
        self._listener = factory.listener
        self._policy = factory.policy
        self._tls_options = factory.tls
        self._sender: str | None = None
        self._recipients: list[str] = []
        self._smtputf8 = False
        self._body: str | None = None
        self._receiver: IMessageReceiver | None = None
        self._data_error: SMTPReply | None = None
        self._size = 0
        self._buf = bytearray()
        self._scan = 0
        self._discarding = False
        self._mode = COMMAND
        self._waiting = False
        self._in_process = False
        # Reading from the client stops while the transport cannot take our
        # replies (a client that does not read) or while a reply is pending
        # and too much pipelined input is already buffered.
        self._replies_blocked = False
        self._reading_paused = False
        # ... and while the spool has not caught up with the message's content
        # (a client faster than the disk must not park the message in memory).
        self._spool_behind = False
        self._errors = 0
        self._junk = 0
        self._idle: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._session: Session | None = None
        self._trusted = False
        self._counted = False
        self._messages = 0
        self._overshoot = 0
        # TLS and AUTH state.  _tls: the session is encrypted (implicit TLS
        # from the start, or after STARTTLS).  _need_helo: STARTTLS reset the
        # session and the client must send EHLO again.  _sasl: the AUTH
        # exchange in progress, a callable taking the next client line.
        self._tls = factory.listener.tls == "implicit"
        self._need_helo = False
        self._sasl: Callable[[bytes], object] | None = None
        self._user_senders: UserSenders | None = None
        self._auth_delay: IDelayedCall | None = None
        self._awaiting_handshake = False
        # A TLS handshake (implicit, or after STARTTLS) has begun and not
        # ended: its outcome is still to be counted.
        self._handshaking = False
        self._reset_transaction()

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self._t.getPeer()
        host = getattr(peer, "host", "") or ""
        self._session = Session(
            listener=self._listener.name, client_address=host, route=self._listener.route
        )
        self._trusted = self._policy.trusted_client(host)
        if self._tls:
            self._session.protocol = "SMTPS"
        m = self._f.metrics
        m.smtp_connections.labels(self._listener.name).inc()
        m.smtp_connections_active.labels(self._listener.name).inc()
        self._handshaking = self._tls and INegotiated.providedBy(self.transport)
        f = self._f
        f.connections += 1
        f.connections_per_ip[host] = f.connections_per_ip.get(host, 0) + 1
        self._counted = True
        f.sessions.add(self)
        if f.shutting_down:
            self._close(421, "4.3.2", f"{f.hostname} Service shutting down")
            return
        limits = self._listener.limits
        if limits.max_connections is not None and f.connections > limits.max_connections:
            m.smtp_rejects.labels(self._listener.name, "421").inc()
            self._close(421, "4.7.0", f"{f.hostname} Error: too many connections")
            return
        if (
            limits.max_connections_per_ip is not None
            and f.connections_per_ip[host] > limits.max_connections_per_ip
        ):
            m.smtp_rejects.labels(self._listener.name, "421").inc()
            self._close(421, "4.7.0", f"{f.hostname} Error: too many connections from {host}")
            return
        if self._auth_offered_on_listener and f.auth_limiter.blocked(host):
            m.smtp_rejects.labels(self._listener.name, "421").inc()
            self._close(421, "4.7.0", f"{f.hostname} Error: too many authentication failures")
            return
        if self._tls and INegotiated.providedBy(self.transport):
            # Implicit TLS: greet once the handshake is done.  Writing the
            # 220 earlier makes the TLS layer buffer it and pause us as a
            # producer, and pausing stops the reads the handshake needs.
            self._awaiting_handshake = True
            self._touch()
            return
        self._start_session()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the implicit-TLS handshake is done (also
        called after STARTTLS, when there is nothing left to do)."""
        if self._handshaking:
            self._handshaking = False
            self._f.metrics.tls_handshakes.labels(self._listener.name, "success").inc()
            self._f.metrics.tls_sessions.labels(
                self._listener.name, tls_version(self.transport)
            ).inc()
        if self._awaiting_handshake:
            self._awaiting_handshake = False
            if self._mode != CLOSING:
                self._start_session()

    def _start_session(self) -> None:
        self._t.registerProducer(self, True)
        self._reply(220, None, f"{self._f.hostname} ESMTP relayd")
        self._touch()

    def _handshake_failed(self, reason: str, failure: Failure | None = None) -> None:
        """Count a TLS handshake that did not complete (and log why: the
        metric only has the bounded reason, the log has OpenSSL's words)."""
        self._handshaking = False
        name = self._listener.name
        self._f.metrics.tls_handshakes.labels(name, "failure").inc()
        self._f.metrics.tls_handshake_failures.labels(name, reason).inc()
        log.info("TLS handshake failed from [{client}] on listener {listener}: {reason} ({error})",
                 client=self._client, listener=name, reason=reason,
                 error=failure.getErrorMessage() if failure is not None else "timeout")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._handshaking:
            self._handshake_failed(handshake_failure_reason(reason), reason)
        self._mode = CLOSING
        self.connected = False
        for call in (self._idle, self._deadline, self._auth_delay):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._deadline = self._auth_delay = None
        self._sasl = None
        if self._receiver is not None:
            self._receiver.abort()
            self._receiver = None
        self._f.metrics.smtp_connections_active.labels(self._listener.name).dec()
        if self._counted:
            self._counted = False
            f = self._f
            f.connections -= 1
            host = self._client
            left = f.connections_per_ip.get(host, 1) - 1
            if left:
                f.connections_per_ip[host] = left
            else:
                f.connections_per_ip.pop(host, None)
        self._f._session_ended(self)

    def shutdown(self) -> None:
        """The relay is stopping: close now unless a transaction is under
        way, which may finish first (see ``SMTPServerFactory.shutdown``)."""
        if self._awaiting_handshake:
            self._t.abortConnection()
        else:
            self._close_if_idle()

    def _close_if_idle(self) -> None:
        """While stopping, a session with no transaction and no reply owed
        is told 421 and closed."""
        if (self._f.shutting_down and self._mode == COMMAND and self._sender is None
                and not self._waiting and self._sasl is None):
            self._close(421, "4.3.2", f"{self._f.hostname} Service shutting down")

    @property
    def _client(self) -> str:
        return self._session.client_address if self._session else ""

    @property
    def _permitted(self) -> bool:
        """May this client relay?  mynetworks, or an authenticated user."""
        return self._trusted or (self._session is not None and self._session.user is not None)

    @property
    def _auth_offered_on_listener(self) -> bool:
        return self._listener.auth != "none" and self._f.auth_backend is not None

    @property
    def _auth_allowed_here(self) -> bool:
        """May this session AUTH now?  Under TLS, or plaintext from loopback
        on a plaintext_auth listener (design invariant 3)."""
        return self._auth_offered_on_listener and (
            self._tls or (self._listener.plaintext_auth and is_loopback(self._client))
        )

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
        if pause != self._reading_paused and self.connected and self._mode != CLOSING:
            self._reading_paused = pause
            if pause:
                self._t.pauseProducing()
            else:
                self._t.resumeProducing()

    def _timed_out(self) -> None:
        if self._handshaking:
            self._handshake_failed("timeout")
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

    def _close(self, code: int, enhanced: str, text: str) -> None:
        if self._mode == CLOSING:
            return
        self._reply(code, enhanced, text)
        self._mode = CLOSING
        self._buf.clear()
        self._t.loseConnection()
        # If the client does not read, the close never completes: the next
        # idle timeout aborts the connection.
        self._touch()

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == CLOSING:
            return
        if self._mode == DATA and not self._buf and not self._in_process:
            # The common case in DATA: no copy into the command buffer.
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
                if self._mode == DATA:
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
                if self._sasl is not None:
                    self._sasl_line(line)
                else:
                    self._dispatch(line)
                if self._f.shutting_down:
                    self._close_if_idle()
        finally:
            self._in_process = False
        self._update_reading()

    def _line_limit(self) -> int:
        if self._sasl is not None:
            return AUTH_LINE_LIMIT
        head = bytes(self._buf[:5]).upper()
        if head.startswith(b"AUTH"):
            return AUTH_LINE_LIMIT
        if head.startswith((b"MAIL ", b"RCPT ")):
            return PATH_LINE_LIMIT
        return COMMAND_LINE_LIMIT

    def _next_line(self) -> bytes | None:
        """The next complete line without its CRLF, or None.

        Over-long lines are dropped as they arrive (the buffer never holds
        more than one limit's worth) and answered with 500 once they end.
        """
        while True:
            idx = self._buf.find(b"\n", self._scan)
            if idx < 0:
                if self._discarding:
                    self._buf.clear()
                    self._scan = 0
                elif len(self._buf) > self._line_limit():
                    self._discarding = True
                    self._buf.clear()
                    self._scan = 0
                else:
                    self._scan = len(self._buf)
                return None
            limit = self._line_limit()
            line = bytes(self._buf[:idx])
            del self._buf[: idx + 1]
            self._scan = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._discarding or idx + 1 > limit:
                self._discarding = False
                if self._sasl is not None:
                    self._sasl = None
                    self._auth_refused("malformed")
                    self._error_reply(500, "5.5.6", "Authentication exchange line is too long")
                else:
                    self._error_reply(500, "5.5.2", "Line too long")
                if self._mode != COMMAND:
                    return None
                continue
            return line

    # -- commands ------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        handler = self._COMMANDS.get(verb)
        if handler is None:
            if verb in _FORBIDDEN_VERBS or verb.endswith(b":"):
                # A browser tricked into posting to the SMTP port (Postfix's
                # smtpd_forbidden_commands): its body must never run as SMTP.
                log.info("cross-protocol command {verb!r} from [{client}]; disconnecting",
                         verb=verb[:20].decode("latin-1"), client=self._client)
                self._f.metrics.smtp_rejects.labels(self._listener.name, "421").inc()
                self._close(421, "4.7.0", f"{self._f.hostname} Error: I can break rules, too. "
                            "Goodbye.")
                return
            self._error_reply(502, "5.5.2", "Error: command not recognized")
            return
        if verb in _JUNK:
            self._junk += 1
            if self._junk > JUNK_COMMAND_LIMIT:
                self._count_error()
                if self._mode != COMMAND:
                    return
        if self._listener.require_tls and not self._tls and verb not in _PRE_TLS:
            if verb == b"AUTH":
                self._auth_refused("tls_required")
            self._error_reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        try:
            result = handler(self, arg.strip(b" "))
        except SMTPReply as e:
            self._error_reply(e.code, e.enhanced, e.text)
            return
        if isinstance(result, Deferred):
            self._wait(result)

    def _wait(self, d: Deferred[Any]) -> None:
        """Hold further input until ``d`` has been answered."""
        self._waiting = True
        self._suspend_timer()
        d.addErrback(self._async_failed)
        d.addBoth(self._resume)

    def _async_failed(self, failure: Failure) -> None:
        if failure.check(SMTPReply):
            e = failure.value
            assert isinstance(e, SMTPReply)
            self._error_reply(e.code, e.enhanced, e.text)
        else:
            log.failure("error in SMTP session from [{client}]", failure, client=self._client)
            self._error_reply(451, "4.3.0", "Error: internal error")

    def _resume(self, _: object) -> None:
        self._waiting = False
        if self._f.shutting_down:
            self._close_if_idle()
        if self._mode != CLOSING:
            self._touch()
            self._process()

    def do_HELO(self, arg: bytes) -> None:
        if not _printable(arg):
            raise SMTPReply(501, "5.5.4", "Syntax: HELO hostname")
        self._greet(arg, esmtp=False)
        self._reply(250, None, self._f.hostname)

    def do_EHLO(self, arg: bytes) -> None:
        if not _printable(arg):
            raise SMTPReply(501, "5.5.4", "Syntax: EHLO hostname")
        self._greet(arg, esmtp=True)
        lines = [
            self._f.hostname,
            "PIPELINING",
            f"SIZE {self._listener.max_message_size}",
        ]
        if self._starttls_offered:
            lines.append("STARTTLS")
        if self._auth_allowed_here:
            # Never CRAM-MD5: it needs the plaintext password on our side.
            lines.append("AUTH PLAIN LOGIN")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
        write_now(self._t, ("\r\n".join(out) + "\r\n").encode("ascii"))

    def _greet(self, arg: bytes, esmtp: bool) -> None:
        assert self._session is not None
        self._session.helo = arg.decode("utf-8", "replace")[:255]
        # RFC 3848: ESMTPS under TLS; cleanup adds the "A" for an
        # authenticated session (ESMTPSA).
        self._session.protocol = ("ESMTP" if esmtp else "SMTP") + ("S" if self._tls else "")
        self._need_helo = False
        self._reset_transaction()

    @property
    def _starttls_offered(self) -> bool:
        return self._listener.tls == "starttls" and not self._tls

    def do_STARTTLS(self, arg: bytes) -> None:
        if self._tls:
            raise SMTPReply(503, "5.5.1", "Error: TLS already active")
        if self._listener.tls != "starttls":
            # A listener without TLS does not know the command (as the
            # existing unknown-command answer: 502 5.5.2).
            raise SMTPReply(502, "5.5.2", "Error: command not recognized")
        if arg:
            raise SMTPReply(501, "5.5.4", "Syntax: STARTTLS")
        if self._tls_options is None or not ITLSTransport.providedBy(self.transport):
            raise SMTPReply(454, "4.7.0", "TLS not available due to local problem")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 §4.2 / CVE-2011-0411: nothing the client pipelined after
        # STARTTLS in plaintext may be executed inside TLS.
        self._buf.clear()
        self._scan = 0
        self._discarding = False
        self._t.startTLS(self._tls_options)  # type: ignore[attr-defined,arg-type]
        self._tls = True
        self._handshaking = True
        # ...and the session starts over: no HELO, no transaction, no AUTH.
        assert self._session is not None
        self._session.helo = ""
        self._session.user = None
        self._session.protocol = "SMTPS"
        self._need_helo = True
        self._user_senders = None
        self._sasl = None
        self._reset_transaction()
        log.debug("STARTTLS from [{client}]", client=self._client)

    # -- AUTH (RFC 4954) -------------------------------------------------------

    def do_AUTH(self, arg: bytes) -> Deferred[None] | None:
        assert self._session is not None
        if not self._auth_offered_on_listener:
            raise SMTPReply(502, "5.5.2", "Error: command not recognized")
        if not self._auth_allowed_here:
            self._auth_refused("tls_required")
            if self._listener.tls == "none":
                raise SMTPReply(503, "5.5.1", "Error: authentication not enabled")
            raise SMTPReply(530, "5.7.0", "Must issue a STARTTLS command first")
        if self._f.auth_limiter.blocked(self._client):
            self._auth_refused("blocked")
            self._f.metrics.smtp_rejects.labels(self._listener.name, "421").inc()
            self._close(421, "4.7.0", f"{self._f.hostname} Error: too many authentication failures")
            return None
        if self._need_helo or not self._session.helo:
            self._auth_refused("sequence")
            raise SMTPReply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._session.user is not None:
            self._auth_refused("sequence")
            raise SMTPReply(503, "5.5.1", "Error: already authenticated")
        if self._sender is not None:
            self._auth_refused("sequence")
            raise SMTPReply(503, "5.5.1", "Error: MAIL transaction in progress")
        mechanism, _, initial = arg.partition(b" ")
        initial = initial.strip(b" ")
        if not mechanism or b" " in initial:
            self._auth_refused("malformed")
            raise SMTPReply(501, "5.5.4", "Syntax: AUTH mechanism")
        mechanism = mechanism.upper()
        if mechanism == b"PLAIN":
            if initial:
                return self._initial_response(self._plain, initial)
            self._sasl = self._plain
            self._reply(334, None, "")
            return None
        if mechanism == b"LOGIN":
            if initial:
                self._initial_response(self._login_username, initial)
                return None
            self._sasl = self._login_username
            self._reply(334, None, _LOGIN_USERNAME)
            return None
        self._auth_refused("mechanism")
        raise SMTPReply(504, "5.5.4", "Unsupported authentication mechanism")

    def _auth_refused(self, reason: str) -> None:
        """Count an AUTH that did not authenticate (relayd.metrics.AUTH_FAILURE_REASONS)."""
        self._f.metrics.auth_failures.labels(self._listener.name, reason).inc()

    def _initial_response(self, step: Callable[[bytes], Any], response: bytes) -> Any:
        """``step(response)``, counting an undecodable response (501)."""
        try:
            return step(response)
        except SMTPReply:
            self._auth_refused("malformed")
            raise

    def _sasl_line(self, line: bytes) -> None:
        """The client's answer to a 334 challenge."""
        step, self._sasl = self._sasl, None
        assert step is not None
        if line.strip(b" ") == b"*":
            self._auth_refused("aborted")
            self._error_reply(501, "5.7.0", "Authentication aborted")
            return
        try:
            result = step(line.strip(b" "))
        except SMTPReply as e:
            self._auth_refused("malformed")
            self._error_reply(e.code, e.enhanced, e.text)
            return
        if isinstance(result, Deferred):
            self._wait(result)

    def _plain(self, response: bytes) -> Deferred[None]:
        """RFC 4616: ``authzid NUL authcid NUL passwd``."""
        parts = _b64(response).split(b"\0")
        if len(parts) != 3:
            raise SMTPReply(501, "5.5.2", "Cannot decode response")
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise SMTPReply(501, "5.5.2", "Cannot decode response") from None
        if authzid and authzid != authcid:
            # We do not let one user act for another.
            return self._auth_failed(authcid, "PLAIN", "authorization identity differs")
        return self._authenticate("PLAIN", authcid, password)

    def _login_username(self, response: bytes) -> None:
        try:
            username = _b64(response).decode("utf-8")
        except UnicodeDecodeError:
            raise SMTPReply(501, "5.5.2", "Cannot decode response") from None

        def password_step(line: bytes) -> Deferred[None]:
            try:
                password = _b64(line).decode("utf-8")
            except UnicodeDecodeError:
                raise SMTPReply(501, "5.5.2", "Cannot decode response") from None
            return self._authenticate("LOGIN", username, password)

        self._sasl = password_step
        self._reply(334, None, _LOGIN_PASSWORD)

    def _authenticate(self, mechanism: str, username: str, password: str) -> Deferred[None]:
        if not username or not password:
            # Never ask a backend about an empty password: an LDAP server
            # takes it as an unauthenticated bind and says yes.
            return self._auth_failed(username, mechanism, "empty user name or password")
        backend = self._f.auth_backend
        assert backend is not None

        def lookup() -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.callback(None)
            d.addCallback(lambda _: backend.authenticate(username, password))

            def with_senders(user: str) -> Deferred[tuple[str, Any]]:
                s = backend.sender_patterns(user)
                if not isinstance(s, Deferred):
                    raise TypeError(f"sender_patterns returned {s!r}, not a Deferred")
                return s.addCallback(lambda patterns: (user, patterns))

            d.addCallback(with_senders)
            return d

        d = self._timed(lookup())
        result: Deferred[None] = Deferred()

        def succeeded(answer: tuple[str, Any]) -> None:
            user, patterns = answer
            if self._mode == CLOSING:
                result.callback(None)
                return
            assert self._session is not None
            self._session.user = str(user)
            self._user_senders = UserSenders.from_patterns(self._session.user, patterns)
            self._f.metrics.auth_attempts.labels(self._listener.name, "success").inc()
            log.info("AUTH {mechanism} from [{client}]: user={user}", mechanism=mechanism,
                     client=self._client, user=self._session.user)
            self._reply(235, "2.7.0", "Authentication successful")
            result.callback(None)

        def failed(failure: Failure) -> None:
            if failure.check(UnauthorizedLogin):
                self._auth_failed(username, mechanism, "wrong credentials").chainDeferred(result)
                return
            self._f.metrics.auth_attempts.labels(self._listener.name, "error").inc()
            self._auth_refused(
                "backend_timeout" if failure.check(_AuthBackendTimeout) else "backend_error"
            )
            if failure.check(_AuthBackendTimeout):
                log.error("AUTH {mechanism} from [{client}]: the auth backend did not answer "
                          "within {timeout}s", mechanism=mechanism, client=self._client,
                          timeout=self._f.auth_timeout)
            else:
                log.failure("AUTH {mechanism} from [{client}]: auth backend error", failure,
                            mechanism=mechanism, client=self._client)
            result.errback(SMTPReply(454, "4.7.0", "Temporary authentication failure"))

        d.addCallbacks(succeeded, failed)
        return result

    def _timed(self, d: Deferred[Any]) -> Deferred[Any]:
        """``d``, or a failure with _AuthBackendTimeout if it is too slow."""
        out: Deferred[Any] = Deferred()

        def timeout() -> None:
            out.errback(_AuthBackendTimeout())
            d.cancel()

        timer = self._f.clock.callLater(self._f.auth_timeout, timeout)

        def done(r: Any) -> None:
            if out.called:
                return  # late: already answered 454; swallow (also CancelledError)
            timer.cancel()
            if isinstance(r, Failure):
                out.errback(r)
            else:
                out.callback(r)

        d.addBoth(done)
        return out

    def _auth_failed(self, username: str, mechanism: str, why: str) -> Deferred[None]:
        """Count the failure now, answer 535 after the delay."""
        host = self._client
        name = self._listener.name
        self._f.metrics.auth_attempts.labels(name, "failure").inc()
        self._auth_refused("bad_credentials")
        log.info("AUTH {mechanism} from [{client}] failed: {why} (user={user!r})",
                 mechanism=mechanism, client=host, why=why, user=username[:64])
        if self._f.auth_limiter.failure(host):
            self._f.metrics.auth_blocked.labels(name).inc()
            log.warn("[{client}] blocked on listener {listener} for {block}s after too many "
                     "authentication failures", client=host, listener=name,
                     block=self._f.auth_limiter.block)
        d: Deferred[None] = Deferred()

        def answer() -> None:
            self._auth_delay = None
            d.errback(SMTPReply(535, "5.7.8", "Error: authentication failed"))

        if self._f.auth_failure_delay > 0:
            self._auth_delay = self._f.clock.callLater(self._f.auth_failure_delay, answer)
        else:
            answer()
        return d

    def do_MAIL(self, arg: bytes) -> None:
        if self._need_helo:
            raise SMTPReply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._sender is not None:
            raise SMTPReply(503, "5.5.1", "Error: nested MAIL command")
        if self._listener.auth == "required" and (
            self._session is None or self._session.user is None
        ):
            raise SMTPReply(530, "5.7.0", "Authentication required")
        limit = self._listener.limits.max_messages_per_session
        if limit is not None and self._messages >= limit:
            self._f.metrics.smtp_rejects.labels(self._listener.name, "421").inc()
            self._close(421, "4.7.0", f"{self._f.hostname} Error: too many messages in one session")
            return
        text = self._decode(arg)
        if text is None or text[:5].upper() != "FROM:":
            raise SMTPReply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        try:
            sender, params_text = parse_path(text[5:])
            params = parse_params(params_text)
        except AddressSyntaxError:
            raise SMTPReply(501, "5.1.7", "Bad sender address syntax") from None
        smtputf8 = False
        body = None
        for key, value in params:
            if key == "SIZE" and value and value.isascii() and value.isdigit() and len(value) < 20:
                if int(value) > self._listener.max_message_size:
                    raise SMTPReply(552, "5.3.4", "Message size exceeds fixed limit")
            elif key == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                body = value.upper()
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif key in ("SIZE", "BODY", "SMTPUTF8"):
                raise SMTPReply(501, "5.5.4", f"Bad {key} parameter syntax")
            else:
                raise SMTPReply(555, "5.5.4", f"Unsupported option: {key}")
        if not smtputf8 and not sender.isascii():
            raise SMTPReply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
        self._f.sink.check_capacity()
        self._policy.check_sender(sender, self._permitted)
        if self._user_senders is not None:
            self._user_senders.check(sender)
        self._check_rates()
        self._sender = sender
        self._smtputf8 = smtputf8
        self._body = body
        self._reply(250, "2.1.0", "Ok")

    def _check_rates(self) -> None:
        """450 4.7.1 past ``messages_per_user`` / ``messages_per_ip``: checked
        last at MAIL, so only a MAIL that would be accepted spends a token."""
        user = self._session.user if self._session else None
        if user is not None and self._f.user_rate is not None:
            if not self._f.user_rate.take(user):
                maillog.info("NOQUEUE: reject: MAIL from [{client}]: 450 4.7.1 message rate "
                             "exceeded for user={user} listener={listener}",
                             client=self._client, user=user, listener=self._listener.name)
                raise SMTPReply(450, "4.7.1", f"Error: too much mail from user {user}")
        if self._f.ip_rate is not None and not self._f.ip_rate.take(self._client):
            maillog.info("NOQUEUE: reject: MAIL from [{client}]: 450 4.7.1 message rate "
                         "exceeded listener={listener}", client=self._client,
                         listener=self._listener.name)
            raise SMTPReply(450, "4.7.1", f"Error: too much mail from {self._client}")

    def do_RCPT(self, arg: bytes) -> None:
        if self._sender is None:
            raise SMTPReply(503, "5.5.1", "Error: need MAIL command")
        text = self._decode(arg)
        if text is None or text[:3].upper() != "TO:":
            raise SMTPReply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        try:
            recipient, params_text = parse_path(text[3:])
            params = parse_params(params_text)
        except AddressSyntaxError:
            raise SMTPReply(501, "5.1.3", "Bad recipient address syntax") from None
        if not recipient:
            raise SMTPReply(501, "5.1.3", "Bad recipient address syntax")
        for key, _ in params:
            raise SMTPReply(555, "5.5.4", f"Unsupported option: {key}")
        if not self._smtputf8 and not recipient.isascii():
            raise SMTPReply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
        if len(self._recipients) >= self._listener.max_recipients:
            # Not counted as an error: Postfix lets a client overshoot the
            # limit (smtpd_recipient_overshoot_limit) and sends the rest later.
            self._f.metrics.smtp_rejects.labels(self._listener.name, "452").inc()
            self._reply(452, "4.5.3", "Error: too many recipients")
            self._overshoot += 1
            if self._overshoot > RECIPIENT_OVERSHOOT_LIMIT:
                self._count_error()
            return
        try:
            self._policy.check_recipient(recipient, self._permitted)
        except SMTPReply as e:
            maillog.info(
                "NOQUEUE: reject: RCPT from [{client}]: {code} {enhanced} {text}; "
                "from=<{sender}> to=<{rcpt}> listener={listener} helo=<{helo}>",
                client=self._client, code=e.code, enhanced=e.enhanced, text=e.text,
                sender=self._sender, rcpt=recipient, listener=self._listener.name,
                helo=self._session.helo if self._session else "",
            )
            raise
        if recipient not in self._recipients:
            # A duplicate is accepted and delivered once (Postfix's cleanup
            # drops duplicates too).
            self._recipients.append(recipient)
        self._reply(250, "2.1.5", "Ok")

    def do_DATA(self, arg: bytes) -> None:
        if self._sender is None:
            raise SMTPReply(503, "5.5.1", "Error: need MAIL command")
        if not self._recipients:
            raise SMTPReply(554, "5.5.1", "Error: no valid recipients")
        if arg:
            raise SMTPReply(501, "5.5.4", "Syntax: DATA")
        assert self._session is not None
        self._receiver = self._f.sink.open_message(
            self._session, self._sender, tuple(self._recipients), self._smtputf8, self._body
        )
        self._reader = DataReader(normalize=self._listener.bare_newline == "normalize")
        self._size = 0
        self._data_error = None
        self._mode = DATA
        self._deadline = self._f.clock.callLater(2 * self._listener.timeout, self._timed_out)
        self._reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def do_RSET(self, arg: bytes) -> None:
        self._reset_transaction()
        self._reply(250, "2.0.0", "Ok")

    def do_NOOP(self, arg: bytes) -> None:
        self._reply(250, "2.0.0", "Ok")

    def do_VRFY(self, arg: bytes) -> None:
        if not arg:
            raise SMTPReply(501, "5.5.4", "Syntax: VRFY address")
        self._reply(252, "2.0.0", "Cannot VRFY user; try RCPT to attempt delivery")

    def do_HELP(self, arg: bytes) -> None:
        self._reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")

    def do_QUIT(self, arg: bytes) -> None:
        self._close(221, "2.0.0", "Bye")

    def do_BDAT(self, arg: bytes) -> None:
        # Not advertised; answered here so the client's chunk is not read
        # as commands (Postfix closes on BDAT when CHUNKING is off too).
        self._close(421, "4.7.0", f"{self._f.hostname} Error: BDAT without CHUNKING")

    _COMMANDS: dict[bytes, Callable[[SMTPServerProtocol, bytes], object]] = {
        b"HELO": do_HELO,
        b"EHLO": do_EHLO,
        b"MAIL": do_MAIL,
        b"RCPT": do_RCPT,
        b"DATA": do_DATA,
        b"RSET": do_RSET,
        b"NOOP": do_NOOP,
        b"VRFY": do_VRFY,
        b"HELP": do_HELP,
        b"QUIT": do_QUIT,
        b"BDAT": do_BDAT,
        b"STARTTLS": do_STARTTLS,
        b"AUTH": do_AUTH,
    }

    def _decode(self, arg: bytes) -> str | None:
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            return None

    # -- DATA ----------------------------------------------------------------

    def _feed_data(self, data: bytes) -> None:
        content, rest = self._reader.feed(data)
        if content and self._data_error is None:
            self._size += len(content)
            if self._size > self._listener.max_message_size:
                self._refuse_data(SMTPReply(552, "5.3.4", "Error: message file too big"))
            else:
                assert self._receiver is not None
                behind = self._receiver.write(content)
                if behind is not None and not self._spool_behind:
                    self._spool_behind = True
                    self._update_reading()
                    behind.addBoth(self._spool_caught_up)
        if (
            self._reader.bare_newline
            and self._data_error is None
            and self._listener.bare_newline == "reject"
        ):
            self._refuse_data(SMTPReply(554, "5.6.0", "Error: bare <CR> or <LF> received"))
        if rest is not None:
            self._mode = COMMAND
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            if rest:
                self._buf[:0] = rest
            self._end_of_data()

    def _spool_caught_up(self, _: object) -> None:
        self._spool_behind = False
        self._update_reading()

    def _refuse_data(self, reply: SMTPReply) -> None:
        self._data_error = reply
        if self._receiver is not None:
            self._receiver.abort()
            self._receiver = None

    def _end_of_data(self) -> None:
        if self._data_error is not None:
            e = self._data_error
            self._reset_transaction()
            self._error_reply(e.code, e.enhanced, e.text)
            return
        receiver, self._receiver = self._receiver, None
        assert receiver is not None
        d = receiver.finish()
        d.addCallbacks(self._queued, self._not_queued)
        self._wait(d)

    def _queued(self, queue_id: str) -> None:
        size = self._size
        self._reset_transaction()
        self._messages += 1
        self._f.metrics.messages_received.labels(self._listener.name).inc()
        self._f.metrics.message_size.labels(self._listener.name).observe(size)
        self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _not_queued(self, failure: Failure) -> None:
        self._reset_transaction()
        if not failure.check(SMTPReply):
            log.failure("queue file write error for [{client}]", failure, client=self._client)
            self._error_reply(451, "4.3.0", "Error: queue file write error")
            return
        e = failure.value
        assert isinstance(e, SMTPReply)
        self._error_reply(e.code, e.enhanced, e.text)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []
        self._smtputf8 = False
        self._body = None
        receiver = self._receiver
        if receiver is not None:
            receiver.abort()
        self._receiver = None
        self._data_error = None
        self._size = 0

    # -- replies -------------------------------------------------------------

    def _reply(self, code: int, enhanced: str | None, text: str) -> None:
        if self._mode == CLOSING:
            return
        line = f"{code} {enhanced} {text}\r\n" if enhanced else f"{code} {text}\r\n"
        write_now(self._t, line.encode("utf-8"))

    def _error_reply(self, code: int, enhanced: str, text: str) -> None:
        """A 4xx/5xx: counted, and too many of them end the session
        (Postfix smtpd_hard_error_limit)."""
        self._f.metrics.smtp_rejects.labels(self._listener.name, str(code)).inc()
        self._reply(code, enhanced, text)
        self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self._listener.limits.max_errors_per_session:
            self._close(421, "4.7.0", f"{self._f.hostname} Error: too many errors")
