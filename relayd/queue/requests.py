"""``relayd queue`` requests answered from the queue core.

One JSON object in, JSON objects out, as on the control socket
(``relayd.control``): ``{"op": "list"}`` streams ``{"message": entry}`` per
message then ``{"done": true, "count": n}``; ``{"op": "show", "id": ID}``
answers ``{"done": true, "message": details}``; an operation (``flush``,
``hold``, ``release``, ``delete``, ``bounce``) with ``ids``, ``all`` or
``sender`` answers ``{"done": true, "affected": [...]}``; trouble is
``{"error": text}``.  The daemon answers them on its socket and the offline
commands on the spool under lock, with this same function over the same
core, so both say the same thing in the same words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred

from relayd.queue.state import OPERATIONS, QueueState

Reply = dict[str, Any]


class UnknownRequest(Exception):
    """Not a queue request (the control socket may know it: ``drain``)."""


def not_queued(queue_id: object) -> str:
    return f"no message {queue_id!r} in the queue"


def answer(queue: QueueState, request: Mapping[str, Any],
           send: Callable[[Reply], object]) -> Deferred[None] | None:
    """Answer one request through ``send``; a Deferred when the answer waits
    for the disk.  Raises :class:`UnknownRequest` for any other op."""
    op = request.get("op")
    if op == "list":
        count = 0
        for entry in queue.listing():
            send({"message": entry})
            count += 1
        send({"done": True, "count": count})
        return None
    if op == "show":
        shown = queue.show(str(request.get("id", "")))
        shown.addCallback(lambda found: send({"done": True, "message": found} if found else
                                             {"error": not_queued(request.get("id"))}))
        shown.addErrback(lambda f: send({"error": f.getErrorMessage()}))
        return shown.addCallback(lambda _: None)
    if op in OPERATIONS:
        ids = request.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            send({"error": "ids must be a list of queue ids"})
            return None
        chosen = queue.select(ids, bool(request.get("all")), request.get("sender"))
        d = queue.administer(op, chosen)
        d.addCallback(lambda affected: send({"done": True, "affected": affected}))
        d.addErrback(lambda f: send({"error": f.getErrorMessage()}))
        return d.addCallback(lambda _: None)
    raise UnknownRequest(f"unknown operation {op!r}")
