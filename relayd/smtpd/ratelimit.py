"""Inbound message rates: ``limits.messages_per_user`` and ``messages_per_ip``.

A leaked application password must not drain the smarthost's sending quota,
and one runaway script must not crowd out everyone else.  A token bucket per
key (user name or client address) refills at ``count`` per ``per`` seconds
and holds at most ``count`` tokens; each accepted MAIL takes one, and an
empty bucket answers ``450 4.7.1`` (Postfix's
``smtpd_client_message_rate_limit`` answers the same way), so well-behaved
clients simply retry later.  Time comes from the injected clock; the table
of keys is bounded.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from relayd.config import Rate

__all__ = ["MessageRateLimiter"]


class MessageRateLimiter:
    """Token buckets keyed by user or client address."""

    def __init__(self, clock: IReactorTime, rate: Rate, max_keys: int = 100_000) -> None:
        self._clock = clock
        self.rate = rate
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> bool:
        """Spend one message for ``key``; False when its rate is used up."""
        now = self._clock.seconds()
        capacity = float(self.rate.count)
        tokens, last = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * capacity / self.rate.per)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed
