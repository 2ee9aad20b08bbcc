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
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

import relayd
from relayd.cleanup import Cleanup
from relayd.config import (
    DEFAULT_CONFIG_SOURCE,
    Config,
    ListenerConfig,
    RouteConfig,
    load,
    load_default,
    restart_only_changes,
)
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
from relayd.sdnotify import SystemdNotifier
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


def _auth_backends(config: Config, reactor: Any) -> dict[str, IAuthBackend]:
    """One backend per ``[auth.NAME]`` that a listener uses (not started)."""
    names = {x.auth_backend for x in config.listeners
             if x.auth != "none" and x.auth_backend is not None}
    return {name: make_auth_backend(config, name, reactor) for name in sorted(names)}


def _backend_of(listener: ListenerConfig,
                backends: dict[str, IAuthBackend]) -> IAuthBackend | None:
    if listener.auth == "none" or listener.auth_backend is None:
        return None
    return backends[listener.auth_backend]


def make_courier(route: RouteConfig, disk: DiskWriter, hostname: str, reactor: Any,
                 metrics: Metrics | None = None) -> ICourier:
    if route.maildir is not None:
        return MaildirCourier(route.maildir, disk, hostname)
    return SmarthostCourier(route, hostname, reactor, metrics=metrics)


def stop_courier(courier: ICourier) -> Any:
    """Close a smarthost courier's cached connections (its deliveries in
    flight finish first); a maildir courier holds nothing open."""
    if isinstance(courier, SmarthostCourier):
        return courier.stop()
    return None


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


class SwitchFactory(ServerFactory):
    """What a listening port hands its connections to, replaceable while the
    port stays bound: a reload that turns implicit TLS or the PROXY protocol
    on or off swaps the factory chain without closing the socket."""

    noisy = False

    def __init__(self, target: Any) -> None:
        self.target = target

    def buildProtocol(self, addr: Any) -> Any:
        return self.target.buildProtocol(addr)

    def logPrefix(self) -> str:
        target = self.target
        prefix = getattr(target, "logPrefix", None)
        return prefix() if callable(prefix) else type(target).__name__


class ListenerService(Service):
    """One SMTP (or HTTP) endpoint, bound before privileges are dropped.

    Binding happens synchronously in ``privilegedStartService`` so that a
    port in use or a bad address stops the start with an error instead of
    leaving a half-running relay.

    :param smtp: the SMTP factory behind the port, whose sessions a stop
        lets finish their transactions (within ``grace`` seconds).
    """

    def __init__(self, name: str, description: str, factory: Any, reactor: Any,
                 smtp: SMTPServerFactory | None = None, grace: float = 30.0) -> None:
        self.name = name
        self.description = description
        self._factory = SwitchFactory(factory)
        self._reactor = reactor
        self.smtp = smtp
        self.grace = grace
        self.port: Any = None

    def switch(self, factory: Any) -> None:
        """New connections go to ``factory`` from now on."""
        self._factory.target = factory

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
        """Close the port at once; SMTP sessions get to finish their
        transactions (``SMTPServerFactory.shutdown``)."""
        super().stopService()
        port, self.port = self.port, None
        waits = []
        if port is not None:
            waits.append(port.stopListening())
        if self.smtp is not None:
            waits.append(self.smtp.shutdown(self.grace))
        waits = [d for d in waits if d is not None]
        if not waits:
            return None
        return gatherResults(waits, consumeErrors=True)

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
        self.metrics.watch_spool(config.server.spool)
        couriers = {name: make_courier(route, self.disk, self.hostname, reactor, self.metrics)
                    for name, route in config.routes.items()}
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
        self.auth_backends = _auth_backends(config, reactor)
        for listener in config.listeners:
            tls = server_tls(config, listener)
            if tls is not None:
                self.server_tls[listener.name] = tls
                self._tls_loaded(tls)
            service = self._new_listener(config, listener, tls, self.auth_backends)
            assert service.smtp is not None
            self.factories[listener.name] = service.smtp
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
        # Last child: started once every listener above is bound (READY=1),
        # stopped first (STOPPING=1): MultiService stops children in reverse.
        self.notifier = SystemdNotifier(reactor, lambda: "accepting mail on " + ", ".join(
            s.address or "-" for s in self.listeners))
        self.notifier.setServiceParent(self)

    def _new_listener(self, config: Config, listener: ListenerConfig, tls: ServerTLS | None,
                      backends: dict[str, IAuthBackend]) -> ListenerService:
        # One failure tracker per listener, shared by its sessions: a
        # client cannot reset its count by reconnecting.
        limiter = AuthFailureTracker(self.reactor, listener.limits.auth_failures,
                                     listener.limits.auth_block)
        factory = SMTPServerFactory(
            listener, self.hostname, self.cleanup, self.reactor, self.metrics,
            tls=tls if listener.tls == "starttls" else None,
            auth_backend=_backend_of(listener, backends), auth_limiter=limiter,
        )
        return ListenerService(f"listener {listener.name}", listener.listen.description,
                               self._listening(listener, tls, factory), self.reactor,
                               smtp=factory, grace=config.server.stop_timeout)

    def _listening(self, listener: ListenerConfig, tls: ServerTLS | None,
                   factory: SMTPServerFactory) -> Any:
        """The factory chain a listener's port hands connections to."""
        listening: Any = factory
        if listener.tls == "implicit" and tls is not None:
            # TLS from the first byte; the endpoint string stays a plain
            # tcp:/systemd: one so the certificate can be reloaded.
            listening = TLSMemoryBIOFactory(tls, False, factory)
        if listener.proxy_protocol:
            # Outermost: the PROXY header comes before the TLS handshake
            # and before the greeting.
            listening = ProxyProtocolFactory(listening, listener.proxy_trusted, self.reactor,
                                             name=listener.name)
        return listening

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
        self._install_sighup()
        if self.config.source == DEFAULT_CONFIG_SOURCE:
            self._explain_default()
        else:
            self._warn_without_smarthost()

    # -- SIGHUP: reload ------------------------------------------------------

    def _install_sighup(self) -> None:
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        except ValueError:
            # Not the main thread (an embedding test): no signal handling.
            log.warn("SIGHUP handler not installed (not in the main thread)")

    def _sighup(self, signum: int, frame: Any) -> None:
        # Signal context: only hand the work to the reactor thread.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Reread the config file, certificates and auth files, and apply
        what can change live (design.md §1): listeners and their policy,
        [tls], [auth.*], routes.  Anything wrong, or a change that needs a
        restart, refuses the whole reload and the running config stays.

        :return: whether the new config is in force.
        """
        # systemd (Type=notify) shows "reloading" until READY=1 comes back,
        # whether the reload went through or was refused.
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready()

    def _reload(self) -> bool:
        source = self.config.source
        log.info("SIGHUP: reloading {source}", source=source)
        try:
            new = load_default() if source == DEFAULT_CONFIG_SOURCE else load(source)
            check_files(new)
        except ConfigError as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            return False
        restart = restart_only_changes(self.config, new)
        if restart:
            log.error("reload refused, the running configuration stays: {keys} cannot change "
                      "without a restart (systemctl restart)", keys=", ".join(restart))
            return False
        try:
            plan = _ReloadPlan.prepare(self, new)
        except ConfigError as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            return False
        plan.commit()
        return True

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
        for courier in self.couriers.values():
            d.addBoth(lambda _, c=courier: stop_courier(c))
        for backend in self.auth_backends.values():
            d.addBoth(lambda _, b=backend: b.stop())
        d.addBoth(lambda _: self.disk.stop())
        return d

    def _warn_without_smarthost(self) -> None:
        """The packaged config holds mail in a local maildir until someone
        names a smarthost: say so loudly, at every start and reload."""
        if any(route.smarthost for route in self.config.routes.values()):
            return
        held = ", ".join(sorted({r.maildir for r in self.config.routes.values() if r.maildir}))
        log.warn("NO SMARTHOST IS CONFIGURED: accepted mail is NOT sent on, it is held in "
                 "{held}. Set [route.NAME] smarthost = \"host:port\" in {source} and reload "
                 "(systemctl reload relayd).", held=held or "-", source=self.config.source)

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
        """Everything /status (and the page at /) shows."""
        routes = {}
        states = self.qmgr.route_status()
        for name, route in self.config.routes.items():
            destination = (f"maildir:{route.maildir}" if route.maildir
                           else ", ".join(f"{s.host}:{s.port}" for s in route.smarthost))
            routes[name] = {"destination": destination, "last_hour": self.qmgr.last_hour(name),
                            **states.get(name, {})}
        listeners = []
        for cfg, svc in zip(self.config.listeners, self.listeners):
            factory = self.factories.get(cfg.name)
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
            "draining": self.draining,
            "hostname": self.hostname,
            "time": self.reactor.seconds(),
            "uptime_seconds": self.reactor.seconds() - self.started,
            "listeners": listeners,
            "spool": {"path": self.config.server.spool, "writable": self.spool.writable()},
            "queue": self.qmgr.counts(),
            "queue_oldest_age_seconds": self.qmgr.oldest_age(),
            "routes": routes,
            "recent_deferrals": self.qmgr.recent_deferrals(),
        }


class _ReloadPlan:
    """A reload in two steps: ``prepare`` builds every new part (certificates,
    auth backends, couriers, newly bound ports) without touching the running
    relay, so that any failure leaves it exactly as it was; ``commit`` then
    swaps them in, which cannot fail halfway."""

    def __init__(self, relay: RelayService, new: Config) -> None:
        self.relay = relay
        self.new = new
        self.tls: dict[str, ServerTLS] = {}
        self.reloaded_tls: list[ServerTLS] = []
        self.backends: dict[str, IAuthBackend] = {}
        self.couriers: dict[str, ICourier] = {}
        self.kept: dict[str, ListenerService] = {}
        self.added: dict[str, ListenerService] = {}
        self.new_routes: list[str] = []

    @classmethod
    def prepare(cls, relay: RelayService, new: Config) -> _ReloadPlan:
        plan = cls(relay, new)
        try:
            plan._prepare()
        except BaseException:
            plan._discard()
            raise
        return plan

    def _prepare(self) -> None:
        relay, new, old = self.relay, self.new, self.relay.config
        for listener in new.listeners:
            current = relay.server_tls.get(listener.name)
            if (current is not None and listener.tls != "none"
                    and server_tls_files(new, listener)[:2] == (current.cert_path,
                                                                current.key_path)
                    and listener.tls_min_version == current.min_version):
                # Same files: reread them (a bad file keeps the old one).
                self.tls[listener.name] = current
                self.reloaded_tls.append(current)
            else:
                tls = server_tls(new, listener)
                if tls is not None:
                    self.tls[listener.name] = tls
        # Auth backends are always made anew: that rereads their files now,
        # and a file that has become unreadable refuses the reload.
        self.backends = _auth_backends(new, relay.reactor)
        for name, route in new.routes.items():
            if old.routes.get(name) == route and name in relay.couriers:
                self.couriers[name] = relay.couriers[name]
            else:
                self.couriers[name] = make_courier(route, relay.disk, relay.hostname,
                                                   relay.reactor, relay.metrics)
                self.new_routes.append(name)
        running = {svc.name: svc for svc in relay.listeners}
        for listener in new.listeners:
            svc = running.get(f"listener {listener.name}")
            if svc is not None and svc.description == listener.listen.description:
                self.kept[listener.name] = svc
        for listener in new.listeners:
            if listener.name in self.kept:
                continue
            # Bind now: a port that cannot be had refuses the reload.
            svc = relay._new_listener(new, listener, self.tls.get(listener.name), self.backends)
            try:
                svc.privilegedStartService()
            except Exception as e:
                raise ConfigError(new.source, f"listener.{listener.name}.listen",
                                  f"cannot listen on {listener.listen.description}: {e} "
                                  "(moving a listener onto a port in use, its own included, "
                                  "needs a restart)") from None
            self.added[listener.name] = svc

    def _discard(self) -> None:
        for svc in self.added.values():
            svc.stopService()
        for name in self.new_routes:
            stop_courier(self.couriers[name])

    def commit(self) -> None:
        relay, new, old = self.relay, self.new, self.relay.config
        for tls in self.reloaded_tls:
            if tls.reload():
                relay._tls_loaded(tls)
        for tls in self.tls.values():
            if tls not in self.reloaded_tls:
                relay._tls_loaded(tls)
        for name in set(relay.server_tls) - set(self.tls):
            relay.metrics.tls_certificate_expiry.remove(name)
        relay.server_tls = dict(self.tls)

        retired_backends = list(relay.auth_backends.values())
        relay.auth_backends = self.backends
        for backend in self.backends.values():
            backend.start()

        retired_couriers = [c for c in relay.couriers.values()
                            if c not in self.couriers.values()]
        relay.couriers = dict(self.couriers)
        relay.qmgr.set_routes(self.couriers,
                              {name: r.concurrency for name, r in new.routes.items()})
        for name in set(old.routes) - set(new.routes):
            log.warn("reload: route {route} removed; its queued messages are deferred until a "
                     "route of that name exists again", route=name)

        changed, removed = [], []
        kept = set(self.kept.values())
        for svc in list(relay.listeners):
            if svc in kept:
                continue
            # Before the new ones are added: a moved listener keeps its name.
            removed.append(str(svc.name).removeprefix("listener "))
            if svc.smtp is not None and relay.factories.get(svc.smtp.listener.name) is svc.smtp:
                del relay.factories[svc.smtp.listener.name]
            svc.disownServiceParent()
        listeners: list[ListenerService] = []
        for listener in new.listeners:
            service = self.kept.get(listener.name)
            if service is not None:
                factory = relay.factories[listener.name]
                cert = self.tls.get(listener.name)
                starttls = cert if listener.tls == "starttls" else None
                if factory.listener != listener or factory.tls is not starttls:
                    changed.append(listener.name)
                factory.reconfigure(listener, tls=starttls,
                                    auth_backend=_backend_of(listener, relay.auth_backends))
                service.switch(relay._listening(listener, cert, factory))
            else:
                service = self.added[listener.name]
                assert service.smtp is not None
                relay.factories[listener.name] = service.smtp
                service.setServiceParent(relay)
            listeners.append(service)
        relay.listeners = listeners
        relay.config = new
        # Old parts go once the new ones are in: deliveries in flight finish
        # on their courier first (SmarthostCourier.stop).
        for backend in retired_backends:
            backend.stop()
        for courier in retired_couriers:
            stop_courier(courier)
        log.info("reload done: {count} listeners ({added} added, {removed} removed, {changed} "
                 "changed), {routes} routes ({new_routes} new or changed)",
                 count=len(listeners), added=", ".join(self.added) or "none",
                 removed=", ".join(removed) or "none", changed=", ".join(changed) or "none",
                 routes=len(new.routes), new_routes=", ".join(self.new_routes) or "none")
        relay._warn_without_smarthost()


def _escape(path: str) -> str:
    """Endpoint strings use ':' as a separator and '\\' as its escape."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def makeService(options: Options) -> RelayService:
    from twisted.internet import reactor

    return RelayService(options.config, reactor)


__all__ = ["Options", "makeService", "RelayService", "load_config"]
