"""The ESMTP server: relayd's own state machine (RFC 5321, 1870, 2920, 3030, 3207, 3463, 4954,
6152, 6531).

Not ``twisted.mail.smtp.ESMTP``: that one executes pipelined lines while an
asynchronous check is pending, turns an over-long DATA line into command mode
and buffers without bound (see the design notes).  The input discipline that
prevents all three is ``relayd.smtpd.connection``; DATA is a byte-stream
transform that only ``<CRLF>.<CRLF>`` can end (``datareader``).

This module is the command state machine and stays one piece (over 400
lines) because its states and their order are the protocol: which command
is allowed after which, what STARTTLS and a new EHLO reset, when a
transaction begins and ends.  Everything with a job of its own lives
beside it: the AUTH exchange (``sasl``), per-client limits (``limits``),
the envelope grammar (``transaction``), DATA and BDAT (``intake``, the base
class), refusals (``rejectlog``), the listener (``factory``).

The protocol never touches the spool: accepted mail goes to an
``ISubmissionSink``; credentials go to an ``IAuthBackend``.

STARTTLS (RFC 3207 §4.2, design invariant 3): everything the client sent
after the STARTTLS line is thrown away unread (CVE-2011-0411 class command
injection), and the session forgets its HELO, transaction and any AUTH; the
client must say EHLO again.  AUTH (PLAIN, LOGIN) is offered only under TLS,
or to loopback clients on a ``plaintext_auth`` listener.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    INegotiated,
    ITLSTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.errors import SMTPReply
from relayd.ipaddr import is_loopback
from relayd.netio import write_now
from relayd.smtpd.connection import CLOSING, COMMAND
from relayd.smtpd.intake import MessageIntake
from relayd.smtpd.lines import line_limit
from relayd.smtpd.policy import UserSenders, accept_recipient
from relayd.smtpd.rejectlog import Rejects
from relayd.smtpd.sasl import AUTH_BACKEND_TIMEOUT, AUTH_FAILURE_DELAY, SASLServer
from relayd.smtpd.transaction import Session, Transaction, parse_mail, parse_rcpt
from relayd.tls import handshake_failure_reason, tls_version

if TYPE_CHECKING:
    from relayd.smtpd.factory import SMTPServerFactory

__all__ = [
    "AUTH_BACKEND_TIMEOUT", "AUTH_FAILURE_DELAY", "SMTPServerFactory", "SMTPServerProtocol",
    "Session",
]

log = Logger(namespace="relayd.smtpd")

#: Postfix smtpd_recipient_overshoot_limit: RCPTs past max_recipients that
#: are answered 452 before they start counting as errors.
RECIPIENT_OVERSHOOT_LIMIT = 1000
#: Postfix smtpd_junk_command_limit: NOOP/VRFY/HELP/RSET before they count
#: as errors.
JUNK_COMMAND_LIMIT = 100

#: HTTP methods and header lines: never SMTP (Postfix smtpd_forbidden_commands).
_FORBIDDEN_VERBS = frozenset({b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT", b"OPTIONS"})

_JUNK = frozenset({b"NOOP", b"VRFY", b"HELP", b"RSET", b"HELO", b"EHLO"})
#: Commands allowed before STARTTLS on a require_tls listener (Postfix's
#: SMTPD_CMD_FLAG_PRE_TLS set, plus HELP).
_PRE_TLS = frozenset({b"HELO", b"EHLO", b"STARTTLS", b"RSET", b"NOOP", b"QUIT", b"HELP"})


def __getattr__(name: str) -> Any:
    """``SMTPServerFactory`` moved to ``relayd.smtpd.factory`` (which imports
    this module); the old import path keeps working."""
    if name == "SMTPServerFactory":
        from relayd.smtpd.factory import SMTPServerFactory
        return SMTPServerFactory
    raise AttributeError(name)


def _printable(arg: bytes) -> bool:
    """A HELO name we are willing to copy into Received: and the log: no
    control characters (a bare CR there would inject a header downstream)."""
    return bool(arg) and not any(b < 0x20 or b == 0x7F for b in arg)


@implementer(IHandshakeListener)
class SMTPServerProtocol(MessageIntake):
    """One SMTP session."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        super().__init__(factory)
        # Like the listener config (SMTPConnection), policy and certificate
        # are the session's own; the AUTH backend is the exception:
        # credentials are checked against the current one, so a password
        # removed by a reload stops working at once, even on a connection
        # that was open before.
        self._policy = factory.policy
        self._tls_options = factory.tls
        self._tx: Transaction | None = None
        self._junk = 0
        # What a refusal is about, for its mail-log line (rejectlog).
        self._rejects = Rejects(factory.metrics, self._listener.name)
        self._rcpt: str | None = None
        self._trusted = False
        self._counted = False
        self._overshoot = 0
        # TLS and AUTH state.  _tls: the session is encrypted (implicit TLS
        # from the start, or after STARTTLS).  _need_helo: STARTTLS reset the
        # session and the client must send EHLO again.  _sasl: AUTH
        # exchanges (relayd.smtpd.sasl), fed lines while one is active.
        self._tls = factory.listener.tls == "implicit"
        self._need_helo = False
        self._sasl = SASLServer(self, factory, self._listener.name)
        self._user_senders: UserSenders | None = None
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
        self._sasl.client = host
        refused = f.limits.admit(host, self._listener.limits, self._auth_offered_on_listener)
        self._counted = True
        f.sessions.add(self)
        if f.shutting_down:
            self._close(421, "4.3.2", f"{f.hostname} Service shutting down")
            return
        if refused is not None:
            self._refuse(421, "4.7.0", f"{f.hostname} Error: {refused}")
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
        self._producing = True
        self.reply(220, None, f"{self._f.hostname} ESMTP relayd")
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
        for call in (self._idle, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._deadline = None
        self._sasl.stop()
        if self._tx is not None:
            self._tx.abort()
        self._f.metrics.smtp_connections_active.labels(self._listener.name).dec()
        if self._counted:
            self._counted = False
            self._f.limits.release(self._client)
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
        if (self._f.shutting_down and self._mode == COMMAND and self._tx is None
                and not self._waiting and not self._sasl.active):
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

    def _line_limit(self) -> int:
        return line_limit(self._buf, self._sasl.active)

    def _line(self, line: bytes) -> None:
        if self._sasl.active:
            self._sasl.line(line)
        else:
            self._dispatch(line)

    def _too_long(self) -> None:
        if self._sasl.active:
            self._sasl.too_long()
        else:
            self.error_reply(500, "5.5.2", "Line too long")

    def _timed_out(self) -> None:
        if self._handshaking:
            self._handshake_failed("timeout")
        super()._timed_out()

    # -- commands ------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        handler = self._COMMANDS.get(verb)
        self._stage = verb.decode("ascii") if handler is not None else "UNKNOWN"
        self._rcpt = None
        if handler is None:
            if verb in _FORBIDDEN_VERBS or verb.endswith(b":"):
                # A browser tricked into posting to the SMTP port (Postfix's
                # smtpd_forbidden_commands): its body must never run as SMTP.
                log.info("cross-protocol command {verb!r} from [{client}]; disconnecting",
                         verb=verb[:20].decode("latin-1"), client=self._client)
                self._refuse(421, "4.7.0", f"{self._f.hostname} Error: I can break rules, too. "
                            "Goodbye.")
                return
            self.error_reply(502, "5.5.2", "Error: command not recognized")
            return
        if verb in _JUNK:
            self._junk += 1
            if self._junk > JUNK_COMMAND_LIMIT:
                self._count_error()
                if self._mode != COMMAND:
                    return
        if self._listener.require_tls and not self._tls and verb not in _PRE_TLS:
            if verb == b"AUTH":
                self._sasl.refused("tls_required")
            self.error_reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return
        try:
            result = handler(self, arg.strip(b" "))
        except SMTPReply as e:
            self.error_reply(e.code, e.enhanced, e.text)
            return
        if isinstance(result, Deferred):
            self.wait(result)

    def do_HELO(self, arg: bytes) -> None:
        if not _printable(arg):
            raise SMTPReply(501, "5.5.4", "Syntax: HELO hostname")
        self._greet(arg, esmtp=False)
        self.reply(250, None, self._f.hostname)

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
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
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
        self.reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 §4.2 / CVE-2011-0411: nothing the client pipelined after
        # STARTTLS in plaintext may be executed inside TLS.
        self._lines.clear()
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
        self._sasl.stop()
        self._reset_transaction()
        log.debug("STARTTLS from [{client}]", client=self._client)

    # -- AUTH (RFC 4954) -------------------------------------------------------

    def do_AUTH(self, arg: bytes) -> Deferred[None] | None:
        assert self._session is not None
        if not self._auth_offered_on_listener:
            raise SMTPReply(502, "5.5.2", "Error: command not recognized")
        if not self._auth_allowed_here:
            self._sasl.refused("tls_required")
            if self._listener.tls == "none":
                raise SMTPReply(503, "5.5.1", "Error: authentication not enabled")
            raise SMTPReply(530, "5.7.0", "Must issue a STARTTLS command first")
        if self._f.auth_limiter.blocked(self._client):
            self._sasl.refused("blocked")
            self._refuse(421, "4.7.0", f"{self._f.hostname} Error: too many authentication failures")
            return None
        if self._need_helo or not self._session.helo:
            self._sasl.refused("sequence")
            raise SMTPReply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._session.user is not None:
            self._sasl.refused("sequence")
            raise SMTPReply(503, "5.5.1", "Error: already authenticated")
        if self._tx is not None:
            self._sasl.refused("sequence")
            raise SMTPReply(503, "5.5.1", "Error: MAIL transaction in progress")
        return self._sasl.start(arg)

    # -- SASLHost (what the AUTH exchange may do to the session) ---------------

    @property
    def closing(self) -> bool:
        return self._mode == CLOSING

    def authenticated(self, user: str, senders: UserSenders | None) -> None:
        assert self._session is not None
        self._session.user = user
        self._user_senders = senders

    # -- mail transaction --------------------------------------------------------

    def do_MAIL(self, arg: bytes) -> None:
        if self._need_helo:
            raise SMTPReply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._tx is not None:
            raise SMTPReply(503, "5.5.1", "Error: nested MAIL command")
        if self._listener.auth == "required" and (
            self._session is None or self._session.user is None
        ):
            raise SMTPReply(530, "5.7.0", "Authentication required")
        limit = self._listener.limits.max_messages_per_session
        if limit is not None and self._messages >= limit:
            self._refuse(421, "4.7.0", f"{self._f.hostname} Error: too many messages in one session")
            return
        mail = parse_mail(arg, self._listener.max_message_size)
        self._f.sink.check_capacity()
        self._policy.check_sender(mail.sender, self._permitted)
        if self._user_senders is not None:
            self._user_senders.check(mail.sender)
        self._f.limits.check_rates(self._session.user if self._session else None, self._client)
        self._tx = Transaction(mail)
        self.reply(250, "2.1.0", "Ok")

    def do_RCPT(self, arg: bytes) -> None:
        tx = self._tx
        if tx is None:
            raise SMTPReply(503, "5.5.1", "Error: need MAIL command")
        recipient, dsn = parse_rcpt(arg, tx.mail)
        self._rcpt = recipient
        if len(tx.recipients) >= self._listener.max_recipients:
            # Not counted as an error: Postfix lets a client overshoot the
            # limit (smtpd_recipient_overshoot_limit) and sends the rest later.
            self._rejected(452, "4.5.3", "Error: too many recipients")
            self.reply(452, "4.5.3", "Error: too many recipients")
            self._overshoot += 1
            if self._overshoot > RECIPIENT_OVERSHOOT_LIMIT:
                self._count_error()
            return
        routed = accept_recipient(self._f.sink, self._policy, self._session, tx.mail.sender,
                                  recipient, self._permitted)
        tx.add_recipient(recipient, dsn, routed)
        self.reply(250, "2.1.5", "Ok")

    def do_RSET(self, arg: bytes) -> None:
        self._reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def do_NOOP(self, arg: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_VRFY(self, arg: bytes) -> None:
        if not arg:
            raise SMTPReply(501, "5.5.4", "Syntax: VRFY address")
        self.reply(252, "2.0.0", "Cannot VRFY user; try RCPT to attempt delivery")

    def do_HELP(self, arg: bytes) -> None:
        self.reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT")

    def do_QUIT(self, arg: bytes) -> None:
        self._close(221, "2.0.0", "Bye")

    _COMMANDS: dict[bytes, Callable[[SMTPServerProtocol, bytes], object]] = {
        b"HELO": do_HELO,
        b"EHLO": do_EHLO,
        b"MAIL": do_MAIL,
        b"RCPT": do_RCPT,
        b"DATA": MessageIntake.do_DATA,
        b"RSET": do_RSET,
        b"NOOP": do_NOOP,
        b"VRFY": do_VRFY,
        b"HELP": do_HELP,
        b"QUIT": do_QUIT,
        b"BDAT": MessageIntake.do_BDAT,
        b"STARTTLS": do_STARTTLS,
        b"AUTH": do_AUTH,
    }

    def _rejected(self, code: int, enhanced: str | None, text: str) -> None:
        s = self._session
        self._rejects.reject(
            code, enhanced, text, stage=self._stage, client=self._client,
            sender=self._tx.mail.sender if self._tx is not None else None,
            recipient=self._rcpt, proto=s.protocol if s else "SMTP", helo=s.helo if s else "",
        )


