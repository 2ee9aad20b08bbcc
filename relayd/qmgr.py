"""The queue manager (Postfix: qmgr): who gets delivered when.

Keeps every queued message's state in memory (the spool is the durable
copy), hands ready messages to the route's courier with at most
``concurrency`` attempts in flight per route, and reschedules deferrals with
the retry schedule through the injected clock.  A courier's verdict is all
it looks at: success, transient or permanent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.envelope import DeliveryResult, QueuedMessage, QueueId
from relayd.errors import DeliveryError, TransientDeliveryError
from relayd.interfaces import ICourier, IRetryPolicy, ISpool
from relayd.metrics import Metrics

log = Logger(namespace="relayd.qmgr")
maillog = Logger(namespace="relayd.mail")

#: Ready messages whose content is kept in memory; past this the content is
#: dropped and read back from the spool when its turn comes.
MAX_CONTENT_IN_MEMORY = 1000


class QueueManager(Service):
    """Delivers what the spool holds.

    :param couriers: one courier per route name.
    :param concurrency: attempts in flight per route.
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
    ) -> None:
        self._spool = spool
        self._couriers = dict(couriers)
        self._retry = retry
        self._clock = clock
        self._metrics = metrics
        self._concurrency = dict(concurrency)
        self._messages: dict[QueueId, QueuedMessage] = {}
        self._ready: dict[str, deque[tuple[QueuedMessage, bytes | None]]] = {}
        self._in_memory = 0
        self._active: dict[str, int] = {}
        self._timers: dict[QueueId, IDelayedCall] = {}
        self._in_flight: set[QueueId] = set()
        self._route_status: dict[str, dict[str, Any]] = {}
        self.recovered: Deferred[None] | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.recovered = self._spool.recover().addCallback(self._recovered)
        self.recovered.addErrback(lambda f: log.failure("spool recovery failed", f))

    def _recovered(self, messages: list[QueuedMessage]) -> None:
        for message in messages:
            self._messages[message.queue_id] = message
            if message.held:
                continue
            self._schedule(message)
        if messages:
            log.info("recovered {count} queued messages", count=len(messages))

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Stop starting attempts; what is in flight finishes (or is retried
        after the restart: nothing is removed before the courier said so)."""
        self._stopping = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        super().stopService()
        return succeed(None)

    # -- intake ----------------------------------------------------------------

    def queued(self, message: QueuedMessage, content: bytes | None) -> None:
        """A new message is durable in the spool: deliver it."""
        self._messages[message.queue_id] = message
        self._make_ready(message, content)

    def __len__(self) -> int:
        return len(self._messages)

    # -- scheduling --------------------------------------------------------

    def _schedule(self, message: QueuedMessage) -> None:
        delay = message.next_attempt - self._clock.seconds()
        if delay <= 0:
            self._make_ready(message, None)
        else:
            self._timers[message.queue_id] = self._clock.callLater(
                delay, self._timer_fired, message.queue_id
            )

    def _timer_fired(self, queue_id: QueueId) -> None:
        self._timers.pop(queue_id, None)
        message = self._messages.get(queue_id)
        if message is not None and not message.held:
            self._make_ready(message, None)

    def _make_ready(self, message: QueuedMessage, content: bytes | None) -> None:
        route = message.envelope.route
        if content is not None:
            if self._in_memory >= MAX_CONTENT_IN_MEMORY:
                content = None
            else:
                self._in_memory += 1
        self._ready.setdefault(route, deque()).append((message, content))
        self._pump(route)

    def _pump(self, route: str) -> None:
        ready = self._ready.get(route)
        limit = self._concurrency.get(route, 1)
        while ready and not self._stopping and self._active.get(route, 0) < limit:
            message, content = ready.popleft()
            if content is not None:
                self._in_memory -= 1
            if message.queue_id not in self._messages or message.queue_id in self._in_flight:
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
        self._pump(route)

    # -- one attempt ----------------------------------------------------------

    def _attempt(self, message: QueuedMessage, content: bytes | None) -> Deferred[None]:
        route = message.envelope.route
        courier = self._couriers.get(route)
        started = self._clock.seconds()
        if courier is None:
            d: Deferred[Any] = Deferred()
            d.errback(TransientDeliveryError(f"no route named {route!r} in the configuration"))
        else:
            loaded = succeed(content) if content is not None else self._spool.load(message.queue_id)
            d = loaded.addCallback(
                lambda data: courier.deliver(message.queue_id, message.envelope, data)
            )
        d.addCallbacks(
            self._delivered, self._failed,
            callbackArgs=(message, started), errbackArgs=(message, started),
        )
        return d

    def _delivered(self, result: DeliveryResult, message: QueuedMessage, started: float) -> Deferred[None]:
        route = message.envelope.route
        now = self._clock.seconds()
        self._metrics.deliveries.labels(route, "sent").inc()
        self._metrics.delivery_seconds.labels(route).observe(now - started)
        self._route_status[route] = {**self._route_status.get(route, {}), "last_success": now}
        for recipient in message.envelope.recipients:
            maillog.info(
                "{queue_id}: to=<{rcpt}> route={route} relay={relay} delay={delay:.2f} "
                "status=sent ({reply})",
                queue_id=message.queue_id, rcpt=recipient, route=route, relay=result.relay,
                delay=now - message.envelope.arrival, reply=result.reply,
            )
        d = self._spool.remove(message.queue_id)

        def removed(_: object) -> None:
            self._messages.pop(message.queue_id, None)
            maillog.info("{queue_id}: removed", queue_id=message.queue_id)

        def not_removed(failure: Failure) -> None:
            # Delivered but still on disk: forget it now; a restart would
            # deliver it again, which the couriers make harmless.
            self._messages.pop(message.queue_id, None)
            log.failure("{queue_id}: delivered but not removed from the spool", failure,
                        queue_id=message.queue_id)

        return d.addCallbacks(removed, not_removed)

    def _failed(self, failure: Failure, message: QueuedMessage, started: float) -> Deferred[None]:
        route = message.envelope.route
        now = self._clock.seconds()
        if failure.check(DeliveryError):
            reason = failure.value.reply
            permanent = failure.value.permanent
        else:
            log.failure("{queue_id}: delivery attempt failed", failure, queue_id=message.queue_id)
            reason = f"local error: {failure.getErrorMessage()}"
            permanent = False
        self._metrics.delivery_seconds.labels(route).observe(now - started)
        self._route_status[route] = {
            **self._route_status.get(route, {}), "last_error": now, "last_error_reason": reason,
        }
        attempts = message.attempts + 1
        if permanent:
            # Bounces (DSNs) are not built yet: hold the message for a human
            # rather than drop it.
            status, held, delay = "bounced", True, 0.0
        else:
            status, held, delay = "deferred", False, self._retry.next_delay(attempts)
        self._metrics.deliveries.labels(route, status).inc()
        updated = evolve(
            message, attempts=attempts, next_attempt=now + delay, last_error=reason, held=held
        )
        self._messages[message.queue_id] = updated
        for recipient in message.envelope.recipients:
            maillog.info(
                "{queue_id}: to=<{rcpt}> route={route} delay={delay:.2f} status={status} "
                "({reason})" + (" held" if held else ""),
                queue_id=message.queue_id, rcpt=recipient, route=route,
                delay=now - message.envelope.arrival, status=status, reason=reason,
            )
        d = self._spool.defer(updated)
        d.addErrback(lambda f: log.failure("{queue_id}: cannot save retry state", f,
                                           queue_id=message.queue_id))
        if not held and not self._stopping:
            self._timers[message.queue_id] = self._clock.callLater(
                delay, self._timer_fired, message.queue_id
            )
        return d

    # -- views -------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Messages by state: active (ready or being tried), deferred, held."""
        held = sum(1 for m in self._messages.values() if m.held)
        deferred = len(self._timers)
        return {"active": len(self._messages) - held - deferred, "deferred": deferred,
                "held": held}

    def oldest_age(self) -> float:
        if not self._messages:
            return 0.0
        return self._clock.seconds() - min(m.envelope.arrival for m in self._messages.values())

    def route_status(self) -> dict[str, dict[str, Any]]:
        return {name: dict(v) for name, v in self._route_status.items()}

    def update_metrics(self) -> None:
        for state, count in self.counts().items():
            self._metrics.queue_messages.labels(state).set(count)
        self._metrics.queue_oldest_age.set(self.oldest_age())
