"""One SMTP listener: its config, policy, limits, and its sessions as a whole.

A listener outlives its sessions: a reload (``reconfigure``) changes what new
sessions get while those in progress keep their rules, and a graceful stop
(``shutdown``) waits for open transactions.  Kept apart from the session
state machine (``relayd.smtpd.protocol``), which only reads from it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from relayd.config import ListenerConfig
from relayd.interfaces import IAuthBackend, ISubmissionSink
from relayd.metrics import Metrics
from relayd.smtpd.authlimit import AuthFailureTracker
from relayd.smtpd.limits import ClientLimits
from relayd.smtpd.policy import ListenerPolicy
from relayd.smtpd.protocol import SMTPServerProtocol
from relayd.smtpd.sasl import AUTH_BACKEND_TIMEOUT, AUTH_FAILURE_DELAY

__all__ = ["SMTPServerFactory"]

log = Logger(namespace="relayd.smtpd")


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
        self.tls = tls
        self.auth_backend = auth_backend
        self.limits = ClientLimits(clock, listener.limits, auth_limiter)
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
        self.listener = listener
        self.policy = ListenerPolicy.from_config(listener)
        self.tls = tls
        self.auth_backend = auth_backend
        self.limits.reconfigure(listener.limits)

    @property
    def auth_limiter(self) -> AuthFailureTracker:
        """The per-client AUTH failure tracker its sessions share."""
        return self.limits.auth_limiter

    @property
    def connections(self) -> int:
        """Sessions open now (status page, tests)."""
        return self.limits.connections

    @property
    def connections_per_ip(self) -> dict[str, int]:
        return self.limits.connections_per_ip

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

    def resume(self) -> None:
        """A drain was cancelled: new sessions are served again, sessions
        still finishing a transaction stay open, and whoever waits for the
        shutdown is told it is over (nothing is being shut down now)."""
        self.shutting_down = False
        timer, self._shutdown_timer = self._shutdown_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        done, self._shutdown_done = self._shutdown_done, None
        if done is not None:
            done.callback(None)

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
