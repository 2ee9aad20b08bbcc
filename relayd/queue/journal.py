"""What happened to messages that have left the queue, for ``relayd queue show``.

When a message is removed (delivered, bounced, expired, deleted), its final
envelope, state and history are appended as one line to ``history.log`` in
the spool: ``QUEUEID {json}``.  So ``relayd queue show ID`` prints a
delivered message's history too (the README's promise), from the running
daemon or from the spool alike.

Cheap on purpose, since every delivered message passes here: one append
(no fsync: losing the last lines in a crash loses a history, never mail)
on the disk thread, into a file kept open.  Bounded: past ``limit`` bytes
the file becomes ``history.log.1`` (the one before is dropped), so a spool
keeps between one and two limits' worth; the mail log has everything else.
A lookup scans both files, newest line first: an administrator's command,
not a hot path.  Older releases ignore the file; a line that cannot be read
is skipped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from attrs import evolve

from relayd.envelope import Envelope, Event, QueuedMessage, QueueId

NAME = "history.log"
#: Bytes in history.log before it is rotated (about 10,000 messages of a
#: few recipients and events each).
LIMIT = 8 * 1024 * 1024


def state_json(message: QueuedMessage) -> dict[str, Any]:
    """A message's changing part, as the state file and the journal keep it."""
    return {
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "last_error": message.last_error,
        "held": message.held,
        "done": list(message.done),
        "history": [event.to_json() for event in message.history],
        "history_omitted": message.history_omitted,
    }


def with_state(message: QueuedMessage, state: dict[str, Any]) -> QueuedMessage:
    """``message`` with the state a state file or a journal line holds."""
    return evolve(
        message,
        attempts=int(state.get("attempts", 0)),
        next_attempt=float(state.get("next_attempt", 0.0)),
        last_error=state.get("last_error"),
        held=bool(state.get("held", False)),
        done=tuple(str(r) for r in state.get("done", ())),
        history=history_of(state.get("history", ())),
        history_omitted=int(state.get("history_omitted", 0)),
    )


def history_of(records: Any) -> tuple[Event, ...]:
    """The events of a state file.  State files written before there was a
    history have none; an event that cannot be read is skipped, because a
    history is for people and must never cost the message itself (a state
    file error moves the message to corrupt/)."""
    events = []
    for record in records if isinstance(records, list) else ():
        try:
            events.append(Event.from_json(record))
        except (ValueError, KeyError, TypeError):
            continue
    return tuple(events)


def line(message: QueuedMessage) -> bytes:
    """The journal line of a message leaving the queue."""
    record = {"envelope": message.envelope.to_json(), "state": state_json(message)}
    return (message.queue_id.encode("ascii") + b" "
            + json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            + b"\n")


class Journal:
    """``history.log`` in ``directory``; used from the disk thread only."""

    def __init__(self, directory: str, limit: int = LIMIT) -> None:
        self.path = os.path.join(directory, NAME)
        self.limit = limit
        self._fd: int | None = None
        self._size = 0

    def append(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._size = os.fstat(self._fd).st_size
        if self._size and self._size + len(data) > self.limit:
            os.close(self._fd)
            self._fd = None
            os.replace(self.path, self.path + ".1")
            self.append(data)
            return
        os.write(self._fd, data)
        self._size += len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def find(self, queue_id: QueueId) -> QueuedMessage | None:
        """The last record of ``queue_id``, newest file first."""
        prefix = queue_id.encode("ascii") + b" "
        for path in (self.path, self.path + ".1"):
            try:
                with open(path, "rb") as f:
                    found = [raw for raw in f if raw.startswith(prefix)]
            except FileNotFoundError:
                continue
            for raw in reversed(found):
                message = _parse(queue_id, raw[len(prefix):])
                if message is not None:
                    return message
        return None


def _parse(queue_id: QueueId, raw: bytes) -> QueuedMessage | None:
    try:
        record = json.loads(raw)
        return with_state(QueuedMessage(queue_id, Envelope.from_json(record["envelope"])),
                          record["state"])
    except (ValueError, KeyError, TypeError):
        return None
