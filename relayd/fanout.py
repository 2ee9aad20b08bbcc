"""One message, several routes: each route's recipients in their own
transaction(s), each recipient's outcome its own.

``[[routing]]`` can send the recipients of one message to different
smarthosts (issue 15: the printer relay delivering one government domain to
Exchange Online and another to Google Workspace).  The queue manager still
makes one attempt per message; this turns it into one courier call per
route, in turn, and folds every outcome into per-recipient results: a route
that fails (transient or permanent) becomes deferred or bounced outcomes
for its recipients only, so the DSN names just them and the retry is for
them only (``QueuedMessage.done`` keeps the ones that went).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.content import Content
from relayd.envelope import BOUNCED, DEFERRED, SENT, DeliveryResult, Envelope, RecipientResult
from relayd.errors import DeliveryError
from relayd.interfaces import ICourier

log = Logger(namespace="relayd.qmgr")

#: Told how long each route's part took and how it ended: (route, seconds,
#: error reply or None), for the metrics and the status page.
RouteDone = Callable[[str, float, "str | None"], None]


def _outcomes(route: str, rcpts: tuple[str, ...], result: DeliveryResult
              ) -> list[RecipientResult]:
    given = {o.recipient: o for o in result.recipients}
    out = []
    for rcpt in rcpts:
        o = given.get(rcpt)
        if o is None and result.recipients:
            o = RecipientResult(rcpt, DEFERRED, "courier gave no result for this recipient")
        elif o is None:
            o = RecipientResult(rcpt, SENT, result.reply)
        out.append(RecipientResult(o.recipient, o.status, o.reply, route, result.relay))
    return out


def _failed(route: str, rcpts: tuple[str, ...], failure: Failure, queue_id: str
            ) -> list[RecipientResult]:
    if failure.check(DeliveryError):
        reason = failure.value.reply  # type: ignore[union-attr]
        status = BOUNCED if failure.value.permanent else DEFERRED  # type: ignore[union-attr]
    else:
        log.failure("{queue_id}: delivery over route {route} failed", failure,
                    queue_id=queue_id, route=route)
        reason, status = f"local error: {failure.getErrorMessage()}", DEFERRED
    return [RecipientResult(r, status, reason, route) for r in rcpts]


def deliver_by_route(couriers: Mapping[str, ICourier], queue_id: str, envelope: Envelope,
                     groups: Mapping[str, tuple[str, ...]], content: Content,
                     seconds: Callable[[], float], route_done: RouteDone
                     ) -> Deferred[DeliveryResult]:
    """Deliver each route's recipients through its courier, one route after
    the other (the message's content is read once and shared).

    :return: a Deferred that always succeeds, with a ``DeliveryResult``
        naming every recipient of ``groups`` with its route and relay.
    """
    outcomes: list[RecipientResult] = []
    relays: list[str] = []
    d: Deferred[None] = succeed(None)
    for route, rcpts in groups.items():
        d.addCallback(_one_route, couriers, queue_id, envelope, route, rcpts, content, seconds,
                      route_done, outcomes, relays)
    return d.addCallback(lambda _: DeliveryResult(relay=relays[0] if relays else "",
                                                  recipients=tuple(outcomes)))


def _one_route(_: object, couriers: Mapping[str, ICourier], queue_id: str, envelope: Envelope,
               route: str, rcpts: tuple[str, ...], content: Content, seconds: Callable[[], float],
               route_done: RouteDone, outcomes: list[RecipientResult],
               relays: list[str]) -> Deferred[None]:
    courier = couriers.get(route)
    started = seconds()
    if courier is None:
        reason = f"no route named {route!r} in the configuration"
        outcomes += [RecipientResult(r, DEFERRED, reason, route) for r in rcpts]
        route_done(route, 0.0, reason)
        return succeed(None)
    d: Deferred[DeliveryResult] = courier.deliver(queue_id, envelope.for_route(route, rcpts),
                                                  content)

    def ok(result: DeliveryResult) -> None:
        got = _outcomes(route, rcpts, result)
        outcomes.extend(got)
        relays.append(result.relay)
        refused = [o for o in got if o.status != SENT]
        route_done(route, seconds() - started, refused[0].reply if refused else None)

    def failed(failure: Failure) -> None:
        got = _failed(route, rcpts, failure, queue_id)
        outcomes.extend(got)
        route_done(route, seconds() - started, got[0].reply)

    return d.addCallbacks(ok, failed)
