"""Per-client limits of one listener: connections, AUTH failures, message rates.

What a listener counts about its clients lives here, once per listener and
shared by all its sessions (a client cannot reset a count by reconnecting),
apart from the SMTP state machine that asks it: ``admit`` at connect,
``release`` at disconnect, ``check_rates`` at MAIL.  A config reload changes
the limits in place and keeps the counts (a reload must not lift a
brute-force block).  Clients are counted by ``relayd.ipaddr.client_key``:
an IPv6 client by its /64, since one host holds a whole /64.  Postfix's anvil service plays this part there.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from relayd.config import Limits
from relayd.errors import SMTPReply
from relayd.ipaddr import client_key
from relayd.smtpd.authlimit import AuthFailureTracker
from relayd.smtpd.ratelimit import MessageRateLimiter

__all__ = ["ClientLimits"]


class ClientLimits:
    """The counters and limiters one listener keeps about its clients."""

    def __init__(
        self,
        clock: IReactorTime,
        limits: Limits,
        auth_limiter: AuthFailureTracker | None = None,
    ) -> None:
        self._clock = clock
        self.limits = limits
        self.connections = 0
        self.connections_per_ip: dict[str, int] = {}
        self.auth_limiter = auth_limiter or AuthFailureTracker(
            clock, limits.auth_failures, limits.auth_block
        )
        self.user_rate = (MessageRateLimiter(clock, limits.messages_per_user)
                          if limits.messages_per_user else None)
        self.ip_rate = (MessageRateLimiter(clock, limits.messages_per_ip)
                        if limits.messages_per_ip else None)

    def reconfigure(self, limits: Limits) -> None:
        """New limits, same counts; a rate window restarts only when its
        rate changed."""
        old, self.limits = self.limits, limits
        self.auth_limiter.failures = limits.auth_failures
        self.auth_limiter.block = limits.auth_block
        if limits.messages_per_user != old.messages_per_user:
            self.user_rate = (MessageRateLimiter(self._clock, limits.messages_per_user)
                              if limits.messages_per_user else None)
        if limits.messages_per_ip != old.messages_per_ip:
            self.ip_rate = (MessageRateLimiter(self._clock, limits.messages_per_ip)
                            if limits.messages_per_ip else None)

    def admit(self, host: str, limits: Limits, auth_offered: bool) -> str | None:
        """Count a new connection from ``host``; the reason to refuse it
        (answered ``421 4.7.0``), or None.  Every admitted or refused
        connection is counted and must be ``release``d once."""
        key = client_key(host)
        self.connections += 1
        self.connections_per_ip[key] = self.connections_per_ip.get(key, 0) + 1
        if limits.max_connections is not None and self.connections > limits.max_connections:
            return "too many connections"
        if (limits.max_connections_per_ip is not None
                and self.connections_per_ip[key] > limits.max_connections_per_ip):
            return f"too many connections from {host}"
        if auth_offered and self.auth_limiter.blocked(key):
            return "too many authentication failures"
        return None

    def release(self, host: str) -> None:
        """A connection counted by ``admit`` has ended."""
        key = client_key(host)
        self.connections -= 1
        left = self.connections_per_ip.get(key, 1) - 1
        if left:
            self.connections_per_ip[key] = left
        else:
            self.connections_per_ip.pop(key, None)

    def check_rates(self, user: str | None, host: str) -> None:
        """450 4.7.1 past ``messages_per_user`` / ``messages_per_ip``: asked
        last at MAIL, so only a MAIL that would be accepted spends a token."""
        if user is not None and self.user_rate is not None and not self.user_rate.take(user):
            raise SMTPReply(450, "4.7.1", f"Error: too much mail from user {user}")
        if self.ip_rate is not None and not self.ip_rate.take(client_key(host)):
            raise SMTPReply(450, "4.7.1", f"Error: too much mail from {host}")
