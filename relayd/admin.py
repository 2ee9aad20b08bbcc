"""``relayd queue ...``: Postfix's mailq/postqueue/postsuper for relayd.

With a daemon running, every request goes through its control socket: the
queue manager knows which message is in mid-delivery, so a hold or delete
can never race a delivery.  With no daemon, the commands work on the spool
files directly, under the spool lock, so a daemon started meanwhile waits
rather than reading half-changed state.  Run as root, they act as the
spool's owner, so nothing in the spool ends up owned by root.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from attrs import evolve

from relayd.bounce import build_dsn
from relayd.config import Config
from relayd.diskio import InlineDiskWriter
from relayd.envelope import (
    BOUNCED,
    Envelope,
    Event,
    QueuedMessage,
    RecipientResult,
    is_queue_id,
    message_details,
)
from relayd.queue.spool import CorruptMessage, Spool, control_socket_address

OPERATIONS = ("flush", "hold", "release", "delete", "bounce")


class AdminError(Exception):
    """A queue command that cannot be carried out; printed, exit 1."""


class _WallClock:
    def seconds(self) -> float:
        return time.time()


def become_spool_owner(spool: str) -> None:
    """As root, act as the user that owns the spool (like postsuper)."""
    if os.geteuid() != 0:
        return
    st = os.stat(spool)
    if st.st_uid == 0:
        return
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def _pending(message: QueuedMessage) -> list[str]:
    done = set(message.done)
    return [r for r in message.envelope.recipients if r not in done]


def _entry(message: QueuedMessage, now: float) -> dict[str, Any]:
    e = message.envelope
    state = "held" if message.held else ("deferred" if message.next_attempt > now else "active")
    return {
        "id": message.queue_id, "state": state, "arrival": e.arrival, "age": now - e.arrival,
        "size": e.size, "sender": e.sender, "recipients": _pending(message),
        "attempts": message.attempts,
        "next_attempt": message.next_attempt if message.next_attempt > now else None,
        "last_error": message.last_error, "route": e.route, "listener": e.listener,
    }


class OfflineQueue:
    """The queue commands on the spool files, while no daemon runs."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self._config = config
        self._spool = spool

    def _read(self, queue_id: str) -> QueuedMessage:
        out: list[Any] = []
        self._spool.read(queue_id).addBoth(out.append)
        if not isinstance(out[0], QueuedMessage):
            raise AdminError(f"no message {queue_id} in the queue")
        return out[0]

    def listing(self) -> Iterator[dict[str, Any]]:
        """Streams: one file read at a time, in directory order."""
        now = time.time()
        with os.scandir(self._spool.path("messages")) as entries:
            for entry in entries:
                if not is_queue_id(entry.name):
                    continue
                try:
                    yield _entry(self._read(entry.name), now)
                except (AdminError, CorruptMessage, OSError):
                    continue

    def describe(self, queue_id: str) -> dict[str, Any]:
        if not is_queue_id(queue_id):
            raise AdminError(f"no message {queue_id} in the queue")
        message = self._read(queue_id)
        return {**_entry(message, time.time()), **message_details(message)}

    def select(self, ids: list[str], everything: bool, sender: str | None) -> list[str]:
        if everything:
            return [e["id"] for e in self.listing()]
        if sender is not None:
            import fnmatch

            pattern = sender.lower()
            return [e["id"] for e in self.listing()
                    if fnmatch.fnmatchcase(e["sender"].lower(), pattern)]
        return ids

    def administer(self, op: str, ids: list[str]) -> list[str]:
        affected = []
        for qid in ids:
            if not is_queue_id(qid) or not os.path.exists(self._spool.path("messages", qid)):
                continue
            message = self._read(qid)
            if op == "hold":
                self._save(evolve(message, held=True).with_events(Event.of(time.time(), "held")))
            elif op == "release":
                self._save(evolve(message, held=False, next_attempt=0.0).with_events(
                    Event.of(time.time(), "released")))
            elif op == "flush":
                if not message.held:
                    self._save(evolve(message, next_attempt=0.0))
            elif op == "delete":
                self._done(self._spool.remove(qid))
            elif op == "bounce":
                self._bounce(message)
                self._done(self._spool.remove(qid))
            affected.append(qid)
        return affected

    def _save(self, message: QueuedMessage) -> None:
        self._done(self._spool.defer(message))

    def _done(self, d: Any) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def _bounce(self, message: QueuedMessage) -> None:
        if not message.envelope.sender:
            return
        content = self._done(self._spool.load(message.queue_id))
        hostname = self._config.server.hostname or socket.getfqdn()
        now = time.time()
        failed = [RecipientResult(r, BOUNCED, "550 5.0.0 message returned by the administrator")
                  for r in _pending(message)]
        dsn = build_dsn(queue_id=message.queue_id, envelope=message.envelope, failed=failed,
                        content=content, reporting_mta=hostname,
                        bounce_from=self._config.server.bounce_from or f"MAILER-DAEMON@{hostname}",
                        now=now)
        envelope = Envelope(sender="", recipients=(message.envelope.sender,),
                            route=message.envelope.route, arrival=now, listener="bounce",
                            helo=hostname, smtputf8=message.envelope.smtputf8)
        writer = self._spool.open_message(envelope)
        writer.write(dsn)
        self._done(writer.commit())


class OnlineQueue:
    """The queue commands through the running daemon's control socket."""

    def __init__(self, address: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(address)
        except OSError as e:
            raise AdminError(f"the daemon holds the spool lock but its control socket "
                             f"does not answer: {e}") from e
        self._file = self._sock.makefile("rb")

    def request(self, obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._sock.sendall(json.dumps(obj).encode() + b"\n")
        for line in self._file:
            reply = json.loads(line)
            if "error" in reply:
                raise AdminError(reply["error"])
            yield reply
            if reply.get("done"):
                return
        raise AdminError("the daemon closed the control connection")


def _human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def print_entry(entry: dict[str, Any], out: TextIO, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return
    nxt = entry.get("next_attempt")
    when = f"retry in {_human_age(nxt - time.time())}" if nxt else entry["state"]
    out.write(f"{entry['id']}  {entry['state']:<8} {_human_age(entry['age']):>5} "
              f"{entry['size']:>9}  attempts={entry['attempts']}  {when}  "
              f"<{entry['sender']}>\n")
    for rcpt in entry["recipients"]:
        out.write(f"    <{rcpt}>\n")
    if entry.get("last_error"):
        out.write(f"    ({entry['last_error']})\n")


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def history_line(event: dict[str, Any]) -> str:
    """One history event as a line in the style of the mail log:
    ``2026-11-22T10:00:00Z deferred to=<b@y> route=default relay=smtp.x[1.2.3.4]:587
    (451 4.3.0 try later)``."""
    words = [_utc(event["time"]), event["event"]]
    if event["event"] == "received":
        words.append(f"from=<{event['from']}>")
        words += [f"{key}={event[name]}" for key, name in
                  (("size", "size"), ("nrcpt", "nrcpt"), ("listener", "listener"),
                   ("client", "client"), ("helo", "helo"), ("user", "user"))
                  if event.get(name) not in (None, "")]
        return " ".join(words)
    if event.get("recipients"):
        more = f" (+{event['more']} more)" if event.get("more") else ""
        words.append("to=" + ",".join(f"<{r}>" for r in event["recipients"]) + more)
    for key in ("route", "relay"):
        if event.get(key):
            words.append(f"{key}={event[key]}")
    if event.get("reply"):
        words.append(f"({event['reply']})")
    return " ".join(words)


def print_show(entry: dict[str, Any], out: TextIO, as_json: bool) -> None:
    """``relayd queue show``: the envelope, then the history in time order."""
    if as_json:
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return
    pending = set(entry["recipients"])
    nxt = entry.get("next_attempt")
    state = entry["state"] + (f", retry in {_human_age(nxt - time.time())}" if nxt else "")
    fields = [
        ("queue id", entry["id"]),
        ("state", f"{state} (attempts: {entry['attempts']})"),
        ("sender", f"<{entry['sender']}>"),
        ("recipients", ", ".join(f"<{r}>" + ("" if r in pending else " (done)")
                                 for r in entry.get("all_recipients", entry["recipients"]))),
        ("route", entry["route"]),
        ("arrival", f"{_utc(entry['arrival'])} ({_human_age(entry['age'])} ago)"),
        ("size", str(entry["size"])),
        ("listener", entry["listener"]),
        ("client", entry.get("client_address") or "-"),
        ("helo", entry.get("helo") or "-"),
        ("user", entry.get("user") or "-"),
        ("last error", entry.get("last_error") or "-"),
    ]
    for name, value in fields:
        out.write(f"{name + ':':<12} {value}\n")
    out.write("\n")
    history = entry.get("history", [])
    for i, event in enumerate(history):
        out.write(history_line(event) + "\n")
        # history[0] is the arrival, history[1] the first event kept.
        if i == 1 and entry.get("history_omitted"):
            out.write(f"... {entry['history_omitted']} more events not kept ...\n")


def run(config: Config, command: str, ids: list[str], everything: bool, sender: str | None,
        as_json: bool, out: TextIO = sys.stdout) -> int:
    """Carry out one ``relayd queue`` command; returns the exit status."""
    directory = config.server.spool
    if not os.path.isdir(os.path.join(directory, "messages")):
        raise AdminError(f"no spool at {directory}")
    become_spool_owner(directory)
    spool = Spool(directory, _WallClock(), InlineDiskWriter())  # type: ignore[arg-type]
    lock = spool.lock()
    try:
        if lock is None:
            return _online(OnlineQueue(control_socket_address(directory)), command, ids, everything,
                           sender, as_json, out)
        return _offline(OfflineQueue(config, spool), command, ids, everything, sender,
                        as_json, out)
    finally:
        if lock is not None:
            os.close(lock)


def drain(config: Config) -> None:
    """Ask the running daemon to drain (``relayd drain``)."""
    directory = config.server.spool
    if not os.path.isdir(os.path.join(directory, "messages")):
        raise AdminError(f"no spool at {directory}")
    spool = Spool(directory, _WallClock(), InlineDiskWriter())  # type: ignore[arg-type]
    lock = spool.lock()
    if lock is not None:
        os.close(lock)
        raise AdminError("relayd is not running on this spool")
    list(OnlineQueue(control_socket_address(directory)).request({"op": "drain"}))


def _online(q: OnlineQueue, command: str, ids: list[str], everything: bool,
            sender: str | None, as_json: bool, out: TextIO) -> int:
    if command == "list":
        count = 0
        for reply in q.request({"op": "list"}):
            if "message" in reply:
                print_entry(reply["message"], out, as_json)
                count += 1
        if not as_json:
            out.write(f"-- {count} message(s) in the queue\n")
        return 0
    if command == "show":
        [reply] = list(q.request({"op": "show", "id": ids[0]}))
        print_show(reply["message"], out, as_json)
        return 0
    request = {"op": command, "ids": ids, "all": everything, "sender": sender}
    for reply in q.request(request):
        if reply.get("done"):
            return _report(command, ids, reply["affected"], out)
    return 1


def _offline(q: OfflineQueue, command: str, ids: list[str], everything: bool,
             sender: str | None, as_json: bool, out: TextIO) -> int:
    if command == "list":
        count = 0
        for entry in q.listing():
            print_entry(entry, out, as_json)
            count += 1
        if not as_json:
            out.write(f"-- {count} message(s) in the queue (relayd is not running)\n")
        return 0
    if command == "show":
        print_show(q.describe(ids[0]), out, as_json)
        return 0
    affected = q.administer(command, q.select(ids, everything, sender))
    return _report(command, ids, affected, out)


def _report(command: str, ids: list[str], affected: list[str], out: TextIO) -> int:
    for qid in affected:
        out.write(f"{qid}: {command}\n")
    missing = [i for i in ids if i not in affected]
    for qid in missing:
        print(f"relayd queue {command}: {qid}: no such message in the queue", file=sys.stderr)
    return 1 if missing else 0
