"""Listening ports that outlive their factories.

A :class:`ListenerService` binds one endpoint synchronously (so a start or a
reload that cannot have its port fails before anything else happens) and
hands connections to a :class:`SwitchFactory`, whose target a reload can
replace while the socket stays bound.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.errors import ConfigError
from relayd.smtpd.factory import SMTPServerFactory

log = Logger(namespace="relayd")


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


_PORT_ZERO = re.compile(r"^(tcp6?:(?:[^:]*(?<!\\):)*?)(port=)?0(?=:|$)")


def same_port(description: str, port: int) -> str:
    """``tcp:0:interface=127.0.0.1`` -> ``tcp:2525:interface=127.0.0.1``
    once port 2525 was given: an endpoint bound again is the same one."""
    return _PORT_ZERO.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{port}", description, 1)


class ListenerService(Service):
    """One SMTP (or HTTP) endpoint, bound before privileges are dropped.

    Binding happens synchronously in ``privilegedStartService`` so that a
    port in use or a bad address stops the start with an error instead of
    leaving a half-running relay.

    :param smtp: the SMTP factory behind the port, whose sessions a stop
        lets finish their transactions (within ``grace`` seconds).
    :param source: the config file and ``key`` the config key that named
        the endpoint (``listener[NAME].listen``, ``http.listen``): a port
        that cannot be had is a :class:`ConfigError` naming both.
    """

    def __init__(self, name: str, description: str, factory: Any, reactor: Any,
                 smtp: SMTPServerFactory | None = None, grace: float = 30.0,
                 *, source: str = "-", key: str = "-") -> None:
        self.name = name
        self.description = description
        self.source = source
        self.key = key
        self._factory = SwitchFactory(factory)
        self._reactor = reactor
        self.smtp = smtp
        self.grace = grace
        self.port: Any = None
        self._bound_port: int | None = None

    def switch(self, factory: Any) -> None:
        """New connections go to ``factory`` from now on."""
        self._factory.target = factory

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        description = self.description
        if self._bound_port is not None:
            description = same_port(description, self._bound_port)
        try:
            endpoint = serverFromString(self._reactor, with_backlog(description))
        except Exception as e:
            raise self._cannot(e) from None
        outcome: list[Any] = []
        endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"{self.name}: {self.description} did not bind at once")
        if isinstance(outcome[0], Failure):
            raise self._cannot(outcome[0].value or RuntimeError("cannot listen")) from None
        self.port = outcome[0]
        address = self.port.getHost()
        self._bound_port = getattr(address, "port", None)
        log.info("{name} listening on {host}:{port}", name=self.name,
                 host=getattr(address, "host", "?"), port=getattr(address, "port", "?"))

    def _cannot(self, error: BaseException) -> ConfigError:
        """``FILE: key: cannot listen on ENDPOINT: reason``, the reason
        without Twisted's wrapping ("Couldn't listen on ...: [Errno 98]")."""
        cause = getattr(error, "socketError", None) or error
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return ConfigError(self.source, self.key,
                           f"cannot listen on {self.description}: {reason}")

    def unbind(self) -> None:
        """Close the port (if bound) without waiting: a start that fails
        after this port was bound leaves nothing bound."""
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()

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

    def resume(self) -> None:
        """Listen again after a stop (``relayd drain --cancel``): bind the
        same address anew (a ``tcp:0`` listener takes back the port it had,
        not a new one), and let the SMTP factory serve sessions again."""
        if self.running:
            return
        if self.smtp is not None:
            self.smtp.resume()
        self.startService()

    @property
    def address(self) -> str | None:
        if self.port is None:
            return None
        a = self.port.getHost()
        return f"{getattr(a, 'host', '?')}:{getattr(a, 'port', '?')}"
