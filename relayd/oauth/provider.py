"""One route's access token: fetched before first use, refreshed before it
expires, one refresh at a time however many connections want it.

* Refresh when less than ``min(5 minutes, 20% of expires_in)`` remains
  (:func:`refresh_margin`): a one-hour token is renewed 5 minutes early, a
  10-second test token 2 seconds early — never fetched per use, never used
  after expiry.
* Token-endpoint trouble (network, 5xx, 429) backs off exponentially
  (1 s doubling to 5 minutes); callers in the meantime get the error at once
  (the courier defers the mail, it never bounces for this).
* ``invalid_grant`` / ``invalid_client`` need a human (a revoked consent, a
  rotated secret): they are kept as :attr:`TokenProvider.last_error` for the
  log and status page and retried only at the back-off ceiling.
* All time through the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

log = Logger(namespace="relayd.oauth")

#: Back-off after a failed refresh: first step and ceiling, seconds.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
#: Errors (RFC 6749 §5.2) that retrying will not fix.
PERMANENT_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})


def refresh_margin(expires_in: float) -> float:
    """How long before expiry a token is refreshed: min(5 min, 20%)."""
    return min(300.0, 0.2 * expires_in)


@attrs.frozen
class AccessToken:
    """A bearer token and when it stops being usable (clock seconds)."""

    token: str = attrs.field(repr=False)
    expires_at: float
    refresh_at: float


class OAuthError(Exception):
    """The token endpoint refused or failed; ``error`` is RFC 6749's code
    (``invalid_grant``...) or ``http_503``/``network`` for transport
    trouble.  The text never holds a secret or a token."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description

    @property
    def permanent(self) -> bool:
        return self.error in PERMANENT_ERRORS


class ITokenEndpoint(Interface):
    """Fetches a new access token with the route's grant (and stores a
    rotated refresh token before answering)."""

    def fetch() -> Deferred[tuple[str, float]]:
        """Fires with ``(access_token, expires_in)``; fails with
        :class:`OAuthError`."""


class TokenProvider:
    """The access token of one route.

    :param report: called with ``result`` ("success", "error",
        "invalid_grant"...) after every refresh (the route's metric).
    """

    def __init__(
        self,
        route: str,
        endpoint: ITokenEndpoint,
        clock: IReactorTime,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.route = route
        self._endpoint = endpoint
        self._clock = clock
        self._report = report
        self._token: AccessToken | None = None
        self._inflight: list[Deferred[AccessToken]] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.last_error: OAuthError | None = None

    # -- views (status page) ----------------------------------------------------

    @property
    def expires_at(self) -> float | None:
        return self._token.expires_at if self._token is not None else None

    @property
    def state(self) -> str:
        """"valid", "expired", "none" or "error: CODE" (never the token)."""
        if self.last_error is not None:
            return f"error: {self.last_error.error}"
        if self._token is None:
            return "none"
        return "valid" if self._clock.seconds() < self._token.expires_at else "expired"

    # -- use ------------------------------------------------------------------------

    def token(self) -> Deferred[AccessToken]:
        """A token with time left: the cached one, or one refresh shared by
        every caller asking meanwhile."""
        now = self._clock.seconds()
        current = self._token
        if current is not None and now < current.refresh_at:
            return defer.succeed(current)
        if self._inflight is not None:
            d: Deferred[AccessToken] = Deferred()
            self._inflight.append(d)
            return d
        if now < self._retry_at:
            if current is not None and now < current.expires_at:
                return defer.succeed(current)  # still valid: use it meanwhile
            assert self.last_error is not None
            return defer.fail(self.last_error)
        return self._refresh()

    def invalidate(self, token: AccessToken) -> None:
        """The server refused ``token`` (535): refresh before the next use."""
        if self._token == token:
            self._token = None

    def _refresh(self) -> Deferred[AccessToken]:
        waiters: list[Deferred[AccessToken]] = []
        self._inflight = waiters
        first: Deferred[AccessToken] = Deferred()
        waiters.append(first)
        started = self._clock.seconds()

        def done(answer: tuple[str, float]) -> None:
            access, expires_in = answer
            self._token = AccessToken(
                access, started + expires_in, started + expires_in - refresh_margin(expires_in)
            )
            self._failures = 0
            self._retry_at = 0.0
            self.last_error = None
            self._finish("success")
            for d in waiters:
                d.callback(self._token)

        def failed(failure: Failure) -> None:
            error = failure.value if isinstance(failure.value, OAuthError) else OAuthError(
                "network", failure.getErrorMessage()
            )
            self._failures += 1
            step = BACKOFF_MAX if error.permanent else min(
                BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
            self._retry_at = self._clock.seconds() + step
            self.last_error = error
            log.error("route {route}: OAuth token refresh failed: {error} (next try in {step}s)",
                      route=self.route, error=str(error), step=step)
            self._finish(error.error if error.permanent else "error")
            for d in waiters:
                d.errback(error)

        try:
            d = self._endpoint.fetch()
        except Exception as e:  # a bug in the endpoint: still one answer to all
            d = defer.fail(e)
        d.addCallbacks(done, failed)
        return first

    def _finish(self, result: str) -> None:
        self._inflight = None
        if self._report is not None:
            self._report(result)
