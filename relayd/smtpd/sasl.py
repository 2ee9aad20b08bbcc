"""SMTP AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN: the server's SASL exchange.

Apart from the SMTP state machine because it is a state machine of its own
(challenges, continuation lines, a backend lookup with a deadline, a delayed
535), and because the state machine must not care which mechanisms exist.
The session hands ``AUTH`` to ``SASLServer.start`` and, while ``active``,
every line to ``SASLServer.line``; it learns the outcome only through the
narrow ``SASLHost`` it is: replies, the user it now acts for, and a
Deferred to wait on.

Never CRAM-MD5 or another challenge mechanism: they need the plaintext
password on our side, and AUTH is offered only under TLS (design invariant
3).  A failed AUTH is answered late and counted per client (brute-force
slowing; input stays held meanwhile, so a pipelining client gains nothing),
and a backend that does not answer gets 454, never 535.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.errors import SMTPReply
from relayd.smtpd.policy import UserSenders

if TYPE_CHECKING:
    from relayd.smtpd.factory import SMTPServerFactory

__all__ = ["AUTH_BACKEND_TIMEOUT", "AUTH_FAILURE_DELAY", "SASLHost", "SASLServer"]

log = Logger(namespace="relayd.smtpd")

#: A failed AUTH is answered this many seconds late (brute-force slowing;
#: input stays held meanwhile, so a pipelining client gains nothing).
AUTH_FAILURE_DELAY = 1.0
#: A backend that has not answered by then gets 454 (never 535).
AUTH_BACKEND_TIMEOUT = 30.0

#: RFC 4954 §4: the LOGIN prompts, base64 of "Username:" and "Password:".
_LOGIN_USERNAME = "VXNlcm5hbWU6"
_LOGIN_PASSWORD = "UGFzc3dvcmQ6"


class SASLHost(Protocol):
    """What the exchange needs from the SMTP session it runs in."""

    @property
    def closing(self) -> bool: ...

    def authenticated(self, user: str, senders: UserSenders | None) -> None: ...

    def reply(self, code: int, enhanced: str | None, text: str) -> None: ...

    def error_reply(self, code: int, enhanced: str, text: str) -> None: ...

    def wait(self, d: Deferred[Any]) -> None: ...


def _b64(text: bytes) -> bytes:
    """Decode an AUTH response; ``=`` is the empty response (RFC 4954 §4)."""
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SMTPReply(501, "5.5.2", "Cannot decode response") from None


class SASLServer:
    """One session's AUTH exchanges: the step awaiting the client's next
    line, and the delayed answer to a failure."""

    def __init__(self, host: SASLHost, factory: SMTPServerFactory, listener: str) -> None:
        self._host = host
        self._f = factory
        self._listener = listener
        #: The client's address, once connected (log lines, the failure count).
        self.client = ""
        self._step: Callable[[bytes], object] | None = None
        self._delay: IDelayedCall | None = None

    @property
    def active(self) -> bool:
        """Is a 334 challenge waiting for the client's answer?"""
        return self._step is not None

    def stop(self) -> None:
        """Forget any exchange in progress (STARTTLS, connection lost)."""
        self._step = None
        if self._delay is not None and self._delay.active():
            self._delay.cancel()
        self._delay = None

    def refused(self, reason: str) -> None:
        """Count an AUTH that did not authenticate (relayd.metrics.AUTH_FAILURE_REASONS)."""
        self._f.metrics.auth_failures.labels(self._listener, reason).inc()

    def start(self, arg: bytes) -> Deferred[None] | None:
        """The AUTH command's ``mechanism [initial-response]``, once the
        session has checked that AUTH is allowed now."""
        mechanism, _, initial = arg.partition(b" ")
        initial = initial.strip(b" ")
        if not mechanism or b" " in initial:
            self.refused("malformed")
            raise SMTPReply(501, "5.5.4", "Syntax: AUTH mechanism")
        mechanism = mechanism.upper()
        if mechanism == b"PLAIN":
            if initial:
                return self._initial_response(self._plain, initial)
            self._step = self._plain
            self._host.reply(334, None, "")
            return None
        if mechanism == b"LOGIN":
            if initial:
                self._initial_response(self._login_username, initial)
                return None
            self._step = self._login_username
            self._host.reply(334, None, _LOGIN_USERNAME)
            return None
        self.refused("mechanism")
        raise SMTPReply(504, "5.5.4", "Unsupported authentication mechanism")

    def too_long(self) -> None:
        """The client's answer to a challenge was longer than any line may be."""
        self._step = None
        self.refused("malformed")
        self._host.error_reply(500, "5.5.6", "Authentication exchange line is too long")

    def line(self, line: bytes) -> None:
        """The client's answer to a 334 challenge."""
        step, self._step = self._step, None
        assert step is not None
        if line.strip(b" ") == b"*":
            self.refused("aborted")
            self._host.error_reply(501, "5.7.0", "Authentication aborted")
            return
        try:
            result = step(line.strip(b" "))
        except SMTPReply as e:
            self.refused("malformed")
            self._host.error_reply(e.code, e.enhanced, e.text)
            return
        if isinstance(result, Deferred):
            self._host.wait(result)

    def _initial_response(self, step: Callable[[bytes], Any], response: bytes) -> Any:
        """``step(response)``, counting an undecodable response (501)."""
        try:
            return step(response)
        except SMTPReply:
            self.refused("malformed")
            raise

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
            return self._failed(authcid, "PLAIN", "authorization identity differs")
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

        self._step = password_step
        self._host.reply(334, None, _LOGIN_PASSWORD)

    def _authenticate(self, mechanism: str, username: str, password: str) -> Deferred[None]:
        if not username or not password:
            # Never ask a backend about an empty password: an LDAP server
            # takes it as an unauthenticated bind and says yes.
            return self._failed(username, mechanism, "empty user name or password")
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

        # Deferred.addTimeout cancels the lookup; a backend that answers
        # later is ignored (the client already has its 454).
        d = lookup().addTimeout(self._f.auth_timeout, self._f.clock)
        result: Deferred[None] = Deferred()
        name = self._listener

        def succeeded(answer: tuple[str, Any]) -> None:
            user, patterns = answer
            if self._host.closing:
                result.callback(None)
                return
            user = str(user)
            self._host.authenticated(user, UserSenders.from_patterns(user, patterns))
            self._f.metrics.auth_attempts.labels(name, "success").inc()
            log.info("AUTH {mechanism} from [{client}]: user={user}", mechanism=mechanism,
                     client=self.client, user=user)
            self._host.reply(235, "2.7.0", "Authentication successful")
            result.callback(None)

        def failed(failure: Failure) -> None:
            if failure.check(UnauthorizedLogin):
                self._failed(username, mechanism, "wrong credentials").chainDeferred(result)
                return
            self._f.metrics.auth_attempts.labels(name, "error").inc()
            timeout = failure.check(defer.TimeoutError)
            self.refused("backend_timeout" if timeout else "backend_error")
            if timeout:
                log.error("AUTH {mechanism} from [{client}]: the auth backend did not answer "
                          "within {timeout}s", mechanism=mechanism, client=self.client,
                          timeout=self._f.auth_timeout)
            else:
                log.failure("AUTH {mechanism} from [{client}]: auth backend error", failure,
                            mechanism=mechanism, client=self.client)
            result.errback(SMTPReply(454, "4.7.0", "Temporary authentication failure"))

        d.addCallbacks(succeeded, failed)
        return result

    def _failed(self, username: str, mechanism: str, why: str) -> Deferred[None]:
        """Count the failure now, answer 535 after the delay."""
        host = self.client
        name = self._listener
        self._f.metrics.auth_attempts.labels(name, "failure").inc()
        self.refused("bad_credentials")
        log.info("AUTH {mechanism} from [{client}] failed: {why} (user={user!r})",
                 mechanism=mechanism, client=host, why=why, user=username[:64])
        limiter = self._f.auth_limiter
        if limiter.failure(host):
            self._f.metrics.auth_blocked.labels(name).inc()
            log.warn("[{client}] blocked on listener {listener} for {block}s after too many "
                     "authentication failures", client=host, listener=name, block=limiter.block)
        d: Deferred[None] = Deferred()

        def answer() -> None:
            self._delay = None
            d.errback(SMTPReply(535, "5.7.8", "Error: authentication failed"))

        if self._f.auth_failure_delay > 0:
            self._delay = self._f.clock.callLater(self._f.auth_failure_delay, answer)
        else:
            answer()
        return d
