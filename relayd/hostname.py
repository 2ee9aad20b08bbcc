"""The name relayd calls itself: banner, EHLO, Received:, DSN Reporting-MTA.

One resolver for the daemon and the offline ``relayd queue bounce``, so a
DSN names the same host whichever of the two wrote it.
"""

from __future__ import annotations

import socket

from twisted.logger import Logger

log = Logger(namespace="relayd.hostname")


def resolve_hostname(configured: str | None) -> str:
    """The configured ``[server] hostname``, else the FQDN (``gethostname()``
    with a warning when the FQDN is ``localhost`` or has no dot)."""
    if configured:
        return configured
    name = socket.getfqdn()
    if name in ("localhost", "localhost.localdomain") or "." not in name:
        fallback = socket.gethostname()
        log.warn("hostname: the FQDN is {fqdn!r}; using {name!r} (set server.hostname)",
                 fqdn=name, name=fallback)
        return fallback
    return name
