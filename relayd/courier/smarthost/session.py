"""Opening a session with a smarthost: connect, greeting, EHLO, STARTTLS,
EHLO again, AUTH.

Everything that can go wrong here is about the connection or our own
configuration, never the message, so every failure is a
:class:`~relayd.courier.smarthost.protocol.SessionError` (the courier tries
the next smarthost, then defers).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)

from relayd import tls
from relayd.config import RouteConfig, Smarthost
from relayd.courier.smarthost.protocol import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    ProtocolFactory,
    SessionError,
    SMTPClientProtocol,
    extensions,
    why,
)
from relayd.courier.smarthost.sasl import authenticate
from relayd.metrics import Metrics

_CRLF = b"\r\n"


class SessionOpener:
    """Opens ready-to-use sessions for one route.

    :param ehlo_name: our EHLO name (IDNA-encoded when not ASCII).
    :param client_tls: the route's TLS contexts (None for ``tls = "none"``).
    :param endpoint_factory: ``Smarthost -> IStreamClientEndpoint``.
    """

    def __init__(
        self,
        route: RouteConfig,
        ehlo_name: bytes,
        client_tls: tls.ClientTLS | None,
        clock: IReactorTime,
        endpoint_factory: Callable[[Smarthost], IStreamClientEndpoint],
        metrics: Metrics | None = None,
    ) -> None:
        self.route = route
        self._ehlo_name = ehlo_name
        self._tls = client_tls
        self._clock = clock
        self._endpoint_factory = endpoint_factory
        self._metrics = metrics

    def _protocol(
        self, smarthost: Smarthost, implicit: IOpenSSLClientConnectionCreator | None
    ) -> SMTPClientProtocol:
        proto = SMTPClientProtocol(self._clock, smarthost, implicit)
        metrics = self._metrics
        if metrics is not None:
            counter = metrics.smarthost_tls_handshakes
            route = self.route.name
            proto.on_tls_result = lambda result: counter.labels(route, result).inc()
        return proto

    async def open(self, smarthost: Smarthost) -> SMTPClientProtocol:
        """A connection to ``smarthost`` that has said EHLO (and STARTTLS and
        AUTH as the route asks); :class:`SessionError` if not."""
        implicit = None
        if self.route.tls == "implicit":
            assert self._tls is not None
            implicit = self._tls.creator(smarthost.host)
        factory = ProtocolFactory(lambda: self._protocol(smarthost, implicit))
        where = (
            f"[{smarthost.host}]:{smarthost.port}"
            if ":" in smarthost.host
            else f"{smarthost.host}:{smarthost.port}"
        )
        d = self._endpoint_factory(smarthost).connect(factory)
        d.addTimeout(CONNECT_TIMEOUT, self._clock)
        try:
            proto: SMTPClientProtocol = await d  # type: ignore[assignment]
        except defer.TimeoutError:
            raise SessionError(f"connect to {where}: timed out") from None
        except Exception as e:
            raise SessionError(f"connect to {where}: {why(e)}") from None
        try:
            await self._setup(proto)
        except BaseException:
            proto.abort()
            raise
        return proto

    async def _setup(self, proto: SMTPClientProtocol) -> None:
        route = self.route
        assert proto.greeting is not None
        greeting = (await proto.greeting)[0]
        if greeting.code != 220:
            raise SessionError(f"host {proto.name} refused to talk to me: {greeting}")
        await self._ehlo(proto)
        if route.tls in ("starttls", "opportunistic") and not proto.tls_active:
            if "STARTTLS" in proto.extensions:
                assert self._tls is not None
                verify = route.tls == "starttls"
                reply = await proto.starttls(self._tls.creator(proto.smarthost.host, verify=verify))
                if reply.code == 220:
                    await self._ehlo(proto)
                elif route.tls == "starttls":
                    raise SessionError(
                        f"host {proto.name} said: {reply} (in reply to STARTTLS command)"
                    )
            elif route.tls == "starttls":
                raise SessionError(
                    f"TLS is required, but was not offered by host {proto.name}"
                )
        if route.username is not None:
            if not proto.tls_active and route.tls != "none":
                raise SessionError(f"refusing to send AUTH to {proto.name} without TLS")
            await authenticate(proto, route)

    async def _ehlo(self, proto: SMTPClientProtocol) -> None:
        reply = await proto.command(
            b"EHLO " + self._ehlo_name + _CRLF, COMMAND_TIMEOUT, "sending EHLO"
        )
        if 200 <= reply.code < 300:
            proto.extensions = extensions(reply)
            return
        if (
            reply.code >= 500
            and self.route.tls == "none"
            and self.route.username is None
        ):
            reply = await proto.command(
                b"HELO " + self._ehlo_name + _CRLF, COMMAND_TIMEOUT, "sending HELO"
            )
            if 200 <= reply.code < 300:
                proto.extensions = {}
                return
            raise SessionError(f"host {proto.name} said: {reply} (in reply to HELO command)")
        raise SessionError(f"host {proto.name} said: {reply} (in reply to EHLO command)")
