"""A route's ``max_rate`` (e.g. ``"14/s"`` for SES): a token bucket on the
injected clock, apart from the protocol so it is tested with ``task.Clock``
alone."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relayd.config import Rate


class TokenBucket:
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
        """Fires when the caller may start one transaction."""
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._per_second)
        self._last = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._clock.callLater(-self._tokens / self._per_second, d.callback, None)
        return d
