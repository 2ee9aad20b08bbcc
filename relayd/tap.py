"""twistd entry point: the one place where relayd's parts are wired together.

Postfix's master starts smtpd, cleanup, qmgr and the delivery agents; here
``makeService`` builds the same pipeline as Twisted services:
listeners (SMTPServerFactory) -> Cleanup -> Spool <- QueueManager -> couriers.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

import relayd
from relayd.cleanup import Cleanup
from relayd.config import DEFAULT_CONFIG_SOURCE, Config, load, load_default
from relayd.control import ControlFactory
from relayd.courier.maildir import MaildirCourier
from relayd.courier.smarthost import SmarthostCourier
from relayd.diskio import DiskWriter
from relayd.errors import ConfigError
from relayd.interfaces import IAuthBackend, ICourier
from relayd.metrics import Metrics
from relayd.qmgr import QueueManager
from relayd.queue.schedule import RetrySchedule
from relayd.queue.spool import Spool, control_socket_address, control_socket_path
from relayd.smtpd.authlimit import AuthFailureTracker
from relayd.smtpd.protocol import SMTPServerFactory
from relayd.smtpd.proxy import ProxyProtocolFactory
from relayd.tls import ClientTLS, ServerTLS, server_tls_files
from relayd.web import make_site

log = Logger(namespace="relayd")


def config_path(option: str | None) -> str | None:
    """``--config``, else ``$RELAYD_CONFIG``, else None (the embedded default).

    Never an implicit /etc path: the systemd units name theirs.
    """
    return option or os.environ.get("RELAYD_CONFIG") or None


def load_config(option: str | None) -> Config:
    path = config_path(option)
    return load(path) if path else load_default()


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


def check_files(config: Config) -> None:
    """Read what the config points at (TLS certificates, CA files) now, so a
    missing or broken file is a config error before anything listens."""
    for listener in config.listeners:
        server_tls(config, listener)
    for route in config.routes.values():
        if not route.smarthost or route.tls == "none":
            continue
        try:
            client = ClientTLS(route)
            for smarthost in route.smarthost:
                client.creator(smarthost.host, verify=route.tls != "opportunistic")
        except ConfigError as e:
            raise ConfigError(config.source, e.key, e.reason) from None
        except Exception as e:
            raise ConfigError(config.source, f"route.{route.name}.tls",
                              f"cannot set up TLS: {e}") from None


class Options(usage.Options):
    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None,
         "config file (default: $RELAYD_CONFIG, else the embedded try-it-now default)"],
    ]

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"])
            check_files(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def resolve_hostname(configured: str | None) -> str:
    """The banner and EHLO name: the configured one, else the FQDN."""
    if configured:
        return configured
    name = socket.getfqdn()
    if name in ("localhost", "localhost.localdomain") or "." not in name:
        fallback = socket.gethostname()
        log.warn("hostname: the FQDN is {fqdn!r}; using {name!r} (set server.hostname)",
                 fqdn=name, name=fallback)
        return fallback
    return name


#: Listen queue for TCP listeners without an explicit ``backlog=``.  Twisted's
#: default is 50: with a burst of clients (100 sessions from smtp-source)
#: SYNs were dropped and each drop cost a client a 1 s retransmit; Postfix
#: uses 100 and Linux caps the value at net.core.somaxconn anyway.
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``tcp:25`` -> ``tcp:25:backlog=1024`` (an explicit backlog is kept)."""
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6") or "backlog=" in description:
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


class ListenerService(Service):
    """One SMTP (or HTTP) endpoint, bound before privileges are dropped.

    Binding happens synchronously in ``privilegedStartService`` so that a
    port in use or a bad address stops the start with an error instead of
    leaving a half-running relay.
    """

    def __init__(self, name: str, description: str, factory: Any, reactor: Any) -> None:
        self.name = name
        self.description = description
        self._factory = factory
        self._reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        endpoint = serverFromString(self._reactor, with_backlog(self.description))
        outcome: list[Any] = []
        endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"{self.name}: {self.description} did not bind at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        address = self.port.getHost()
        log.info("{name} listening on {host}:{port}", name=self.name,
                 host=getattr(address, "host", "?"), port=getattr(address, "port", "?"))

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None

    @property
    def address(self) -> str | None:
        if self.port is None:
            return None
        a = self.port.getHost()
        return f"{getattr(a, 'host', '?')}:{getattr(a, 'port', '?')}"


class RelayService(MultiService):
    """The whole relay; children are started in the order they are added."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.hostname = resolve_hostname(config.server.hostname)
        self.started = reactor.seconds()
        self.draining = False
        self.disk = DiskWriter(reactor)
        self.spool = Spool(config.server.spool, reactor, self.disk)
        couriers: dict[str, ICourier] = {}
        self.smarthosts: list[SmarthostCourier] = []
        for name, route in config.routes.items():
            if route.maildir is not None:
                couriers[name] = MaildirCourier(route.maildir, self.disk, self.hostname)
            else:
                courier = SmarthostCourier(route, self.hostname, reactor)
                self.smarthosts.append(courier)
                couriers[name] = courier
        self.couriers = couriers
        self.qmgr = QueueManager(
            self.spool, couriers,
            RetrySchedule(config.queue.retry, config.queue.lifetime),
            reactor, self.metrics,
            {name: route.concurrency for name, route in config.routes.items()},
            hostname=self.hostname, bounce_from=config.server.bounce_from, jitter=0.1,
        )
        self.cleanup = Cleanup(
            self.spool, self.hostname, reactor,
            on_queued=self.qmgr.queued, queue_size=self.qmgr.__len__,
            max_hops=config.server.max_hops,
            max_messages=config.queue.max_messages,
            min_free_disk=config.queue.min_free_disk,
        )
        self.qmgr.setServiceParent(self)
        self.listeners: list[ListenerService] = []
        #: listener name -> its reloadable certificate (TLS listeners only).
        self.server_tls: dict[str, ServerTLS] = {}
        #: [auth.NAME] -> backend, one per name however many listeners use it.
        self.auth_backends: dict[str, IAuthBackend] = {}
        self.factories: dict[str, SMTPServerFactory] = {}
        for listener in config.listeners:
            tls = server_tls(config, listener)
            if tls is not None:
                self.server_tls[listener.name] = tls
                self._tls_loaded(tls)
            backend = None
            if listener.auth != "none" and listener.auth_backend is not None:
                backend = self.auth_backends.get(listener.auth_backend)
                if backend is None:
                    backend = make_auth_backend(config, listener.auth_backend, reactor)
                    self.auth_backends[listener.auth_backend] = backend
            # One failure tracker per listener, shared by its sessions: a
            # client cannot reset its count by reconnecting.
            limiter = AuthFailureTracker(reactor, listener.limits.auth_failures,
                                         listener.limits.auth_block)
            factory = SMTPServerFactory(
                listener, self.hostname, self.cleanup, reactor, self.metrics,
                tls=tls if listener.tls == "starttls" else None,
                auth_backend=backend, auth_limiter=limiter,
            )
            self.factories[listener.name] = factory
            listening: Any = factory
            if listener.tls == "implicit" and tls is not None:
                # TLS from the first byte; the endpoint string stays a plain
                # tcp:/systemd: one so the certificate can be reloaded.
                listening = TLSMemoryBIOFactory(tls, False, factory)
            if listener.proxy_protocol:
                # Outermost: the PROXY header comes before the TLS handshake
                # and before the greeting.
                listening = ProxyProtocolFactory(listening, listener.proxy_trusted, reactor,
                                                 name=listener.name)
            service = ListenerService(f"listener {listener.name}", listener.listen.description,
                                      listening, reactor)
            service.setServiceParent(self)
            self.listeners.append(service)
        self.control = ListenerService(
            "control", "", ControlFactory(self.qmgr, self.drain), reactor
        )
        self.control.setServiceParent(self)
        self.http: ListenerService | None = None
        if config.http.listen is not None:
            site = make_site(self.status, self.metrics, self.qmgr.update_metrics)
            self.http = ListenerService("http", config.http.listen.description, site, reactor)
            self.http.setServiceParent(self)

    def privilegedStartService(self) -> None:
        self.spool.prepare()
        self._lock = self.spool.lock()
        if self._lock is None:
            raise OSError(f"the spool {self.config.server.spool} is in use by another relayd")
        # Ours now (we hold the lock): a socket file left by a crash goes.
        try:
            os.unlink(control_socket_path(self.config.server.spool))
        except FileNotFoundError:
            pass
        self.control.description = (
            f"unix:{_escape(control_socket_address(self.config.server.spool))}:mode=600:lockfile=0"
        )
        self.disk.start()
        try:
            super().privilegedStartService()
        except BaseException:
            # Nothing was accepted yet; let the process exit instead of
            # waiting on the disk thread.
            self.disk.stop()
            raise

    def startService(self) -> None:
        for backend in self.auth_backends.values():
            backend.start()
        super().startService()
        self._previous_sighup: Any = None
        if self.server_tls:
            self._install_sighup()
        if self.config.source == DEFAULT_CONFIG_SOURCE:
            self._explain_default()

    # -- SIGHUP: certificates ----------------------------------------------

    def _install_sighup(self) -> None:
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        except ValueError:
            # Not the main thread (an embedding test): no signal handling.
            log.warn("SIGHUP handler not installed (not in the main thread)")

    def _sighup(self, signum: int, frame: Any) -> None:
        # Signal context: only hand the work to the reactor thread.
        self.reactor.callFromThread(self.reload_tls)

    def reload_tls(self) -> None:
        """Reread every listener's certificate: new sessions get the new
        one, sessions in progress keep theirs; a bad file keeps the old."""
        log.info("SIGHUP: reloading TLS certificates")
        for tls in self.server_tls.values():
            if tls.reload():
                self._tls_loaded(tls)

    def _tls_loaded(self, tls: ServerTLS) -> None:
        self.metrics.tls_certificate_expiry.labels(tls.name).set(tls.not_after)
        left = tls.not_after - self.reactor.seconds()
        if left < 0:
            log.error("listener {name}: the TLS certificate {path} has expired",
                      name=tls.name, path=tls.cert_path)
        elif left < 14 * 86400:
            log.warn("listener {name}: the TLS certificate {path} expires in {days} days",
                     name=tls.name, path=tls.cert_path, days=int(left // 86400))

    def stopService(self) -> Any:
        previous = getattr(self, "_previous_sighup", None)
        if previous is not None:
            try:
                signal.signal(signal.SIGHUP, previous)
            except ValueError:
                pass
            self._previous_sighup = None
        d = super().stopService()
        for courier in self.smarthosts:
            d.addBoth(lambda _, c=courier: c.stop())
        for backend in self.auth_backends.values():
            d.addBoth(lambda _, b=backend: b.stop())
        d.addBoth(lambda _: self.disk.stop())
        return d

    def _explain_default(self) -> None:
        outbox = [r.maildir for r in self.config.routes.values() if r.maildir]
        log.info(
            "relayd is running on its embedded default config (try-it-now, not production): "
            "SMTP on {smtp} for this machine only, spool in {spool}, mail delivered into "
            "{outbox}/new, status at http://{http}/status. "
            "Try: swaks --server {smtp_host} --port {smtp_port} --to someone@example.org",
            smtp=self.listeners[0].address, spool=os.path.abspath(self.config.server.spool),
            outbox=os.path.abspath(outbox[0]) if outbox else "-",
            http=self.http.address if self.http else "-",
            smtp_host=(self.listeners[0].address or "127.0.0.1:1025").rsplit(":", 1)[0],
            smtp_port=(self.listeners[0].address or "127.0.0.1:1025").rsplit(":", 1)[1],
        )

    def drain(self) -> Any:
        """Stop accepting mail (readiness goes 503, the SMTP listeners close)
        while queued mail keeps being delivered: for a load balancer to take
        this instance out before it is stopped or upgraded."""
        if self.draining:
            return None
        self.draining = True
        log.info("draining: no new SMTP connections; deliveries go on")
        stops = [svc.stopService() for svc in self.listeners if svc.running]
        return gatherResults([d for d in stops if d is not None], consumeErrors=True)

    def status(self) -> dict[str, Any]:
        """Everything /status shows."""
        routes = {}
        states = self.qmgr.route_status()
        for name, route in self.config.routes.items():
            destination = (f"maildir:{route.maildir}" if route.maildir
                           else ", ".join(f"{s.host}:{s.port}" for s in route.smarthost))
            routes[name] = {"destination": destination, **states.get(name, {})}
        return {
            "version": relayd.__version__,
            "draining": self.draining,
            "hostname": self.hostname,
            "uptime_seconds": self.reactor.seconds() - self.started,
            "listeners": [
                {
                    "name": cfg.name,
                    "listen": cfg.listen.description,
                    "address": svc.address,
                    "listening": svc.port is not None,
                    "route": cfg.route,
                }
                for cfg, svc in zip(self.config.listeners, self.listeners)
            ],
            "spool": {"path": self.config.server.spool, "writable": self.spool.writable()},
            "queue": self.qmgr.counts(),
            "queue_oldest_age_seconds": self.qmgr.oldest_age(),
            "routes": routes,
        }


def _escape(path: str) -> str:
    """Endpoint strings use ':' as a separator and '\\' as its escape."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def makeService(options: Options) -> RelayService:
    from twisted.internet import reactor

    return RelayService(options.config, reactor)


__all__ = ["Options", "makeService", "RelayService", "load_config"]
