"""A reload (SIGHUP) in two steps, so a failure changes nothing.

:meth:`ReloadPlan.prepare` builds every new part (certificates, auth
backends, DKIM keys, couriers, newly bound ports) beside the running relay;
:meth:`ReloadPlan.commit` swaps them in.  The plan sees the relay only
through :class:`Relay`, the public face of :class:`relayd.service.RelayService`
that a reload needs, so the service's internals can change freely.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from twisted.application.service import IServiceCollection
from twisted.logger import Logger

from relayd.cleanup import Cleanup
from relayd.config import Config, ListenerConfig
from relayd.diskio import DiskWriter
from relayd.dkim.signer import Signer
from relayd.errors import ConfigError
from relayd.interfaces import IAuthBackend, ICourier
from relayd.listeners import ListenerService
from relayd.metrics import Metrics
from relayd.parts import auth_backends, backend_of, dkim_signer, make_courier, server_tls
from relayd.qmgr import QueueManager
from relayd.smtpd.factory import SMTPServerFactory
from relayd.tables import RoutingTables
from relayd.tls import ServerTLS, server_tls_files

log = Logger(namespace="relayd")


class Relay(Protocol):
    """What a reload reads and replaces in the running relay."""

    config: Config
    reactor: Any
    hostname: str
    disk: DiskWriter
    metrics: Metrics
    qmgr: QueueManager
    cleanup: Cleanup
    #: listener name -> its reloadable certificate (TLS listeners only).
    server_tls: dict[str, ServerTLS]
    auth_backends: dict[str, IAuthBackend]
    couriers: dict[str, ICourier]
    factories: dict[str, SMTPServerFactory]
    listeners: list[ListenerService]

    def new_listener(self, config: Config, listener: ListenerConfig, tls: ServerTLS | None,
                     backends: dict[str, IAuthBackend]) -> ListenerService: ...

    def listening(self, listener: ListenerConfig, tls: ServerTLS | None,
                  factory: SMTPServerFactory) -> Any: ...

    def tls_loaded(self, tls: ServerTLS) -> None: ...

    def warn_without_smarthost(self) -> None: ...


class ReloadPlan:
    """A reload in two steps: ``prepare`` builds every new part (certificates,
    auth backends, couriers, newly bound ports) without touching the running
    relay, so that any failure leaves it exactly as it was; ``commit`` then
    swaps them in, which cannot fail halfway."""

    def __init__(self, relay: Relay, new: Config) -> None:
        self.relay = relay
        self.new = new
        self.tls: dict[str, ServerTLS] = {}
        self.reloaded_tls: list[ServerTLS] = []
        self.backends: dict[str, IAuthBackend] = {}
        self.couriers: dict[str, ICourier] = {}
        self.kept: dict[str, ListenerService] = {}
        self.added: dict[str, ListenerService] = {}
        self.new_routes: list[str] = []
        self.signer: Signer | None = None
        self.tables: RoutingTables | None = None

    @classmethod
    def prepare(cls, relay: Relay, new: Config) -> ReloadPlan:
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
        # DKIM keys are reread: a key file that cannot sign refuses the reload.
        self.signer = dkim_signer(new, relay.metrics)
        # Auth backends are always made anew: that rereads their files now,
        # and a file that has become unreadable refuses the reload.
        self.backends = auth_backends(new, relay.reactor)
        # [[routing]], [aliases], [rewrite]: the files are read now; a bad
        # line refuses the reload and the running tables stay.
        self.tables = RoutingTables(new, relay.reactor)
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
            svc = relay.new_listener(new, listener, self.tls.get(listener.name), self.backends)
            try:
                svc.privilegedStartService()
            except ConfigError as e:
                raise ConfigError(e.source, e.key,
                                  f"{e.reason} (moving a listener onto a port in use, its own "
                                  "included, needs a restart)") from None
            self.added[listener.name] = svc

    def _discard(self) -> None:
        for svc in self.added.values():
            svc.stopService()
        for name in self.new_routes:
            self.couriers[name].stop()

    def commit(self) -> None:
        relay, new, old = self.relay, self.new, self.relay.config
        for tls in self.reloaded_tls:
            if tls.reload():
                relay.tls_loaded(tls)
        for tls in self.tls.values():
            if tls not in self.reloaded_tls:
                relay.tls_loaded(tls)
        for name in set(relay.server_tls) - set(self.tls):
            relay.metrics.tls_certificate_expiry.remove(name)
        relay.server_tls = dict(self.tls)

        assert self.signer is not None
        relay.cleanup.signer = self.signer

        retired_backends = list(relay.auth_backends.values())
        relay.auth_backends = self.backends
        for backend in self.backends.values():
            backend.start()

        relay.cleanup.tables = self.tables

        retired_couriers = [c for c in relay.couriers.values()
                            if c not in self.couriers.values()]
        relay.couriers = dict(self.couriers)
        relay.qmgr.set_routes(self.couriers,
                              new.concurrency())
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
                                    auth_backend=backend_of(listener, relay.auth_backends))
                service.switch(relay.listening(listener, cert, factory))
            else:
                service = self.added[listener.name]
                assert service.smtp is not None
                relay.factories[listener.name] = service.smtp
                service.setServiceParent(cast(IServiceCollection, relay))
            listeners.append(service)
        relay.listeners = listeners
        relay.config = new
        # Old parts go once the new ones are in: deliveries in flight finish
        # on their courier first (SmarthostCourier.stop).
        for backend in retired_backends:
            backend.stop()
        for courier in retired_couriers:
            courier.stop()
        log.info("reload done: {count} listeners ({added} added, {removed} removed, {changed} "
                 "changed), {routes} routes ({new_routes} new or changed)",
                 count=len(listeners), added=", ".join(self.added) or "none",
                 removed=", ".join(removed) or "none", changed=", ".join(changed) or "none",
                 routes=len(new.routes), new_routes=", ".join(self.new_routes) or "none")
        relay.warn_without_smarthost()
