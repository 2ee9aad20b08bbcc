"""A fake ``ISubmissionSink`` (Postfix: cleanup) for SMTP server tests: it
records each accepted message and lets the test decide when (and whether)
it becomes "durable"."""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relayd.envelope import DSNRequest
from relayd.errors import QueueFull
from relayd.interfaces import (
    IMessageReceiver,
    ISession,
    ISubmissionSink,
)
from relayd.routing import Context, Resolution, Router


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
    dsn: DSNRequest | None = None
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
        self.router = Router()
        #: The ``routed`` answers the last ``open_message`` was given.
        self.routed: tuple[object, ...] | None = None
        self._counter = 0

    def next_queue_id(self) -> str:
        self._counter += 1
        return f"{self._counter:020d}"

    def check_capacity(self) -> None:
        self.capacity_checks += 1
        if self.full:
            raise QueueFull()

    def route_recipient(self, session: ISession, sender: str, recipient: str) -> Resolution:
        """``router``'s answer (default: no rules, no aliases: every
        recipient takes the listener's route)."""
        return self.router.resolve(recipient, Context(
            sender=sender, listener=session.listener, route=session.route, user=session.user,
            client=session.client_address))

    def open_message(
        self,
        session: ISession,
        sender: str,
        recipients: tuple[str, ...],
        smtputf8: bool,
        body: str | None,
        dsn: DSNRequest | None = None,
        routed: tuple[object, ...] | None = None,
    ) -> RecordingReceiver:
        self.routed = routed
        message = RecordedMessage(
            session=session,
            helo=session.helo,
            sender=sender,
            recipients=tuple(recipients),
            smtputf8=smtputf8,
            body=body,
            dsn=dsn,
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
