"""The SMTP server on fake transports: a connected protocol
(:func:`smtp_server`), a client talking to it (:class:`Conversation`), a
transport that pushes back like TCP and one that can start TLS."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relayd.config import ListenerConfig
from relayd.metrics import Metrics
from relayd.testing.config import listener_config
from relayd.testing.submission import RecordingSink

if TYPE_CHECKING:
    from relayd.smtpd.protocol import SMTPServerProtocol


class BackpressureTransport(StringTransport):
    """A ``StringTransport`` whose write buffer pushes back as TCP's does.

    Twisted's real transports call ``pauseProducing`` on a registered
    streaming producer once more than ``bufferSize`` bytes wait to be sent,
    and ``resumeProducing`` when the peer has read them.  ``StringTransport``
    never does, so a test of what happens to a client that does not read its
    replies needs this.  ``read()`` is the peer reading everything so far.
    """

    bufferSize = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffered = 0
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.buffered += len(data)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self.buffered > self.bufferSize
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        data = self.value()
        self.clear()
        self.buffered = 0
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


def smtp_server(
    client_ip: str = "127.0.0.1",
    listener: ListenerConfig | None = None,
    sink: RecordingSink | None = None,
    hostname: str = "relay.test",
    transport_class: type[StringTransport] = StringTransport,
    **overrides: Any,
) -> tuple[SMTPServerProtocol, StringTransport, Clock, RecordingSink, Metrics]:
    """A connected server protocol on a ``StringTransport``.

    :return: ``(protocol, transport, clock, sink, metrics)``; the 220
        greeting is already in ``transport.value()``.  ``overrides`` build
        the listener with :func:`listener_config` when ``listener`` is not
        given.
    """
    # Imported here so that importing relayd.testing (e.g. for the config
    # helpers) does not pull in the server.
    from relayd.smtpd.factory import SMTPServerFactory

    if listener is None:
        listener = listener_config(**overrides)
    elif overrides:
        raise TypeError("give either listener or listener keys, not both")
    sink = sink if sink is not None else RecordingSink()
    clock = Clock()
    metrics = Metrics()
    factory = SMTPServerFactory(listener, hostname, sink, clock, metrics)
    peer: IPv4Address | IPv6Address
    if ":" in client_ip:
        peer = IPv6Address("TCP", client_ip, 12345)
    else:
        peer = IPv4Address("TCP", client_ip, 12345)
    transport = transport_class(peerAddress=peer)
    protocol = factory.buildProtocol(peer)
    protocol.makeConnection(transport)
    return protocol, transport, clock, sink, metrics


class Conversation:
    """An SMTP client talking to :func:`smtp_server`, reply lines as text.

    ``send`` feeds bytes (or text, encoded as UTF-8) and returns the reply
    lines written since the last call, without their CRLF, so a test reads
    like a transcript::

        c = Conversation()
        assert c.send("NOOP\\r\\n") == ["250 2.0.0 Ok"]
    """

    def __init__(self, client_ip: str = "127.0.0.1", **kwargs: Any) -> None:
        (
            self.protocol,
            self.transport,
            self.clock,
            self.sink,
            self.metrics,
        ) = smtp_server(client_ip, **kwargs)
        self.listener: ListenerConfig = self.protocol.factory.listener
        self.greeting = self.replies()

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.protocol.dataReceived(data)
        return self.replies()

    def send_bytewise(self, data: bytes) -> list[str]:
        """Feed one byte at a time, as a pathological client or network may."""
        for i in range(len(data)):
            self.protocol.dataReceived(data[i : i + 1])
        return self.replies()

    def replies(self) -> list[str]:
        raw = self.transport.value()
        self.transport.clear()
        if isinstance(self.transport, BackpressureTransport):
            self.transport.buffered = 0
        assert not raw or raw.endswith(b"\r\n"), raw
        return raw.decode("utf-8").split("\r\n")[:-1]

    @property
    def closed(self) -> bool:
        """The server asked for the connection to be closed."""
        return bool(self.transport.disconnecting)

    def transaction(
        self, sender: str = "sender@example.org", recipients: tuple[str, ...] = ("rcpt@example.net",)
    ) -> list[str]:
        """MAIL, RCPT... and DATA in one pipelined group; the replies."""
        lines = [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients] + ["DATA"]
        return self.send("".join(line + "\r\n" for line in lines))


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):  # type: ignore[misc]
    """A ``StringTransport`` that can "start TLS": it records the context of
    every ``startTLS`` call and what had been written before it, so a test
    sees that the 220 went out in plaintext and what came after."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_starts: list[object] = []
        self.written_before_tls: bytes | None = None

    def startTLS(self, contextFactory: object) -> None:
        self.tls_starts.append(contextFactory)
        if self.written_before_tls is None:
            self.written_before_tls = self.value()
