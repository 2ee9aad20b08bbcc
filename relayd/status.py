"""The status view: what ``GET /status`` (and the page at ``/``) shows.

A read-only snapshot of the running relay, built from the public state of
:class:`relayd.service.RelayService` (seen through :class:`StatusSource`), so
the HTTP layer and the service share one shape and neither owns the other.
"""

from __future__ import annotations

from typing import Any, Protocol

import relayd
from relayd.config import Config
from relayd.listeners import ListenerService
from relayd.qmgr import QueueManager
from relayd.queue.spool import Spool
from relayd.smtpd.factory import SMTPServerFactory


class StatusSource(Protocol):
    """The parts of the relay the status view reads."""

    config: Config
    reactor: Any
    hostname: str
    started: float
    draining: bool
    spool: Spool
    qmgr: QueueManager
    factories: dict[str, SMTPServerFactory]
    listeners: list[ListenerService]


def status_view(relay: StatusSource) -> dict[str, Any]:
    """Everything /status (and the page at /) shows."""
    routes = {}
    states = relay.qmgr.route_status()
    for name, route in relay.config.routes.items():
        destination = (f"maildir:{route.maildir}" if route.maildir
                       else ", ".join(f"{s.host}:{s.port}" for s in route.smarthost))
        routes[name] = {"destination": destination, "last_hour": relay.qmgr.last_hour(name),
                        **states.get(name, {})}
    listeners = []
    for cfg, svc in zip(relay.config.listeners, relay.listeners):
        factory = relay.factories.get(cfg.name)
        listeners.append({
            "name": cfg.name,
            "listen": cfg.listen.description,
            "address": svc.address,
            "listening": svc.port is not None,
            "route": cfg.route,
            "tls": cfg.tls,
            "require_tls": cfg.require_tls,
            "auth": cfg.auth,
            "auth_backend": cfg.auth_backend if cfg.auth != "none" else None,
            "connections": factory.connections if factory is not None else 0,
        })
    return {
        "version": relayd.__version__,
        "draining": relay.draining,
        "hostname": relay.hostname,
        "time": relay.reactor.seconds(),
        "uptime_seconds": relay.reactor.seconds() - relay.started,
        "listeners": listeners,
        "spool": {"path": relay.config.server.spool, "writable": relay.spool.writable()},
        "queue": relay.qmgr.counts(),
        "queue_oldest_age_seconds": relay.qmgr.oldest_age(),
        "routes": routes,
        "recent_deferrals": relay.qmgr.recent_deferrals(),
    }
