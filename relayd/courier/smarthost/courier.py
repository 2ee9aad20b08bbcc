"""The smarthost courier: a route's mail to its smarthosts, in order
(failover), over cached connections.

It only wires the parts: :mod:`.pool` (which connection), :mod:`.session`
(opening one), :mod:`.transaction` (the message over it), :mod:`.rate`
(``max_rate``).  Failure classes (what qmgr sees): anything before or at
MAIL FROM — a refused connection, a 4xx *or* 5xx greeting/EHLO/STARTTLS/
AUTH/MAIL, TLS trouble, a timeout, a lost connection before the final reply —
is a ``TransientDeliveryError``: a 5xx there means our configuration (a
rotated password) or the smarthost is wrong, never the message.
Per-recipient answers become ``RecipientResult``\\ s.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd import tls
from relayd.config import RouteConfig, Smarthost
from relayd.content import Content, as_content
from relayd.courier.smarthost import transaction
from relayd.courier.smarthost.pool import ConnectionPool, SessionKey
from relayd.courier.smarthost.protocol import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    SessionError,
    SMTPClientProtocol,
    why,
)
from relayd.courier.smarthost.rate import TokenBucket
from relayd.courier.smarthost.session import SessionOpener
from relayd.envelope import DeliveryResult, Envelope
from relayd.errors import DeliveryError, TransientDeliveryError
from relayd.interfaces import ICourier
from relayd.metrics import Metrics

log = Logger(namespace="relayd.courier")


def session_key(route: RouteConfig) -> SessionKey:
    """The cache key of a route's sessions: its smarthosts, TLS policy and
    SASL identity."""
    return SessionKey(
        destination=tuple((s.host, s.port) for s in route.smarthost),
        tls=route.tls,
        tls_verify=route.tls_verify,
        ca_file=route.ca_file,
        tls_server_name=route.tls_server_name,
        client_cert=route.client_cert,
        sasl=getattr(route, "sasl", "auto"),
        username=route.username,
    )


@implementer(ICourier)
class SmarthostCourier:
    """Delivers a route's mail to its smarthosts, in order (failover).

    :param route: the ``[route.NAME]`` config; its TLS files are read here
        (``ConfigError`` if they cannot be used).
    :param hostname: our EHLO name (``server.hostname``).
    :param reactor: for connecting (``HostnameEndpoint``: TCP and a name
        resolver); may be None when ``endpoint_factory`` is given.
    :param clock: all timers; defaults to ``reactor``.
    :param endpoint_factory: ``Smarthost -> IStreamClientEndpoint``; tests
        connect in memory with it.  Default: ``HostnameEndpoint``.

    Call :meth:`stop` at shutdown: it closes the cached idle connections.
    """

    def __init__(
        self,
        route: RouteConfig,
        hostname: str,
        reactor: IReactorTCP | None,
        clock: IReactorTime | None = None,
        *,
        endpoint_factory: Callable[[Smarthost], IStreamClientEndpoint] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not route.smarthost:
            raise ValueError(f"route {route.name} has no smarthost")
        self.route = route
        self._reactor = reactor
        client_tls = self._client_tls(route)
        self._clock: IReactorTime = clock if clock is not None else IReactorTime(reactor)
        ehlo_name = hostname.encode("idna") if not hostname.isascii() else hostname.encode()
        self._sessions = SessionOpener(
            route, ehlo_name, client_tls, self._clock,
            endpoint_factory or self._endpoint, metrics,
        )
        self._bucket = TokenBucket(route.max_rate, self._clock) if route.max_rate else None
        self._options = transaction.Options(
            soft_bounce=route.soft_bounce,
            max_recipients_per_transaction=route.max_recipients_per_transaction,
            pace=self._bucket.take if self._bucket is not None else None,
        )
        self._key = session_key(route)
        self._pool = ConnectionPool(route.name, route.concurrency, self._clock)

    @staticmethod
    def _client_tls(route: RouteConfig) -> tls.ClientTLS | None:
        # Every context built now: a bad file or key fails start-up.
        client_tls = tls.route_client_tls(route)
        if route.tls in ("starttls", "implicit") and not route.tls_verify:
            log.warn(
                "route {route}: tls_verify = false: the smarthost's certificate is not "
                "checked; a man in the middle can read the mail and the password",
                route=route.name,
            )
        return client_tls

    # -- public --------------------------------------------------------------

    def deliver(  # type: ignore[override]
        self, queue_id: str, envelope: Envelope, content: Content | bytes
    ) -> Deferred[DeliveryResult]:
        return Deferred.fromCoroutine(self._deliver(queue_id, envelope, as_content(content)))

    def stop(self) -> Deferred[None]:
        """Close the idle connections (QUIT) and stop caching; fires when
        they are closed.  Deliveries in flight finish and then close."""
        return self._pool.stop()

    @property
    def connections(self) -> int:
        """Connections open or being opened (for status pages and tests)."""
        return self._pool.connections

    @property
    def idle_connections(self) -> int:
        return self._pool.idle_connections

    # -- connections ---------------------------------------------------------

    def _endpoint(self, smarthost: Smarthost) -> IStreamClientEndpoint:
        return HostnameEndpoint(
            self._reactor, smarthost.host, smarthost.port, timeout=CONNECT_TIMEOUT
        )

    async def _connection(self, queue_id: str) -> SMTPClientProtocol:
        pool = self._pool
        while True:
            cached = await pool.acquire(self._key)
            if cached is None:
                break
            cached.uses += 1
            try:
                reply = await cached.command(b"RSET\r\n", COMMAND_TIMEOUT, "sending RSET")
            except SessionError as e:
                log.debug("{queue_id}: cached connection unusable: {why}",
                          queue_id=queue_id, why=str(e))
                reply = None
            if reply is not None and 200 <= reply.code < 300:
                return cached
            # Dead or confused: open a fresh one in its place, or, if its
            # slot went already (it was lost), ask for another.
            replaced = pool.replace(cached)
            cached.abort()
            if replaced:
                break
        # We hold a slot until a connection is up or all failed.
        errors: list[str] = []
        for smarthost in self.route.smarthost:
            try:
                opened = await self._sessions.open(smarthost)
            except SessionError as e:
                errors.append(str(e))
                log.info("{queue_id}: {error}", queue_id=queue_id, error=str(e))
                continue
            except BaseException:
                pool.give_back()
                raise
            pool.add(opened, self._key)
            opened.uses = 1
            return opened
        pool.give_back()
        raise TransientDeliveryError("; ".join(errors))

    # -- delivery ----------------------------------------------------------------

    async def _deliver(
        self, queue_id: str, envelope: Envelope, content: Content
    ) -> DeliveryResult:
        try:
            try:
                message = transaction.Message(envelope, content)
            except OSError as e:
                raise TransientDeliveryError(f"cannot read the queued message: {why(e)}") from e
            if self._bucket is not None:
                await self._bucket.take()
            conn = await self._connection(queue_id)
        except DeliveryError:
            raise
        except Exception as e:
            log.failure("{queue_id}: internal error", Failure(), queue_id=queue_id)
            raise TransientDeliveryError(f"internal error: {why(e)}") from e
        reusable = False
        try:
            result = await transaction.run(conn, envelope, message, self._options)
            reusable = not conn.closing and not conn.lost and conn.error is None
        except SessionError as e:
            log.info("{queue_id}: {error}", queue_id=queue_id, error=str(e))
            raise TransientDeliveryError(str(e)) from None
        except DeliveryError:
            raise
        except Exception as e:
            log.failure("{queue_id}: internal error", Failure(), queue_id=queue_id)
            raise TransientDeliveryError(f"internal error: {why(e)}") from e
        finally:
            self._pool.release(conn, reusable)
        return result

