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

import errno
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from relayd.config import ListenerConfig, parse
from relayd.content import Content, as_content, patch_chunks
from relayd.envelope import DeliveryResult, Envelope, QueuedMessage, QueueId, new_queue_id
from relayd.errors import QueueFull
from relayd.interfaces import (
    ICourier,
    IMessageReceiver,
    IQueueArrival,
    ISession,
    ISpool,
    ISpoolWriter,
    ISubmissionSink,
)
from relayd.metrics import Metrics

if TYPE_CHECKING:
    from relayd.smtpd.protocol import SMTPServerProtocol

__all__ = [
    "HOLD",
    "BackpressureTransport",
    "Conversation",
    "DeliveryAttempt",
    "LogCapture",
    "MemorySpool",
    "MemorySpoolWriter",
    "RecordingArrival",
    "RecordingCourier",
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

    def write(self, data: bytes) -> Deferred[None] | None:
        assert self.state == "open", f"write() after {self.state}"
        assert isinstance(data, bytes), f"write() of {type(data).__name__}"
        self.chunks.append(data)
        return self.sink.behind

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
    - ``behind``: a Deferred that ``write()`` returns, as the spool does while
      its disk thread is behind (the server must stop reading until it fires).

    ``messages`` holds only messages whose ``finish()`` succeeded, in commit
    order; ``receivers`` every receiver ever opened; ``aborted`` the ones
    that were aborted.
    """

    def __init__(self) -> None:
        self.full = False
        self.hold = False
        self.fail_with: BaseException | None = None
        self.behind: Deferred[None] | None = None
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


def sample(metrics: Metrics, name: str, labels: Mapping[str, str] | None = None) -> float:
    """A metric's current value, 0.0 when the series does not exist yet;
    with some labels only, the sum over the series that have them."""
    want = dict(labels or {})
    total = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                total += s.value
    return total



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


# -- the queue side: an in-memory spool and a scripted courier ---------------


@implementer(ISpoolWriter)
class MemorySpoolWriter:
    """One message on its way into a :class:`MemorySpool`.

    Like ``SpoolWriter``, the queue id is fixed when writing starts (it goes
    into ``Received:``) and nothing is visible to ``recover``/``load`` until
    ``commit`` has succeeded.  ``write`` after ``commit``/``abort`` raises
    ``AssertionError``: the real writer would silently lose such bytes, so a
    caller doing it is a bug the fake should make loud.
    """

    def __init__(self, spool: MemorySpool, queue_id: QueueId, envelope: Envelope) -> None:
        self._spool = spool
        self.queue_id = queue_id
        self.envelope = envelope
        self.chunks: list[bytes] = []
        #: "open", then "committed", "failed" or "aborted".
        self.state = "open"

    @property
    def content(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert self.state == "open", f"write() after {self.state}"
        assert isinstance(data, bytes), f"write() of {type(data).__name__}"
        self.chunks.append(data)

    def patch(self, offset: int, data: bytes) -> None:
        assert self.state == "open", f"patch() after {self.state}"
        patch_chunks(self.chunks, offset, data)

    def commit(self) -> Deferred[QueuedMessage]:
        assert self.state == "open", f"commit() after {self.state}"
        spool = self._spool
        if spool.fail_commit is not None:
            self.state = "failed"
            return fail(spool.fail_commit)
        if self.queue_id in spool.contents:
            # The real spool's exclusive rename: never overwrite a queued message.
            self.state = "failed"
            return fail(OSError(errno.EEXIST, "queue id already in use", self.queue_id))
        content = self.content
        message = QueuedMessage(self.queue_id, attrs.evolve(self.envelope, size=len(content)))
        spool.messages[self.queue_id] = message
        spool.contents[self.queue_id] = content
        spool.committed.append(self.queue_id)
        self.state = "committed"
        return succeed(message)

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
            self.chunks = []
            self._spool.aborted.append(self.queue_id)


@implementer(ISpool)
class MemorySpool:
    """An ``ISpool`` in dictionaries, with ``relayd.queue.spool.Spool``'s semantics.

    Why: the queue manager and cleanup are about *which* spool operations
    happen and in what order, not about files; a dictionary makes those
    tests fast and lets them inject failures the disk rarely produces.
    ``tests/test_spool_contract.py`` runs the same tests against this and the
    real spool, so the two cannot drift apart.

    Every Deferred has already fired when returned (as with
    ``InlineDiskWriter``).  Missing messages fail ``load``/``read``/``remove``
    with ``FileNotFoundError``, as the real spool's ``open``/``unlink`` do.

    Knobs, set as attributes: ``fail_commit``, ``fail_load``, ``fail_defer``,
    ``fail_remove``, ``fail_recover``: an exception instance to fail that
    operation with (``None``: work normally).  ``is_writable``: what
    ``writable()`` answers.

    Records: ``loads``, ``removes`` (queue ids, every call), ``defers`` (the
    ``QueuedMessage`` of every ``defer`` call), ``committed``/``aborted``
    (queue ids), ``writers`` (every writer opened).

    :param directory: only for ``Cleanup``'s free-space check (``statvfs``).
    """

    def __init__(self, clock: IReactorTime | None = None, directory: str = os.curdir) -> None:
        self.clock = clock if clock is not None else Clock()
        self.directory = directory
        self.messages: dict[QueueId, QueuedMessage] = {}
        self.contents: dict[QueueId, bytes] = {}
        self.fail_commit: BaseException | None = None
        self.fail_load: BaseException | None = None
        self.fail_defer: BaseException | None = None
        self.fail_remove: BaseException | None = None
        self.fail_recover: BaseException | None = None
        self.is_writable = True
        self.prepared = False
        self.loads: list[QueueId] = []
        self.removes: list[QueueId] = []
        self.defers: list[QueuedMessage] = []
        self.committed: list[QueueId] = []
        self.aborted: list[QueueId] = []
        self.writers: list[MemorySpoolWriter] = []

    def __len__(self) -> int:
        return len(self.messages)

    def prepare(self) -> None:
        self.prepared = True

    def writable(self) -> bool:
        return self.is_writable

    def free_space(self) -> int:
        """What the file system of ``directory`` has free (``statvfs``), so
        cleanup's free-space tests can point it at a real or missing path."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def open_message(self, envelope: Envelope) -> MemorySpoolWriter:
        writer = MemorySpoolWriter(self, new_queue_id(self.clock.seconds()), envelope)
        self.writers.append(writer)
        return writer

    def add(self, message: QueuedMessage, content: bytes) -> QueuedMessage:
        """Put a message straight in, as if an earlier run had queued it
        (for recovery tests); ``envelope.size`` is set from ``content``."""
        message = attrs.evolve(message, envelope=attrs.evolve(message.envelope, size=len(content)))
        self.messages[message.queue_id] = message
        self.contents[message.queue_id] = content
        return message

    def recover(self) -> Deferred[list[QueuedMessage]]:
        if self.fail_recover is not None:
            return fail(self.fail_recover)
        return succeed(sorted(self.messages.values(),
                              key=lambda m: (m.envelope.arrival, m.queue_id)))

    def read(self, queue_id: QueueId) -> Deferred[QueuedMessage]:
        if queue_id not in self.messages:
            return fail(FileNotFoundError(errno.ENOENT, "no such queued message", queue_id))
        return succeed(self.messages[queue_id])

    def load(self, queue_id: QueueId) -> Deferred[Content]:
        """Always ``Content`` in memory: there is no file to point into."""
        self.loads.append(queue_id)
        if self.fail_load is not None:
            return fail(self.fail_load)
        if queue_id not in self.contents:
            return fail(FileNotFoundError(errno.ENOENT, "no such queued message", queue_id))
        return succeed(Content.of(self.contents[queue_id]))

    def defer(self, message: QueuedMessage) -> Deferred[None]:
        """Keep only the retry state, as the real spool's state file does
        (the envelope stays the one committed); unknown ids are ignored,
        as the real spool's orphan state files are at recovery."""
        self.defers.append(message)
        if self.fail_defer is not None:
            return fail(self.fail_defer)
        stored = self.messages.get(message.queue_id)
        if stored is not None:
            self.messages[message.queue_id] = attrs.evolve(
                stored,
                attempts=message.attempts,
                next_attempt=message.next_attempt,
                last_error=message.last_error,
                held=message.held,
                done=message.done,
                history=message.history,
                history_omitted=message.history_omitted,
            )
        return succeed(None)

    def remove(self, queue_id: QueueId) -> Deferred[None]:
        self.removes.append(queue_id)
        if self.fail_remove is not None:
            return fail(self.fail_remove)
        if queue_id not in self.messages:
            return fail(FileNotFoundError(errno.ENOENT, "no such queued message", queue_id))
        del self.messages[queue_id]
        del self.contents[queue_id]
        return succeed(None)


@implementer(IQueueArrival)
class RecordingArrival:
    """An ``IQueueArrival`` that records what cleanup hands over.

    ``arrived``: ``(QueuedMessage, content bytes or None)`` per message;
    ``size``: what ``len()`` answers (the queue size cleanup checks).
    """

    def __init__(self) -> None:
        self.arrived: list[tuple[QueuedMessage, bytes | None]] = []
        self.size = 0

    def queued(self, message: QueuedMessage, content: Content | bytes | None) -> None:
        self.arrived.append((message, None if content is None else as_content(content).read()))

    def __len__(self) -> int:
        return self.size


@attrs.define
class DeliveryAttempt:
    """One call of :meth:`RecordingCourier.deliver`.

    ``deferred`` is set for attempts the courier holds (pending until the
    test fires it); ``finished`` tells whether it has fired.  ``content`` is
    the message as bytes; ``source`` the ``Content`` it was read from (to
    tell a message kept in memory from a spool file region).
    """

    queue_id: QueueId
    envelope: Envelope
    content: bytes
    deferred: Deferred[DeliveryResult] | None = None
    source: Content | None = None

    @property
    def finished(self) -> bool:
        return self.deferred is None or self.deferred.called


#: A scripted outcome: keep the attempt pending (see RecordingCourier).
HOLD = "hold"

Outcome = Any


@implementer(ICourier)
class RecordingCourier:
    """An ``ICourier`` that delivers nowhere and records every attempt.

    Why: the queue manager's job is deciding when to call a courier and what
    to do with its verdict; a scripted courier produces any verdict (sent,
    transient, permanent, an unexpected exception, or none yet) on demand.

    :param outcomes: what successive calls return, consumed one per call:
        a ``DeliveryResult``; an exception instance (the Deferred fails with
        it); :data:`HOLD` (the Deferred stays pending, see ``release`` and
        ``fail_pending``).  Or a callable ``(queue_id, envelope, content)``
        (content as bytes)
        called for every attempt, returning any of those or a Deferred; an
        exception it *raises* propagates from ``deliver`` as raised, which
        breaks ``ICourier``'s contract on purpose so a test can check that
        callers survive such a courier.
    :param hold: what to do once ``outcomes`` is used up: ``True`` holds every
        further attempt, ``False`` (the default) delivers at once.
    """

    def __init__(
        self,
        outcomes: list[Outcome] | Callable[[QueueId, Envelope, bytes], Outcome] | None = None,
        hold: bool = False,
        relay: str = "fake.test[192.0.2.25]:25",
    ) -> None:
        self.outcomes = outcomes if outcomes is not None else []
        self.hold = hold
        self.relay = relay
        self.attempts: list[DeliveryAttempt] = []
        self.stopped = False

    def stop(self) -> None:
        """Holds nothing open; ``stopped`` lets a test see that it was asked."""
        self.stopped = True

    @property
    def pending(self) -> list[DeliveryAttempt]:
        """Held attempts that have not fired yet, oldest first."""
        return [a for a in self.attempts if not a.finished]

    def deliver(self, queue_id: QueueId, envelope: Envelope,
                content: Content | bytes) -> Deferred[DeliveryResult]:
        assert isinstance(content, (bytes, Content)), f"deliver() of {type(content).__name__}"
        source = as_content(content)
        data = source.read()
        attempt = DeliveryAttempt(queue_id, envelope, data, source=source)
        self.attempts.append(attempt)
        if callable(self.outcomes):
            outcome = self.outcomes(queue_id, envelope, data)
        elif self.outcomes:
            outcome = self.outcomes.pop(0)
        else:
            outcome = HOLD if self.hold else None
        if isinstance(outcome, Deferred):
            return outcome
        if outcome is HOLD:
            attempt.deferred = Deferred()
            return attempt.deferred
        if isinstance(outcome, BaseException):
            return fail(outcome)
        if outcome is None:
            outcome = DeliveryResult(self.relay)
        assert isinstance(outcome, DeliveryResult), outcome
        return succeed(outcome)

    def release(self, index: int = 0, result: DeliveryResult | None = None) -> DeliveryAttempt:
        """Let the ``index``-th pending attempt succeed."""
        attempt = self.pending[index]
        assert attempt.deferred is not None
        attempt.deferred.callback(result or DeliveryResult(self.relay))
        return attempt

    def fail_pending(self, error: BaseException, index: int = 0) -> DeliveryAttempt:
        """Let the ``index``-th pending attempt fail with ``error``."""
        attempt = self.pending[index]
        assert attempt.deferred is not None
        attempt.deferred.errback(error)
        return attempt


@implementer(ILogObserver)
class LogCapture:
    """Collects ``twisted.logger`` events of one namespace while in a ``with``.

    Why: the mail log is part of relayd's contract (one Postfix-style line
    per event, queue id first), so tests assert on its text; Twisted 22.4
    has no ``capturedLogs``, and an observer on the global publisher is the
    one way that works on every supported Twisted.  ``lines`` are the
    formatted messages, ``events`` the raw dictionaries (structured fields).
    """

    def __init__(self, namespace: str | None = "relayd.mail") -> None:
        self.namespace = namespace
        self.events: list[dict[str, Any]] = []

    @property
    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def __call__(self, event: dict[str, Any]) -> None:
        if self.namespace is None or event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        globalLogPublisher.removeObserver(self)


# -- SMTP AUTH: an in-memory credential store ----------------------------------

from twisted.cred.error import UnauthorizedLogin  # noqa: E402
from twisted.internet.interfaces import ITLSTransport  # noqa: E402

from relayd.interfaces import IAuthBackend  # noqa: E402


@implementer(IAuthBackend)
class FakeAuthBackend:
    """An ``IAuthBackend`` over a dict, for protocol tests.

    Knobs, set as attributes by the test:

    - ``users``: user name -> password; ``authenticate`` fires with the name
      for the right password and fails with ``UnauthorizedLogin`` otherwise.
    - ``canonical``: optional user name -> canonical name the backend
      answers with (as an LDAP directory might normalise case).
    - ``senders``: user name -> sender patterns for ``sender_patterns``;
      users not in it are not limited (None).
    - ``fail_with``: an exception instance every ``authenticate`` fails
      with (backend trouble: answered 454).
    - ``senders_fail_with``: the same for ``sender_patterns``.
    - ``hold``: ``authenticate`` returns a pending Deferred, kept in
      ``pending`` until the test calls ``release()`` / ``fail_pending()``.

    Records: ``calls`` (every ``(user, password)`` asked), ``sender_calls``,
    ``started``/``stopped``.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        senders: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.canonical: dict[str, str] = {}
        self.senders: dict[str, tuple[str, ...]] = dict(senders or {})
        self.fail_with: BaseException | None = None
        self.senders_fail_with: BaseException | None = None
        self.hold = False
        self.pending: list[tuple[Deferred[str], str, str]] = []
        self.calls: list[tuple[str, str]] = []
        self.sender_calls: list[str] = []
        self.started = False
        self.stopped = False

    def _verdict(self, username: str, password: str) -> Deferred[str]:
        if self.fail_with is not None:
            return fail(self.fail_with)
        if username in self.users and self.users[username] == password:
            return succeed(self.canonical.get(username, username))
        return fail(UnauthorizedLogin(f"bad credentials for {username!r}"))

    def authenticate(self, username: str, password: str) -> Deferred[str]:
        self.calls.append((username, password))
        if self.hold:
            d: Deferred[str] = Deferred()
            self.pending.append((d, username, password))
            return d
        return self._verdict(username, password)

    def release(self, index: int = 0) -> None:
        """Answer the ``index``-th held ``authenticate`` as the dict says."""
        d, username, password = self.pending.pop(index)
        self._verdict(username, password).chainDeferred(d)

    def fail_pending(self, error: BaseException, index: int = 0) -> None:
        d, _, _ = self.pending.pop(index)
        d.errback(error)

    def sender_patterns(self, username: str) -> Deferred[tuple[str, ...] | None]:
        self.sender_calls.append(username)
        if self.senders_fail_with is not None:
            return fail(self.senders_fail_with)
        return succeed(self.senders.get(username))

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


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


def result_of(d: Deferred[Any]) -> Any:
    """The value of a Deferred that has already fired (in-memory fakes and
    the inline disk writer answer at once); re-raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception of a Deferred that has already failed."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert hasattr(out[0], "value"), f"expected a failure, got {out[0]!r}"
    return out[0].value
