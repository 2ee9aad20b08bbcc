"""When to try a deferred message again (Postfix: minimal/maximal_backoff_time).

Pure arithmetic over the configured schedule, so qmgr tests need no disk.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import implementer

from relayd.interfaces import IRetryPolicy


@implementer(IRetryPolicy)
@frozen
class RetrySchedule:
    """``retry = ["1m", "5m", "15m", "1h"]``: the n-th deferral waits the n-th
    step; the last step repeats until ``lifetime`` is up."""

    steps: tuple[float, ...]
    lifetime: float

    def next_delay(self, attempts: int) -> float:
        index = min(max(attempts, 1), len(self.steps)) - 1
        return self.steps[index]

    def expired(self, arrival: float, now: float) -> bool:
        return now - arrival >= self.lifetime
