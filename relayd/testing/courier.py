"""A scripted ``ICourier``: any verdict on demand, or none yet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from relayd.content import Content, as_content
from relayd.envelope import DeliveryResult, Envelope, QueueId
from relayd.interfaces import (
    ICourier,
)


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
