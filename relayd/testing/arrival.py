"""A fake ``IQueueArrival`` (the cleanup -> qmgr hand-off)."""

from __future__ import annotations

from zope.interface import implementer

from relayd.content import Content, as_content
from relayd.envelope import QueuedMessage
from relayd.interfaces import (
    IQueueArrival,
)


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
