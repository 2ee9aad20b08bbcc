"""Brute-force slowing for SMTP AUTH: failures counted per client IP.

After ``limits.auth_failures`` (N failures within a window) from one client
address, that address is refused for ``limits.auth_block`` seconds: new
connections get 421 at once, a session in progress gets 421 at its next
AUTH.  One tracker per listener, shared by all its sessions, so a client
cannot reset the count by reconnecting.  Time comes from the injected clock.

Memory is bounded: stale entries are swept as new failures arrive, and
beyond ``max_clients`` tracked addresses the oldest are forgotten (an
attacker with that many addresses is not stopped by a per-IP limit anyway).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime

from relayd.config import Rate
from relayd.ipaddr import client_key

__all__ = ["AuthFailureTracker"]


class AuthFailureTracker:
    """Failure timestamps per client address, and the addresses blocked now."""

    def __init__(
        self, clock: IReactorTime, failures: Rate, block: float, max_clients: int = 100_000
    ) -> None:
        self._clock = clock
        self.failures = failures
        self.block = block
        self._max_clients = max_clients
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: dict[str, float] = {}

    def blocked(self, host: str) -> bool:
        """Is ``host`` (its /64 for IPv6) refused now?"""
        host = client_key(host)
        until = self._blocked.get(host)
        if until is None:
            return False
        if self._clock.seconds() < until:
            return True
        del self._blocked[host]
        return False

    def failure(self, host: str) -> bool:
        """Count one failed AUTH from ``host``; True when this failure
        starts a block.  IPv6 clients count per /64 (``client_key``)."""
        host = client_key(host)
        now = self._clock.seconds()
        window = self._recent.pop(host, None)
        if window is None:
            window = deque()
        window.append(now)
        horizon = now - self.failures.per
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) >= self.failures.count:
            self._blocked[host] = now + self.block
            self._sweep(now)
            return True
        self._recent[host] = window  # most recently failed last
        self._sweep(now)
        return False

    def _sweep(self, now: float) -> None:
        horizon = now - self.failures.per
        while self._recent:
            host, window = next(iter(self._recent.items()))
            if len(self._recent) > self._max_clients or not window or window[-1] <= horizon:
                self._recent.popitem(last=False)
            else:
                break
        if len(self._blocked) > self._max_clients:
            for host in [h for h, until in self._blocked.items() if until <= now]:
                del self._blocked[host]
