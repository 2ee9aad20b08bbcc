"""The queue manager (Postfix: qmgr): who gets delivered when.

Scheduling only: it hands ready messages to the route's courier with at
most ``concurrency`` attempts in flight per route, keeps a timer for each
deferred message (the retry schedule, through the injected clock), and
turns a courier's verdict (per recipient sent, deferred or bounced; or the
whole attempt transient or permanent) into the message's next state.  The
messages, their states and the changes to them live in the queue core
(``relayd.queue.state``), shared with the offline ``relayd queue``
commands; the queue manager is its ``IAttempts`` (it knows what is in
flight and schedules what an administrator changed) and the cleanup's
``IQueueArrival``.

A bounce (RFC 3464 DSN to the envelope sender) is made durable in the spool
*before* the original's recipients are marked done, so a crash between the
two can at worst bounce twice, never lose the notice.

It stays one module past 400 lines because an attempt's life is one state
machine (ready queue, concurrency slot, in flight, verdict, timer); what
came of the attempts is counted in ``relayd.queue.activity``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.content import Content, as_content
from relayd.dsn import DSNQueue
from relayd.envelope import (
    BOUNCED,
    DEFERRED,
    SENT,
    DeliveryResult,
    Event,
    QueuedMessage,
    QueueId,
    RecipientResult,
)
from relayd.errors import DeliveryError
from relayd.fanout import deliver_by_route
from relayd.interfaces import ICourier, IQueueArrival, IRetryPolicy, ISpool
from relayd.metrics import Metrics
from relayd.queue.activity import Activity
from relayd.queue.state import IAttempts, QueueState, pending

log = Logger(namespace="relayd.qmgr")
maillog = Logger(namespace="relayd.mail")

#: Bytes of content kept in memory for ready messages (cleanup hands over
#: messages up to ``relayd.content.IN_MEMORY_LIMIT``); past this the content
#: is dropped and read back from the spool when its turn comes.  A budget in
#: bytes, not a count, so a burst of big messages cannot pin its size times
#: the queue length.
CONTENT_MEMORY_BUDGET = 8 * 1024 * 1024
#: Said of bounced recipients whose notification could not be queued: they
#: stay pending, so their history says deferred.
NOT_QUEUED = " (the non-delivery notification could not be queued)"


_TO_LINE = ("{queue_id}: to=<{rcpt}>{orig} route={route} relay={relay} delay={delay:.2f} "
            "status={status} ({reply})")
_TO_LINE_REUSED = ("{queue_id}: to=<{rcpt}>{orig} route={route} relay={relay} conn_use={conn_use} "
                   "delay={delay:.2f} status={status} ({reply})")


def _orig(original: str) -> str:
    """`` orig_to=<...>`` for a recipient an alias produced (Postfix's field)."""
    return f" orig_to=<{original}>" if original else ""


def _events(now: float, route: str, relay: str,
            outcomes: Sequence[RecipientResult]) -> list[Event]:
    """Per-recipient outcomes as history events: one per status and reply."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for o in outcomes:
        key = (o.status, o.reply, o.route or route, o.relay or relay)
        groups.setdefault(key, []).append(o.recipient)
    return [Event.of(now, status, rcpts, rroute, rrelay, reply)
            for (status, reply, rroute, rrelay), rcpts in groups.items()]


@implementer(IQueueArrival, IAttempts)
class QueueManager(Service):
    """Delivers what the spool holds.

    :param couriers: one courier per route name.
    :param concurrency: attempts in flight per route.
    :param jitter: deferral delays are spread by up to this fraction either
        way, so a smarthost outage does not end in a thundering herd.
    """

    name = "qmgr"

    def __init__(
        self,
        spool: ISpool,
        couriers: Mapping[str, ICourier],
        retry: IRetryPolicy,
        clock: IReactorTime,
        metrics: Metrics,
        concurrency: Mapping[str, int],
        hostname: str = "localhost",
        bounce_from: str | None = None,
        jitter: float = 0.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._spool = spool
        self._couriers = dict(couriers)
        self._retry = retry
        self._clock = clock
        self._metrics = metrics
        self._concurrency = dict(concurrency)
        self._jitter = jitter
        self._rng = rng
        #: The messages and their states (shared with ``relayd queue``).
        self.state = QueueState(spool, clock, DSNQueue(spool, clock, hostname, bounce_from,
                                                       arrival=self), attempts=self)
        self._ready: dict[str, deque[tuple[QueuedMessage, Content | None]]] = {}
        self._in_memory = 0
        self._queued_ids: set[QueueId] = set()
        self._active: dict[str, int] = {}
        self._timers: dict[QueueId, IDelayedCall] = {}
        self._in_flight: set[QueueId] = set()
        # Admin requests that wait for the attempt in flight to finish.
        self._after_attempt: dict[QueueId, str] = {}
        #: What came of the attempts (the status page, the metrics).
        self.activity = Activity(clock, metrics)
        self.recovered: Deferred[None] | None = None
        self._stopping = False
        #: How long a stop waits for deliveries in flight.
        self.stop_timeout = 30.0
        self._idle_waiters: list[Deferred[None]] = []

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.recovered = self.state.load().addCallback(self._recovered)
        self.recovered.addErrback(lambda f: log.failure("spool recovery failed", f))

    def _recovered(self, messages: list[QueuedMessage]) -> None:
        for message in messages:
            if message.held:
                continue
            self._schedule(message)
        if messages:
            log.info("recovered {count} queued messages", count=len(messages))

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Stop starting attempts and wait up to ``stop_timeout`` seconds for
        the ones in flight, so a stop does not cut a smarthost off after it
        took the message but before we recorded that (a duplicate after the
        restart).  Whatever is still in flight then is retried after the
        restart: nothing leaves the spool before the courier said so."""
        self._stopping = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        super().stopService()
        if not self._in_flight:
            return succeed(None)
        log.info("stopping: waiting for {count} deliveries in flight", count=len(self._in_flight))
        done: Deferred[None] = Deferred()
        self._idle_waiters.append(done)

        def give_up() -> None:
            if done in self._idle_waiters:
                self._idle_waiters.remove(done)
                log.warn("stopping: {count} deliveries still in flight after {timeout} s; "
                         "they will be retried after the restart",
                         count=len(self._in_flight), timeout=self.stop_timeout)
                done.callback(None)

        timer = self._clock.callLater(self.stop_timeout, give_up)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        done.addCallback(stop_timer)
        return done

    def set_routes(self, couriers: Mapping[str, ICourier], concurrency: Mapping[str, int]) -> None:
        """A config reload: new attempts use these couriers; attempts in flight
        finish on the courier they started with.  Messages for a route that
        no longer exists are deferred ("no route named ...") until it is
        back or they expire."""
        self._couriers = dict(couriers)
        self._concurrency = dict(concurrency)
        for route in list(self._ready):
            self._pump(route)

    # -- intake ----------------------------------------------------------------

    def queued(self, message: QueuedMessage, content: Content | bytes | None) -> None:
        """A new message is durable in the spool: deliver it (``content``:
        what cleanup kept of it, or None to read it back when its turn comes)."""
        self.state.add(message)
        self._make_ready(message, None if content is None else as_content(content))

    def __len__(self) -> int:
        return len(self.state)

    # -- scheduling --------------------------------------------------------

    def _schedule(self, message: QueuedMessage) -> None:
        delay = message.next_attempt - self._clock.seconds()
        if delay <= 0:
            self._make_ready(message, None)
        else:
            self._set_timer(message.queue_id, delay)

    def _set_timer(self, queue_id: QueueId, delay: float) -> None:
        old = self._timers.pop(queue_id, None)
        if old is not None and old.active():
            old.cancel()
        self._timers[queue_id] = self._clock.callLater(delay, self._timer_fired, queue_id)

    def _cancel_timer(self, queue_id: QueueId) -> None:
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _timer_fired(self, queue_id: QueueId) -> None:
        self._timers.pop(queue_id, None)
        message = self.state.get(queue_id)
        if message is not None and not message.held:
            self._make_ready(message, None)

    def _make_ready(self, message: QueuedMessage, content: Content | None) -> None:
        if message.queue_id in self._queued_ids:
            return
        self._queued_ids.add(message.queue_id)
        route = message.envelope.route
        if content is not None and content.in_memory:
            if self._in_memory + content.size > CONTENT_MEMORY_BUDGET:
                content = None
            else:
                self._in_memory += content.size
        self._ready.setdefault(route, deque()).append((message, content))
        self._pump(route)

    def _pump(self, route: str) -> None:
        ready = self._ready.get(route)
        # The config gives every route its limit; a route it no longer has
        # (removed by a reload) gets one attempt at a time, each of which
        # only defers the message ("no route named ...").
        limit = self._concurrency.get(route, 1)
        while ready and not self._stopping and self._active.get(route, 0) < limit:
            queued, content = ready.popleft()
            self._queued_ids.discard(queued.queue_id)
            if content is not None and content.in_memory:
                self._in_memory -= content.size
            message = self.state.get(queued.queue_id)
            if message is None or message.held or message.queue_id in self._in_flight:
                continue
            self._active[route] = self._active.get(route, 0) + 1
            self._in_flight.add(message.queue_id)
            self._attempt(message, content).addBoth(self._attempt_done, message)

    def _attempt_done(self, result: object, message: QueuedMessage) -> None:
        route = message.envelope.route
        self._active[route] -= 1
        self._in_flight.discard(message.queue_id)
        if isinstance(result, Failure):
            log.failure("{queue_id}: unexpected error in delivery", result,
                        queue_id=message.queue_id)
        request = self._after_attempt.pop(message.queue_id, None)
        if request is not None:
            self.state.apply(request, message.queue_id)
        self._pump(route)
        if not self._in_flight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- one attempt ----------------------------------------------------------

    def _attempt(self, message: QueuedMessage, content: Content | None) -> Deferred[None]:
        route = message.envelope.route
        courier = self._couriers.get(route)
        started = self._clock.seconds()
        holder: dict[str, Content] = {}
        groups = message.envelope.by_route(pending(message))
        if set(groups) != {route}:
            # [[routing]] sent some recipients elsewhere: one transaction
            # per route, one outcome per recipient (relayd.fanout).
            loaded = succeed(content) if content is not None else self._spool.load(message.queue_id)

            def fan_out(data: Content) -> Deferred[DeliveryResult]:
                holder["content"] = data
                return deliver_by_route(self._couriers, message.queue_id, message.envelope,
                                        groups, data, self._clock.seconds, self._route_done)

            d: Deferred[Any] = loaded.addCallback(fan_out)
        elif courier is None:
            d = Deferred()
            d.errback(DeliveryError(f"no route named {route!r} in the configuration"))
        else:
            loaded = succeed(content) if content is not None else self._spool.load(message.queue_id)
            envelope = evolve(message.envelope, recipients=pending(message))

            def deliver(data: Content) -> Deferred[DeliveryResult]:
                holder["content"] = data
                return courier.deliver(message.queue_id, envelope, data)  # type: ignore[no-any-return]

            d = loaded.addCallback(deliver)
        d.addCallbacks(
            self._delivered, self._failed,  # type: ignore[arg-type]
            callbackArgs=(message, started, holder), errbackArgs=(message, started, holder),
        )
        return d

    def _delivered(self, result: DeliveryResult, message: QueuedMessage, started: float,
                   holder: dict[str, Content]) -> Deferred[None]:
        route = message.envelope.route
        now = self._clock.seconds()
        # Outcomes that name their route come from relayd.fanout, which has
        # timed and recorded each route itself.
        fanned = any(o.route for o in result.recipients)
        if not fanned:
            self._metrics.delivery_seconds.labels(route).observe(now - started)
        outcomes = result.recipients or tuple(
            RecipientResult(r, SENT, result.reply) for r in pending(message)
        )
        answered = {o.recipient for o in outcomes}
        outcomes += tuple(RecipientResult(r, DEFERRED, "courier gave no result for this recipient")
                          for r in pending(message) if r not in answered)
        # Postfix logs conn_use= only for a reused connection.
        line = _TO_LINE_REUSED if result.conn_use > 1 else _TO_LINE
        for o in outcomes:
            maillog.info(
                line, queue_id=message.queue_id, rcpt=o.recipient, route=o.route or route,
                orig_to=message.envelope.original_of(o.recipient),
                orig=_orig(message.envelope.original_of(o.recipient)),
                relay=o.relay or result.relay, conn_use=result.conn_use,
                delay=now - message.envelope.arrival, status=o.status, reply=o.reply,
            )
        sent = [o for o in outcomes if o.status == SENT]
        bounced = [o for o in outcomes if o.status == BOUNCED]
        deferred = [o for o in outcomes if o.status == DEFERRED]
        for sent_route in dict.fromkeys(o.route or route for o in sent):
            self.activity.count(sent_route, SENT, now)
            if not fanned:
                self.activity.succeeded(route, now)
        done = tuple(message.done) + tuple(o.recipient for o in sent)
        d = self._bounce(message, bounced, holder.get("content"), remote=result.relay)

        def settle(bounce_queued: bool) -> Deferred[None]:
            # If the DSN could not be queued, the bounced recipients stay
            # pending and are tried (and bounced) again later.
            finished = done + tuple(o.recipient for o in bounced) if bounce_queued else done
            waiting = deferred if bounce_queued else deferred + bounced
            current = evolve(self.state.get(message.queue_id) or message, done=finished)
            # A recipient refused (bounced or deferred) is the route's last
            # error for the status page, though the rest may have gone.
            refused = waiting or bounced
            if refused and not fanned:
                self.activity.failed(route, now, refused[0].reply)
            outcome = bounced if bounce_queued else [
                RecipientResult(o.recipient, DEFERRED, o.reply + NOT_QUEUED, o.route, o.relay)
                for o in bounced]
            current = current.with_events(*_events(now, route, result.relay,
                                                   sent + outcome + deferred))
            if not waiting:
                return self._forget(current)
            return self._defer(current, waiting[0].reply, now, relay=result.relay)

        return self._bounce_outcome(d, message).addCallback(settle)

    def _route_done(self, route: str, seconds: float, error: str | None) -> None:
        """One route's part of a fanned-out attempt (relayd.fanout) is over."""
        self._metrics.delivery_seconds.labels(route).observe(seconds)
        now = self._clock.seconds()
        if error is None:
            self.activity.succeeded(route, now)
        else:
            self.activity.failed(route, now, error)

    def _bounce_outcome(self, d: Deferred[None], message: QueuedMessage) -> Deferred[bool]:
        """True once the DSN is durable; False (logged) if it could not be queued."""

        def failed(failure: Failure) -> bool:
            log.failure("{queue_id}: cannot queue the non-delivery notification", failure,
                        queue_id=message.queue_id)
            return False

        return d.addCallbacks(lambda _: True, failed)

    def _failed(self, failure: Failure, message: QueuedMessage, started: float,
                holder: dict[str, Content]) -> Deferred[None]:
        route = message.envelope.route
        now = self._clock.seconds()
        if failure.check(DeliveryError):
            reason = failure.value.reply  # type: ignore[union-attr]
            permanent = failure.value.permanent  # type: ignore[union-attr]
        else:
            log.failure("{queue_id}: delivery attempt failed", failure, queue_id=message.queue_id)
            reason = f"local error: {failure.getErrorMessage()}"
            permanent = False
        self._metrics.delivery_seconds.labels(route).observe(now - started)
        self.activity.failed(route, now, reason)
        current = self.state.get(message.queue_id) or message
        recipients = pending(current)
        if permanent:
            for rcpt in recipients:
                maillog.info("{queue_id}: to=<{rcpt}>{orig} route={route} delay={delay:.2f} "
                             "status=bounced ({reason})", queue_id=message.queue_id, rcpt=rcpt,
                             orig=_orig(message.envelope.original_of(rcpt)),
                             route=route, delay=now - message.envelope.arrival, reason=reason)
            failed = [RecipientResult(r, BOUNCED, reason) for r in recipients]
            d = self._bounce(current, failed, holder.get("content"))
            kept = current.with_events(Event.of(now, DEFERRED, recipients, route,
                                                reply=reason + NOT_QUEUED))
            final = evolve(current, done=current.done + recipients).with_events(
                Event.of(now, BOUNCED, recipients, route, reply=reason))
            return self._bounce_outcome(d, current).addCallback(
                lambda ok: self._forget(final) if ok else self._retry_later(kept, reason, now)
            )
        for rcpt in recipients:
            maillog.info("{queue_id}: to=<{rcpt}>{orig} route={route} delay={delay:.2f} "
                         "status=deferred ({reason})", queue_id=message.queue_id, rcpt=rcpt,
                             orig=_orig(message.envelope.original_of(rcpt)),
                         route=route, delay=now - message.envelope.arrival, reason=reason)
        current = current.with_events(Event.of(now, DEFERRED, recipients, route, reply=reason))
        return self._defer(current, reason, now)

    def _defer(self, message: QueuedMessage, reason: str, now: float,
               relay: str = "") -> Deferred[None]:
        """Schedule the next attempt, or bounce what is left if it is too old."""
        route = message.envelope.route
        if self._retry.expired(message.envelope.arrival, now):
            message = message.with_events(Event.of(now, "expired", pending(message), route,
                                                   reply=reason))
            # The Diagnostic-Code stays the last reply, verbatim (RFC 3464).
            expired = [RecipientResult(r, BOUNCED, reason) for r in pending(message)]
            for o in expired:
                maillog.info("{queue_id}: to=<{rcpt}> route={route} status=expired ({reason})",
                             queue_id=message.queue_id, rcpt=o.recipient, route=route,
                             reason=reason)
            d = self._bounce(message, expired, None)
            return self._bounce_outcome(d, message).addCallback(
                lambda ok: self._forget(message) if ok else self._retry_later(message, reason, now)
            )
        return self._retry_later(message, reason, now, relay)

    def _retry_later(self, message: QueuedMessage, reason: str, now: float,
                     relay: str = "") -> Deferred[None]:
        route = message.envelope.route
        attempts = message.attempts + 1
        self.activity.deferred(message.queue_id, pending(message), route, relay, reason,
                               attempts, now)
        delay = self._retry.next_delay(attempts)
        if self._jitter:
            delay *= 1 + self._jitter * (2 * self._rng() - 1)
        updated = evolve(message, attempts=attempts, next_attempt=now + delay, last_error=reason)
        d = self.state.save(updated)
        if not updated.held and not self._stopping:
            self._set_timer(message.queue_id, delay)
        return d

    def _forget(self, message: QueuedMessage) -> Deferred[None]:
        """Every recipient is done: no timer, no message."""
        self._cancel_timer(message.queue_id)
        return self.state.forget(message)

    def _bounce(self, message: QueuedMessage, failed: Sequence[RecipientResult],
                content: Content | None, remote: str | None = None) -> Deferred[None]:
        """Count the bounce, then have the core queue the DSN."""
        if failed:
            self.activity.count(message.envelope.route, BOUNCED, self._clock.seconds())
        return self.state.bounce(message, failed, content, remote)

    # -- IAttempts: what the queue core asks and tells ---------------------------

    def in_flight(self, queue_id: QueueId) -> bool:
        return queue_id in self._in_flight

    def after_attempt(self, queue_id: QueueId, op: str) -> None:
        self._after_attempt[queue_id] = op

    def changed(self, before: QueuedMessage, op: str) -> None:
        """An administrator changed the message: schedule it as its state
        says (held or gone: no timer; active: ready now unless in flight;
        deferred: its timer stands)."""
        queue_id = before.queue_id
        if op == "bounce" and pending(before):
            self.activity.count(before.envelope.route, BOUNCED, self._clock.seconds())
        message = self.state.get(queue_id)
        if message is None or message.held:
            self._cancel_timer(queue_id)
        elif message.next_attempt <= self._clock.seconds() and queue_id not in self._in_flight:
            self._cancel_timer(queue_id)
            self._make_ready(message, None)

    # -- views -------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Messages by state (``relayd.queue.state.state_of``)."""
        return self.state.counts()

    def oldest_age(self) -> float:
        return self.state.oldest_age()

    def route_status(self) -> dict[str, dict[str, Any]]:
        return self.activity.route_status()

    def last_hour(self, route: str) -> dict[str, int]:
        return self.activity.last_hour(route)

    def recent_deferrals(self) -> list[dict[str, Any]]:
        return self.activity.recent_deferrals()

    def update_metrics(self) -> None:
        for state, count in self.counts().items():
            self._metrics.queue_messages.labels(state).set(count)
        self._metrics.queue_oldest_age.set(self.oldest_age())

