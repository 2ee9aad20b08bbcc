"""What deliveries have been doing, for the status page and the metrics:
per route its last success and last error, its sent/deferred/bounced counts
over the last hour, and the messages deferred most recently (each once).

Kept apart from the queue manager, which decides when and where a message
is tried: this only counts what came of it, through the same clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime

from relayd.envelope import BOUNCED, DEFERRED, EVENT_RECIPIENTS, EVENT_REPLY, SENT, QueueId
from relayd.metrics import Metrics

#: Messages the status page lists under recent deferrals (each once, with
#: its latest deferral and how many attempts it has had).
RECENT_DEFERRALS = 20


class HourCounts:
    """A route's sent, deferred and bounced counts over the last hour.

    Sixty one-minute buckets, reused as the minutes go by: memory stays the
    same however busy the route is, and a read is sixty additions.  Minutes
    come from the queue manager's clock, so tests drive it with task.Clock.
    """

    RESULTS = (SENT, DEFERRED, BOUNCED)
    MINUTES = 60

    def __init__(self) -> None:
        self._minute = [-1] * self.MINUTES
        self._counts = [dict.fromkeys(self.RESULTS, 0) for _ in range(self.MINUTES)]

    def add(self, now: float, result: str) -> None:
        minute = int(now // 60)
        slot = minute % self.MINUTES
        if self._minute[slot] != minute:
            self._minute[slot] = minute
            self._counts[slot] = dict.fromkeys(self.RESULTS, 0)
        self._counts[slot][result] += 1

    def totals(self, now: float) -> dict[str, int]:
        """This minute and the 59 before it (a bucket from a clock that went
        back is not counted, and is reset when its slot comes round)."""
        minute = int(now // 60)
        out = dict.fromkeys(self.RESULTS, 0)
        for stamp, counts in zip(self._minute, self._counts):
            if minute - self.MINUTES < stamp <= minute:
                for result, n in counts.items():
                    out[result] += n
        return out


class Activity:
    """Delivery outcomes by route, and the recent deferrals."""

    def __init__(self, clock: IReactorTime, metrics: Metrics) -> None:
        self._clock = clock
        self._metrics = metrics
        self._route_status: dict[str, dict[str, Any]] = {}
        #: route -> sent/deferred/bounced in the last hour.
        self._hours: dict[str, HourCounts] = {}
        #: queue id -> its latest deferral, least recently deferred first.
        self._deferrals: OrderedDict[QueueId, dict[str, Any]] = OrderedDict()

    def count(self, route: str, result: str, now: float) -> None:
        """One outcome, in the metrics and in the route's last hour."""
        self._metrics.deliveries.labels(route, result).inc()
        counts = self._hours.get(route)
        if counts is None:
            counts = self._hours[route] = HourCounts()
        counts.add(now, result)

    def succeeded(self, route: str, now: float) -> None:
        self._route_status[route] = {**self._route_status.get(route, {}), "last_success": now}

    def failed(self, route: str, now: float, reason: str) -> None:
        self._route_status[route] = {
            **self._route_status.get(route, {}), "last_error": now, "last_error_reason": reason,
        }

    def deferred(self, queue_id: QueueId, recipients: tuple[str, ...], route: str, relay: str,
                 reason: str, attempts: int, now: float) -> None:
        """A deferral: counted, and the message's line in the recent list.
        One line per message: a message retried all day must not push every
        other deferral off the status page."""
        self.count(route, DEFERRED, now)
        self._deferrals.pop(queue_id, None)
        self._deferrals[queue_id] = {
            "time": now, "queue_id": queue_id,
            "recipients": list(recipients[:EVENT_RECIPIENTS]), "route": route,
            "relay": relay, "reason": reason[:EVENT_REPLY], "attempts": attempts,
        }
        if len(self._deferrals) > RECENT_DEFERRALS:
            self._deferrals.popitem(last=False)

    def route_status(self) -> dict[str, dict[str, Any]]:
        """Per route seen so far: last success, last error and its reason,
        and ``last_hour`` (sent, deferred, bounced)."""
        names = set(self._route_status) | set(self._hours)
        return {name: {**self._route_status.get(name, {}), "last_hour": self.last_hour(name)}
                for name in names}

    def last_hour(self, route: str) -> dict[str, int]:
        counts = self._hours.get(route)
        if counts is None:
            return dict.fromkeys(HourCounts.RESULTS, 0)
        return counts.totals(self._clock.seconds())

    def recent_deferrals(self) -> list[dict[str, Any]]:
        """The latest deferral of each of the last :data:`RECENT_DEFERRALS`
        messages deferred, newest first."""
        return [dict(d) for d in reversed(self._deferrals.values())]


__all__ = ["BOUNCED", "RECENT_DEFERRALS", "SENT", "Activity", "HourCounts"]
