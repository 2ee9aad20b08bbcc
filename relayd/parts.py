"""The relay's parts built from a :class:`Config`: certificates, auth
backends, couriers, DKIM keys.

Shared by the start (:mod:`relayd.service`), a reload (:mod:`relayd.reload`)
and the checks of ``relayd check-config`` (:mod:`relayd.preflight`), so the
three build exactly the same things.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from relayd.config import Config, ListenerConfig, RouteConfig
from relayd.courier.maildir import MaildirCourier
from relayd.courier.smarthost import SmarthostCourier
from relayd.diskio import DiskWriter
from relayd.dkim.keys import KeyProblem, load_key
from relayd.dkim.signer import DomainKey, Signer
from relayd.errors import ConfigError
from relayd.interfaces import IAuthBackend, ICourier
from relayd.metrics import Metrics
from relayd.tls import ServerTLS, server_tls_files

log = Logger(namespace="relayd")


def server_tls(config: Config, listener: Any) -> ServerTLS | None:
    """The reloadable server certificate of a TLS listener (None without TLS).

    :raises ConfigError: naming the config file and key, when a certificate
        or key file cannot be used.
    """
    if listener.tls == "none":
        return None
    cert, key, cert_label, key_label = server_tls_files(config, listener)
    try:
        return ServerTLS(cert, key, listener.tls_min_version, cert_label=cert_label,
                         key_label=key_label, name=listener.name)
    except ConfigError as e:
        raise ConfigError(config.source, e.key, f"{e.source}: {e.reason}") from None


def make_auth_backend(config: Config, name: str, reactor: Any) -> IAuthBackend:
    """``[auth.NAME]`` as a backend; imported lazily so that relays without
    AUTH never import the backends (and ldap3)."""
    try:
        from relayd.auth import make_backend
    except ImportError as e:
        raise ConfigError(config.source, f"auth.{name}",
                          f"auth backends are not available: {e}") from None
    try:
        return make_backend(config.auth[name], reactor)
    except ConfigError as e:
        raise ConfigError(config.source, e.key, f"{e.source}: {e.reason}") from None


def auth_backends(config: Config, reactor: Any) -> dict[str, IAuthBackend]:
    """One backend per ``[auth.NAME]`` that a listener uses (not started)."""
    names = {x.auth_backend for x in config.listeners
             if x.auth != "none" and x.auth_backend is not None}
    return {name: make_auth_backend(config, name, reactor) for name in sorted(names)}


def backend_of(listener: ListenerConfig,
                backends: dict[str, IAuthBackend]) -> IAuthBackend | None:
    if listener.auth == "none" or listener.auth_backend is None:
        return None
    return backends[listener.auth_backend]


def make_courier(route: RouteConfig, disk: DiskWriter, hostname: str, reactor: Any,
                 metrics: Metrics | None = None) -> ICourier:
    if route.maildir is not None:
        return MaildirCourier(route.maildir, disk, hostname, clock=reactor)
    return SmarthostCourier(route, hostname, reactor, metrics=metrics)


def dkim_signer(config: Config, metrics: Metrics | None = None) -> Signer:
    """The ``[[dkim]]`` keys, read and checked now: a key that cannot sign
    is ``FILE: dkim[N].key_file: reason`` at start, reload and check-config."""
    keys = []
    for i, entry in enumerate(config.dkim):
        try:
            key = load_key(entry.key_file)
        except KeyProblem as e:
            raise ConfigError(config.source, f"dkim[{i}].key_file", str(e)) from None
        keys.append(DomainKey(entry.domain, entry.selector, key))
    count = None
    if metrics is not None:
        counter = metrics.dkim_signatures

        def count(domain: str, selector: str, result: str) -> None:
            counter.labels(domain, selector, result).inc()

    return Signer(keys, count, frozenset(x.name for x in config.listeners if not x.dkim))

