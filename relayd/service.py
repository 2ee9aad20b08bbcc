"""The running relay: one Twisted service holding every part.

Postfix's master starts smtpd, cleanup, qmgr and the delivery agents; here
:class:`RelayService` builds the same pipeline as Twisted services
(listeners -> Cleanup -> Spool <- QueueManager -> couriers), binds its ports
before privileges are dropped, reloads on SIGHUP (:mod:`relayd.reload`),
drains and stops gracefully.  The parts themselves are built in
:mod:`relayd.parts`, the reload plan lives in :mod:`relayd.reload` and the
status view in :mod:`relayd.status`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import gatherResults
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from relayd.cleanup import Cleanup
from relayd.config import (
    DEFAULT_CONFIG_SOURCE,
    Config,
    ListenerConfig,
    load,
    load_default,
    restart_only_changes,
)
from relayd.control import ControlFactory
from relayd.diskio import DiskWriter
from relayd.errors import ConfigError
from relayd.hostname import resolve_hostname
from relayd.interfaces import IAuthBackend
from relayd.listeners import ListenerService
from relayd.metrics import Metrics
from relayd.parts import (
    auth_backends,
    backend_of,
    dkim_signer,
    make_courier,
    server_tls,
)
from relayd.preflight import check_files
from relayd.qmgr import QueueManager
from relayd.queue.schedule import RetrySchedule
from relayd.queue.spool import Spool, control_socket_address, control_socket_path
from relayd.reload import ReloadPlan
from relayd.sdnotify import SystemdNotifier
from relayd.smtpd.authlimit import AuthFailureTracker
from relayd.smtpd.factory import SMTPServerFactory
from relayd.smtpd.proxy import ProxyProtocolFactory
from relayd.status import status_view
from relayd.tables import RoutingTables
from relayd.tls import ServerTLS
from relayd.web import make_site

log = Logger(namespace="relayd")


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
            config.concurrency(),
            hostname=self.hostname, bounce_from=config.server.bounce_from, jitter=0.1,
        )
        self.cleanup = Cleanup(
            self.spool, self.hostname, reactor,
            self.qmgr,
            max_hops=config.server.max_hops,
            max_messages=config.queue.max_messages,
            min_free_disk=config.queue.min_free_disk,
            signer=dkim_signer(config, self.metrics),
            tables=RoutingTables(config, reactor),
        )
        self.qmgr.setServiceParent(self)
        self.listeners: list[ListenerService] = []
        #: listener name -> its reloadable certificate (TLS listeners only).
        self.server_tls: dict[str, ServerTLS] = {}
        #: [auth.NAME] -> backend, one per name however many listeners use it.
        self.auth_backends: dict[str, IAuthBackend] = {}
        self.factories: dict[str, SMTPServerFactory] = {}
        self.auth_backends = auth_backends(config, reactor)
        for listener in config.listeners:
            tls = server_tls(config, listener)
            if tls is not None:
                self.server_tls[listener.name] = tls
                self.tls_loaded(tls)
            service = self.new_listener(config, listener, tls, self.auth_backends)
            assert service.smtp is not None
            self.factories[listener.name] = service.smtp
            service.setServiceParent(self)
            self.listeners.append(service)
        self.control = ListenerService(
            "control", "", ControlFactory(self.qmgr.state, self.drain, self.undrain), reactor,
            source=config.source, key="server.spool",
        )
        self.control.setServiceParent(self)
        self.http: ListenerService | None = None
        if config.http.listen is not None:
            site = make_site(self.status, self.metrics, self.qmgr.update_metrics)
            self.http = ListenerService("http", config.http.listen.description, site, reactor,
                                        source=config.source, key="http.listen")
            self.http.setServiceParent(self)
        # Last child: started once every listener above is bound (READY=1),
        # stopped first (STOPPING=1): MultiService stops children in reverse.
        self.notifier = SystemdNotifier(reactor, lambda: "accepting mail on " + ", ".join(
            s.address or "-" for s in self.listeners))
        self.notifier.setServiceParent(self)

    def new_listener(self, config: Config, listener: ListenerConfig, tls: ServerTLS | None,
                      backends: dict[str, IAuthBackend]) -> ListenerService:
        # One failure tracker per listener, shared by its sessions: a
        # client cannot reset its count by reconnecting.
        limiter = AuthFailureTracker(self.reactor, listener.limits.auth_failures,
                                     listener.limits.auth_block)
        factory = SMTPServerFactory(
            listener, self.hostname, self.cleanup, self.reactor, self.metrics,
            tls=tls if listener.tls == "starttls" else None,
            auth_backend=backend_of(listener, backends), auth_limiter=limiter,
        )
        return ListenerService(f"listener {listener.name}", listener.listen.description,
                               self.listening(listener, tls, factory), self.reactor,
                               smtp=factory, grace=config.server.stop_timeout,
                               source=config.source, key=f"listener[{listener.name}].listen")

    def listening(self, listener: ListenerConfig, tls: ServerTLS | None,
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
        """Take the spool and bind every port, or nothing: a failure is a
        :class:`ConfigError` naming the key (``server.spool``,
        ``listener[NAME].listen``, ``http.listen``) and whatever was bound
        before it is released, so a failed start leaves no port behind."""
        source, spool = self.config.source, self.config.server.spool
        try:
            self.spool.prepare()
            self._lock = self.spool.lock()
        except OSError as e:
            raise ConfigError(source, "server.spool",
                              f"cannot use {spool}: {e.strerror or e}") from None
        if self._lock is None:
            raise ConfigError(source, "server.spool", f"{spool} is in use by another relayd")
        # Ours now (we hold the lock): a socket file left by a crash goes.
        try:
            os.unlink(control_socket_path(spool))
        except FileNotFoundError:
            pass
        self.control.description = (
            f"unix:{_escape(control_socket_address(spool))}:mode=600:lockfile=0"
        )
        self.disk.start()
        try:
            super().privilegedStartService()
        except BaseException:
            # Nothing was accepted yet: release every port bound so far and
            # the spool, and let the process exit instead of waiting on the
            # disk thread.
            for child in self:
                if isinstance(child, ListenerService):
                    child.unbind()
            # The reactor never ran, so Twisted has not removed the socket
            # file yet; we hold the spool lock, so it is ours to remove.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_socket_path(spool))
            self.disk.stop()
            os.close(self._lock)
            self._lock = None
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
            self.warn_without_smarthost()

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
            plan = ReloadPlan.prepare(self, new)
        except ConfigError as e:
            log.error("reload refused, the running configuration stays: {error}", error=str(e))
            return False
        plan.commit()
        return True

    def tls_loaded(self, tls: ServerTLS) -> None:
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
            d.addBoth(lambda _, c=courier: c.stop())
        for backend in self.auth_backends.values():
            d.addBoth(lambda _, b=backend: b.stop())
        d.addBoth(lambda _: self.disk.stop())
        return d

    def warn_without_smarthost(self) -> None:
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

    def undrain(self) -> None:
        """``relayd drain --cancel``: listen again and turn readiness back on,
        without a restart.  A port that cannot be bound again (taken in the
        meantime) is an error for the caller and the relay stays draining."""
        if not self.draining:
            return
        for svc in self.listeners:
            svc.resume()
        self.draining = False
        log.info("drain cancelled: accepting mail again on {addresses}",
                 addresses=", ".join(s.address or "-" for s in self.listeners))

    def status(self) -> dict[str, Any]:
        """Everything /status (and the page at /) shows."""
        return status_view(self)


def _escape(path: str) -> str:
    """Endpoint strings use ':' as a separator and '\\' as its escape."""
    return path.replace("\\", "\\\\").replace(":", "\\:")
