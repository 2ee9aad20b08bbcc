"""An in-memory token endpoint (``ITokenEndpoint``) for fast tests of the
token provider: each :meth:`FakeTokenEndpoint.fetch` waits until the test
answers it, so concurrency and failures are scripted exactly."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relayd.oauth.provider import ITokenEndpoint, OAuthError


@implementer(ITokenEndpoint)
class FakeTokenEndpoint:
    def __init__(self) -> None:
        self.pending: list[Deferred[tuple[str, float]]] = []
        self.fetches = 0

    def fetch(self) -> Deferred[tuple[str, float]]:
        self.fetches += 1
        d: Deferred[tuple[str, float]] = Deferred()
        self.pending.append(d)
        return d

    def grant(self, token: str, expires_in: float) -> None:
        """Answer the oldest outstanding fetch with a token."""
        self.pending.pop(0).callback((token, expires_in))

    def refuse(self, error: str, description: str = "") -> None:
        """Answer the oldest outstanding fetch with an OAuth error."""
        self.pending.pop(0).errback(OAuthError(error, description))
