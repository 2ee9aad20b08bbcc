"""The queue core: what state a queued message is in, and the changes an
administrator (or a delivery outcome) makes to it.

One implementation over ``ISpool``, used twice: by the queue manager while
the daemon runs (its scheduling reacts to the changes through
``IAttempts``), and by the offline ``relayd queue`` commands on a spool
under lock (no attempts in flight, nothing to schedule).  Before this
module the two were written twice and drifted apart (what "deferred"
means, whether a flush is saved, which host name a bounce reports); now a
message's state is a function of the message alone (:func:`state_of`) and
every change is saved the same way whoever makes it.

A change is made in memory and then saved; the saved copy is the one a
restart sees.  A removal (delete, bounce, delivered) is forgotten in
memory even when the unlink fails: a restart then delivers it again, a
duplicate, never a loss.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from relayd.content import Content
from relayd.envelope import (
    BOUNCED,
    Event,
    QueuedMessage,
    QueueId,
    RecipientResult,
    is_queue_id,
    message_details,
)
from relayd.interfaces import IBouncer, ISpool

log = Logger(namespace="relayd.queue")
maillog = Logger(namespace="relayd.mail")

#: The states of a queued message, as ``relayd queue list``, ``/status`` and
#: the ``relayd_queue_messages{state}`` metric name them.
ACTIVE, DEFERRED, HELD = "active", "deferred", "held"
STATES = (ACTIVE, DEFERRED, HELD)
#: What ``relayd queue show`` says of a message that has left the queue.
REMOVED = "removed"
#: What ``relayd queue OP`` may ask (besides list and show).
OPERATIONS = ("flush", "hold", "release", "delete", "bounce")
#: The reply a DSN gives for mail the administrator returned.
RETURNED = "550 5.0.0 message returned by the administrator"


def pending(message: QueuedMessage) -> tuple[str, ...]:
    """The recipients still to be delivered."""
    done = set(message.done)
    return tuple(r for r in message.envelope.recipients if r not in done)


def state_of(message: QueuedMessage, now: float) -> str:
    """held, deferred (waiting for its next attempt time) or active (ready,
    or being tried).  The one definition: the scheduler keeps a timer for
    exactly the messages this calls deferred, and the offline commands,
    having no timers, read the same answer from the message itself."""
    if message.held:
        return HELD
    if message.next_attempt > now:
        return DEFERRED
    return ACTIVE


class IAttempts(Interface):
    """The scheduler's side of the core: which messages are being tried,
    and being told when an administrator changed one.

    The offline commands use :class:`NoAttempts`; the queue manager is the
    real one (it starts, times and stops attempts)."""

    def in_flight(queue_id: QueueId) -> bool:
        """Is a delivery attempt of this message under way?"""

    def after_attempt(queue_id: QueueId, op: str) -> None:
        """Apply ``op`` (delete or bounce) once the attempt in flight ends,
        so mail a smarthost has already taken is not also bounced."""

    def changed(before: QueuedMessage, op: str) -> None:
        """``op`` changed (or removed) the message ``before`` was: schedule
        it as its state now says (a hold stops its timer, a release or flush makes it
        ready, a delete forgets it)."""


@implementer(IAttempts)
class NoAttempts:
    """No daemon: nothing is in flight and nothing needs scheduling."""

    def in_flight(self, queue_id: QueueId) -> bool:
        return False

    def after_attempt(self, queue_id: QueueId, op: str) -> None:
        raise AssertionError("nothing is in flight")

    def changed(self, before: QueuedMessage, op: str) -> None:
        pass


class QueueState:
    """Every queued message, by id, with its views and state changes.

    :param bouncer: queues the DSNs (``relayd.dsn.DSNQueue``): the core
        decides when a message is returned, the bouncer writes the notice.
    :param attempts: the scheduler, told about every administrative change.
    """

    def __init__(self, spool: ISpool, clock: IReactorTime, bouncer: IBouncer,
                 attempts: IAttempts | None = None) -> None:
        self._spool = spool
        self._clock = clock
        self._bouncer = bouncer
        self.attempts: IAttempts = attempts if attempts is not None else NoAttempts()
        self._messages: dict[QueueId, QueuedMessage] = {}

    # -- the set of messages ---------------------------------------------------

    def add(self, message: QueuedMessage) -> None:
        """A message is queued (arrived, recovered, or changed by its attempt)."""
        self._messages[message.queue_id] = message

    def get(self, queue_id: QueueId) -> QueuedMessage | None:
        return self._messages.get(queue_id)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._messages

    def __len__(self) -> int:
        return len(self._messages)

    def messages(self) -> Iterable[QueuedMessage]:
        return self._messages.values()

    def load(self) -> Deferred[list[QueuedMessage]]:
        """Read what the spool holds (its crash recovery first): the daemon
        at start, and the offline commands on a spool under lock."""

        def loaded(found: list[QueuedMessage]) -> list[QueuedMessage]:
            for message in found:
                self.add(message)
            return found

        return self._spool.recover().addCallback(loaded)

    # -- saving ------------------------------------------------------------------

    def save(self, message: QueuedMessage) -> Deferred[None]:
        """Keep ``message`` as the current state, in memory and on disk.
        A failed write is logged: the message stays queued either way."""
        self._messages[message.queue_id] = message
        d = self._spool.defer(message)
        d.addErrback(lambda f: log.failure("{queue_id}: cannot save queue state", f,
                                           queue_id=message.queue_id))
        return d

    def forget(self, message: QueuedMessage) -> Deferred[None]:
        """Every recipient is done (or the message was deleted): remove it.
        ``message`` is its final state: its history (with the event that
        ended it) stays in the spool's journal for ``relayd queue show``."""
        qid = message.queue_id
        d = self._spool.remove(qid, message)

        def removed(_: object) -> None:
            self._messages.pop(qid, None)
            maillog.info("{queue_id}: removed", queue_id=qid)

        def not_removed(failure: Failure) -> None:
            # Done but still on disk: forget it now; a restart would deliver
            # it again, which the couriers make harmless.
            self._messages.pop(qid, None)
            log.failure("{queue_id}: done but not removed from the spool", failure,
                        queue_id=qid)

        return d.addCallbacks(removed, not_removed)

    def bounce(self, message: QueuedMessage, failed: Sequence[RecipientResult],
               content: Content | None = None, remote: str | None = None) -> Deferred[None]:
        """Queue a DSN for ``failed`` recipients to the envelope sender.

        Fires once the DSN is durable (or at once when there is nothing to
        send); the caller marks the recipients done only after that, so a
        crash in between bounces twice at worst, never loses the notice.
        """
        if not failed:
            return succeed(None)
        if not message.envelope.sender:
            maillog.info("{queue_id}: bounce of a bounce not sent (null sender)",
                         queue_id=message.queue_id)
            return succeed(None)
        # RFC 3461 §4.1: NOTIFY without FAILURE (e.g. NEVER) asks for none.
        wanted = [r for r in failed if message.envelope.dsn.of(r.recipient).wants("FAILURE")]
        if not wanted:
            maillog.info("{queue_id}: sender non-delivery notification not sent (NOTIFY)",
                         queue_id=message.queue_id)
            return succeed(None)
        failed = wanted

        def queued(bounce_id: QueueId) -> None:
            maillog.info("{queue_id}: sender non-delivery notification: {bounce_id}",
                         queue_id=message.queue_id, bounce_id=bounce_id)

        return self._bouncer.bounce(message, failed, content, remote).addCallback(queued)

    # -- views -----------------------------------------------------------------

    def state_of(self, message: QueuedMessage) -> str:
        return state_of(message, self._clock.seconds())

    def entry(self, message: QueuedMessage) -> dict[str, Any]:
        """One ``relayd queue list`` line (``--json``: exactly this)."""
        e = message.envelope
        now = self._clock.seconds()
        state = state_of(message, now)
        return {
            "id": message.queue_id,
            "state": state,
            "arrival": e.arrival,
            "age": now - e.arrival,
            "size": e.size,
            "sender": e.sender,
            "recipients": list(pending(message)),
            "attempts": message.attempts,
            "next_attempt": message.next_attempt if state == DEFERRED else None,
            "last_error": message.last_error,
            "route": e.route,
            "listener": e.listener,
        }

    def listing(self) -> Iterator[dict[str, Any]]:
        """One entry per message, oldest first."""
        for message in sorted(self._messages.values(),
                              key=lambda m: (m.envelope.arrival, m.queue_id)):
            yield self.entry(message)

    def describe(self, queue_id: str) -> dict[str, Any] | None:
        """``relayd queue show``: the listing entry, the rest of the envelope
        and the message's history; None for a message not in the queue."""
        message = self._messages.get(queue_id)
        return None if message is None else {**self.entry(message), **message_details(message)}

    def show(self, queue_id: str) -> Deferred[dict[str, Any] | None]:
        """:meth:`describe`, or for a message no longer queued its final
        state from the spool's journal (state ``removed``), or None."""
        found = self.describe(queue_id)
        if found is not None or not is_queue_id(queue_id):
            return succeed(found)

        def finished(message: QueuedMessage | None) -> dict[str, Any] | None:
            if message is None:
                return None
            return {**self.entry(message), "state": REMOVED, "next_attempt": None,
                    **message_details(message)}

        return self._spool.finished(queue_id).addCallback(finished)

    def select(self, ids: Sequence[str] | None, everything: bool,
               sender: str | None) -> list[QueueId]:
        """The queue ids a request names: ``--all``, ``--sender PATTERN``
        (shell pattern, case-insensitive), else the ids as given."""
        if everything:
            return [m.queue_id for m in self._oldest_first()]
        if sender is not None:
            pattern = sender.lower()
            return [m.queue_id for m in self._oldest_first()
                    if fnmatch.fnmatchcase(m.envelope.sender.lower(), pattern)]
        return [str(i) for i in ids or ()]

    def _oldest_first(self) -> list[QueuedMessage]:
        return sorted(self._messages.values(), key=lambda m: (m.envelope.arrival, m.queue_id))

    def counts(self) -> dict[str, int]:
        """Messages by state."""
        now = self._clock.seconds()
        out = dict.fromkeys(STATES, 0)
        for message in self._messages.values():
            out[state_of(message, now)] += 1
        return out

    def oldest_age(self) -> float:
        if not self._messages:
            return 0.0
        return self._clock.seconds() - min(m.envelope.arrival for m in self._messages.values())

    # -- administration -----------------------------------------------------------

    def administer(self, op: str, ids: Sequence[QueueId]) -> Deferred[list[QueueId]]:
        """Apply ``op`` to each id in the queue; fires with those it applied to.

        For a message in mid-delivery, ``hold`` takes effect at once (the
        attempt in flight finishes; if it defers, the message stays held),
        and ``delete``/``bounce`` wait until the attempt is over.
        """
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}")
        affected: list[QueueId] = []
        waits = []
        for qid in ids:
            if qid not in self._messages:
                continue
            affected.append(qid)
            if op in ("delete", "bounce") and self.attempts.in_flight(qid):
                self.attempts.after_attempt(qid, op)
                continue
            waits.append(self.apply(op, qid))
        d: Deferred[Any] = succeed(None)
        for w in waits:
            d.addCallback(lambda _, w=w: w)  # type: ignore[call-overload]
        return d.addCallback(lambda _: affected)

    def apply(self, op: str, queue_id: QueueId) -> Deferred[None]:
        """One administrative change, saved, then told to the scheduler."""
        message = self._messages.get(queue_id)
        if message is None:
            return succeed(None)
        maillog.info("{queue_id}: {op} by the administrator", queue_id=queue_id, op=op)
        d = getattr(self, "_" + op)(message, self._clock.seconds())
        return d.addCallback(lambda _: self.attempts.changed(message, op))

    def _hold(self, message: QueuedMessage, now: float) -> Deferred[None]:
        return self.save(evolve(message, held=True).with_events(Event.of(now, "held")))

    def _release(self, message: QueuedMessage, now: float) -> Deferred[None]:
        return self.save(evolve(message, held=False, next_attempt=0.0)
                         .with_events(Event.of(now, "released")))

    def _flush(self, message: QueuedMessage, now: float) -> Deferred[None]:
        # A held message stays held (release is the way out); the new
        # next_attempt is saved, so a restart right after still tries it now.
        if message.held or message.next_attempt == 0.0:
            return succeed(None)
        return self.save(evolve(message, next_attempt=0.0))

    def _delete(self, message: QueuedMessage, now: float) -> Deferred[None]:
        return self.forget(message.with_events(Event.of(now, "deleted", pending(message))))

    def _bounce(self, message: QueuedMessage, now: float) -> Deferred[None]:
        failed = [RecipientResult(r, BOUNCED, RETURNED) for r in pending(message)]
        final = message.with_events(Event.of(now, BOUNCED, pending(message), reply=RETURNED))
        return self.bounce(message, failed).addCallback(lambda _: self.forget(final))
