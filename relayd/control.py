"""The daemon's end of the local control channel (``relayd queue ...``).

A Unix socket in the spool directory, owner-only like the spool itself, so
file permissions are the access control.  The protocol is one JSON object
per line each way; ``list`` streams one line per message, so a queue of
100,000 messages is never built into a single reply.  Everything goes
through the queue core (``relayd.queue.state``), the same code the offline
commands run; its scheduler (the queue manager) knows what is in flight:
that is what makes ``hold`` or ``delete`` during a delivery well defined.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from relayd.queue.requests import UnknownRequest, answer
from relayd.queue.state import QueueState

log = Logger(namespace="relayd.control")

#: A request line longer than this is not ours.
MAX_REQUEST = 64 * 1024


class ControlProtocol(Protocol):
    """One admin client: requests in, JSON lines out."""

    def __init__(self, queue: QueueState, drain: Callable[[], object] | None = None,
                 undrain: Callable[[], object] | None = None) -> None:
        self._queue = queue
        self._drain = drain
        self._undrain = undrain
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self._handle(line)
        if len(self._buf) > MAX_REQUEST:
            self._send({"error": "request too long"})
            self.transport.loseConnection()

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")

    def _handle(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError):
            self._send({"error": "malformed request"})
            return
        try:
            cancel = bool(request.get("cancel"))
            action = self._undrain if cancel else self._drain
            if op == "drain" and action is not None:
                drained = maybeDeferred(action)
                drained.addCallback(lambda _: self._send({"done": True, "draining": not cancel}))
                drained.addErrback(lambda f: self._send({"error": f.getErrorMessage()}))
            else:
                answer(self._queue, request, self._send)
        except UnknownRequest as e:
            self._send({"error": str(e)})
        except Exception as e:  # one bad request never takes the daemon down
            log.failure("control request {op} failed", op=op)
            self._send({"error": str(e)})


class ControlFactory(Factory):
    noisy = False

    def __init__(self, queue: QueueState, drain: Callable[[], object] | None = None,
                 undrain: Callable[[], object] | None = None) -> None:
        self._queue = queue
        self._drain = drain
        self._undrain = undrain

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self._queue, self._drain, self._undrain)
