"""In-memory fakes of relayd's interfaces, and helpers to wire them up in tests.

Why fakes rather than mocks: each fake keeps the contract of its interface
(``finish`` or ``abort`` exactly once, a queue id only once the message is
"durable") and records what happened in plain attributes, so a test asserts
on outcomes (the message that would be on disk, the replies on the wire)
rather than on the sequence of calls an implementation happens to make.
Everything here is synchronous and driven by ``task.Clock``: no sockets, no
real time, no filesystem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relayd.config import ListenerConfig, parse
from relayd.errors import QueueFull
from relayd.interfaces import IMessageReceiver, ISession, ISubmissionSink
from relayd.metrics import Metrics

if TYPE_CHECKING:
    from relayd.smtpd.protocol import SMTPServerProtocol

__all__ = [
    "BackpressureTransport",
    "Conversation",
    "RecordedMessage",
    "RecordingReceiver",
    "RecordingSink",
    "listener_config",
    "listener_toml",
    "sample",
    "smtp_server",
]


@attrs.define
class RecordedMessage:
    """One message as the sink saw it.

    ``helo`` is a snapshot taken at ``open_message``: the session object is
    the protocol's own and later commands in the same connection may change
    it, while a message's envelope is fixed when its transaction starts.
    """

    session: ISession
    helo: str
    sender: str
    recipients: tuple[str, ...]
    smtputf8: bool
    body: str | None
    content: bytes = b""
    queue_id: str | None = None


@implementer(IMessageReceiver)
class RecordingReceiver:
    """One message on its way into the in-memory "spool".

    ``state`` is ``"open"`` until exactly one of ``finish``/``abort`` is
    called; a second call, or ``write`` after either, raises
    ``AssertionError`` so a protocol that breaks the contract fails loudly
    in the test that provoked it.
    """

    def __init__(self, sink: RecordingSink, message: RecordedMessage) -> None:
        self.sink = sink
        self.message = message
        self.state = "open"
        self.chunks: list[bytes] = []
        self.deferred: Deferred[str] | None = None

    @property
    def content(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert self.state == "open", f"write() after {self.state}"
        assert isinstance(data, bytes), f"write() of {type(data).__name__}"
        self.chunks.append(data)

    def finish(self) -> Deferred[str]:
        assert self.state == "open", f"finish() after {self.state}"
        self.state = "finishing"
        self.message.content = self.content
        self.deferred = Deferred()
        if self.sink.hold:
            self.sink.pending.append(self)
        elif self.sink.fail_with is not None:
            self.fail(self.sink.fail_with)
        else:
            self.succeed()
        return self.deferred

    def succeed(self, queue_id: str | None = None) -> None:
        """Make the message "durable": record it, then fire ``finish()``'s
        Deferred with its queue id (the order the real spool keeps)."""
        assert self.deferred is not None and self.state == "finishing", self.state
        if self in self.sink.pending:
            self.sink.pending.remove(self)
        self.state = "finished"
        self.message.queue_id = queue_id or self.sink.next_queue_id()
        self.sink.messages.append(self.message)
        self.deferred.callback(self.message.queue_id)

    def fail(self, error: BaseException) -> None:
        """Fail ``finish()``'s Deferred; nothing is recorded as queued."""
        assert self.deferred is not None and self.state == "finishing", self.state
        if self in self.sink.pending:
            self.sink.pending.remove(self)
        self.state = "failed"
        self.deferred.errback(error)

    def abort(self) -> None:
        assert self.state == "open", f"abort() after {self.state}"
        self.state = "aborted"
        self.sink.aborted.append(self)


@implementer(ISubmissionSink)
class RecordingSink:
    """An ``ISubmissionSink`` that keeps messages in a list.

    Knobs, set as attributes by the test:

    - ``full``: ``check_capacity`` raises ``QueueFull`` (452 4.3.1 at MAIL).
    - ``hold``: ``finish()`` returns a Deferred that stays pending; the
      receiver waits in ``pending`` until the test calls ``release()`` (or the
      receiver's ``succeed``/``fail``), which is how a test sees what the
      protocol does while a commit is in flight.
    - ``fail_with``: ``finish()`` fails at once with this exception.

    ``messages`` holds only messages whose ``finish()`` succeeded, in commit
    order; ``receivers`` every receiver ever opened; ``aborted`` the ones
    that were aborted.
    """

    def __init__(self) -> None:
        self.full = False
        self.hold = False
        self.fail_with: BaseException | None = None
        self.messages: list[RecordedMessage] = []
        self.receivers: list[RecordingReceiver] = []
        self.pending: list[RecordingReceiver] = []
        self.aborted: list[RecordingReceiver] = []
        self.capacity_checks = 0
        self._counter = 0

    def next_queue_id(self) -> str:
        self._counter += 1
        return f"{self._counter:020d}"

    def check_capacity(self) -> None:
        self.capacity_checks += 1
        if self.full:
            raise QueueFull()

    def open_message(
        self,
        session: ISession,
        sender: str,
        recipients: tuple[str, ...],
        smtputf8: bool,
        body: str | None,
    ) -> RecordingReceiver:
        message = RecordedMessage(
            session=session,
            helo=session.helo,
            sender=sender,
            recipients=tuple(recipients),
            smtputf8=smtputf8,
            body=body,
        )
        receiver = RecordingReceiver(self, message)
        self.receivers.append(receiver)
        return receiver

    def release(self, queue_id: str | None = None) -> None:
        """Let the oldest held commit succeed."""
        self.pending[0].succeed(queue_id)

    def release_all(self) -> None:
        while self.pending:
            self.release()


def _toml_value(value: object) -> str:
    """TOML spelling of a Python value; JSON's string escapes are TOML's too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def listener_toml(**overrides: Any) -> str:
    """A complete config file with one listener named ``test``.

    Keyword arguments are listener keys (``mynetworks=[...]``,
    ``max_recipients=3``, ``bare_newline="reject"``, ``timeout=60``, also the
    ``[limits]`` keys such as ``max_errors_per_session``); the route the
    listener names is generated as a maildir route, which nothing here
    touches.
    """
    keys: dict[str, object] = {
        "name": "test",
        "listen": "tcp:0:interface=127.0.0.1",
        "route": "default",
    }
    keys.update(overrides)
    lines = ["[http]", 'listen = "none"', "", "[[listener]]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
    lines += ["", f"[route.{keys['route']}]", 'maildir = "/nonexistent/relayd-test-outbox"']
    return "\n".join(lines) + "\n"


def listener_config(**overrides: Any) -> ListenerConfig:
    """A ``ListenerConfig`` made the way the daemon makes one: through
    ``relayd.config.parse``, so tests get its defaults and validation."""
    return parse(listener_toml(**overrides), "<test>").listeners[0]


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
    from relayd.smtpd.protocol import SMTPServerFactory

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


def sample(metrics: Metrics, name: str, labels: Mapping[str, str] | None = None) -> float:
    """A metric's current value, 0.0 when the series does not exist yet."""
    value = metrics.registry.get_sample_value(name, dict(labels or {}))
    return 0.0 if value is None else value



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
