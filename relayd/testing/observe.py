"""What a test reads back: mail-log lines and metric values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import implementer

from relayd.metrics import Metrics


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
