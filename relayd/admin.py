"""``relayd queue ...``: Postfix's mailq/postqueue/postsuper for relayd.

A thin layer: every request is answered by the queue core
(``relayd.queue.state`` through ``relayd.queue.requests``) and only
printed here.  With a daemon running, requests go through its control
socket: its queue manager knows which message is in mid-delivery, so a hold
or delete can never race a delivery.  With no daemon, the same requests are
answered in this process by the same core over the spool files, under the
spool lock, so a daemon started meanwhile waits rather than reading
half-changed state.  Run as root, the commands act as the spool's owner, so
nothing in the spool ends up owned by root.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.config import Config
from relayd.diskio import InlineDiskWriter
from relayd.dsn import DSNQueue
from relayd.hostname import resolve_hostname
from relayd.queue.requests import answer
from relayd.queue.spool import Spool, control_socket_address
from relayd.queue.state import OPERATIONS, QueueState

__all__ = ["OPERATIONS", "AdminError", "LocalQueue", "OnlineQueue", "drain", "execute",
           "history_line", "print_entry", "print_show", "run"]


class AdminError(Exception):
    """A queue command that cannot be carried out; printed, exit 1."""


def become_spool_owner(spool: str) -> None:
    """As root, act as the user that owns the spool (like postsuper)."""
    if os.geteuid() != 0:
        return
    st = os.stat(spool)
    if st.st_uid == 0:
        return
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


class LocalQueue:
    """The requests answered here, by the queue core over the spool (no
    daemon runs, and we hold the spool lock).  The spool's disk work is
    inline, so every answer is complete when ``answer`` returns."""

    where = " (relayd is not running)"

    def __init__(self, config: Config, spool: Spool, clock: IReactorTime) -> None:
        bouncer = DSNQueue(spool, clock, resolve_hostname(config.server.hostname),
                           config.server.bounce_from)
        self.queue = QueueState(spool, clock, bouncer)
        _sync(self.queue.load())

    def request(self, obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
        replies: list[dict[str, Any]] = []
        d = answer(self.queue, obj, replies.append)
        if d is not None:
            _sync(d)
        for reply in replies:
            if "error" in reply:
                raise AdminError(reply["error"])
            yield reply


def _sync(d: Any) -> Any:
    """The result of a Deferred that has fired (inline disk work)."""
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise AdminError("the spool did not answer")  # pragma: no cover: inline disk
    if isinstance(out[0], Failure):
        raise AdminError(out[0].getErrorMessage())
    return out[0]


class OnlineQueue:
    """The queue commands through the running daemon's control socket."""

    where = ""

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
    when = f"retry in {_human_age(nxt - _answered_at(entry))}" if nxt else entry["state"]
    out.write(f"{entry['id']}  {entry['state']:<8} {_human_age(entry['age']):>5} "
              f"{entry['size']:>9}  attempts={entry['attempts']}  {when}  "
              f"<{entry['sender']}>\n")
    for rcpt in entry["recipients"]:
        out.write(f"    <{rcpt}>\n")
    if entry.get("last_error"):
        out.write(f"    ({entry['last_error']})\n")


def _answered_at(entry: dict[str, Any]) -> float:
    """The answering side's "now" (its clock made ``age``): retry times are
    said relative to it, so this process reads no clock of its own."""
    return float(entry["arrival"]) + float(entry["age"])


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


def _recipient(entry: dict[str, Any], rcpt: str, pending: bool) -> str:
    """``<r>``, with its route when [[routing]] chose another than the
    message's, the address it was sent to when an alias changed it, and
    whether it is done."""
    notes = []
    route = entry.get("recipient_routes", {}).get(rcpt, entry["route"])
    if route != entry["route"]:
        notes.append(f"route={route}")
    orig = entry.get("orig_to", {}).get(rcpt)
    if orig:
        notes.append(f"orig_to=<{orig}>")
    if not pending:
        notes.append("done")
    return f"<{rcpt}>" + (f" ({', '.join(notes)})" if notes else "")


def print_show(entry: dict[str, Any], out: TextIO, as_json: bool) -> None:
    """``relayd queue show``: the envelope, then the history in time order."""
    if as_json:
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return
    pending = set(entry["recipients"])
    nxt = entry.get("next_attempt")
    state = entry["state"] + (f", retry in {_human_age(nxt - _answered_at(entry))}"
                              if nxt else "")
    fields = [
        ("queue id", entry["id"]),
        ("state", f"{state} (attempts: {entry['attempts']})"),
        ("sender", f"<{entry['sender']}>"),
        ("recipients", ", ".join(_recipient(entry, r, r in pending)
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


def _spool(config: Config, clock: IReactorTime) -> Spool:
    directory = config.server.spool
    if not os.path.isdir(os.path.join(directory, "messages")):
        raise AdminError(f"no spool at {directory}")
    return Spool(directory, clock, InlineDiskWriter())


def _reactor() -> IReactorTime:
    """The default clock: the reactor, imported only when a command runs."""
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


def run(config: Config, command: str, ids: list[str], everything: bool, sender: str | None,
        as_json: bool, out: TextIO = sys.stdout, clock: IReactorTime | None = None) -> int:
    """Carry out one ``relayd queue`` command; returns the exit status.

    :param clock: the offline commands' time (of a hold, of a DSN); by
        default the reactor's.
    """
    become_spool_owner(config.server.spool)
    clock = clock or _reactor()
    spool = _spool(config, clock)
    lock = spool.lock()
    try:
        if lock is None:
            return execute(OnlineQueue(control_socket_address(spool.directory)), command, ids,
                           everything, sender, as_json, out)
        return execute(LocalQueue(config, spool, clock), command, ids, everything, sender,
                       as_json, out)
    finally:
        if lock is not None:
            os.close(lock)


def drain(config: Config, clock: IReactorTime | None = None, cancel: bool = False) -> None:
    """Ask the running daemon to drain (``relayd drain``), or to stop
    draining (``--cancel``: listen again, readiness back to 200)."""
    spool = _spool(config, clock or _reactor())
    lock = spool.lock()
    if lock is not None:
        os.close(lock)
        raise AdminError("relayd is not running on this spool")
    list(OnlineQueue(control_socket_address(spool.directory)).request(
        {"op": "drain", "cancel": cancel}))


class Channel(Protocol):
    """Where requests are answered: the daemon (``OnlineQueue``) or this
    process (``LocalQueue``)."""

    #: Said after a listing's count.
    where: str

    def request(self, obj: dict[str, Any]) -> Iterator[dict[str, Any]]: ...


def execute(q: Channel, command: str, ids: list[str], everything: bool, sender: str | None,
            as_json: bool, out: TextIO, err: TextIO | None = None) -> int:
    """One command: the same requests and printing for the daemon and for
    the spool."""
    if command == "list":
        count = 0
        for reply in q.request({"op": "list"}):
            if "message" in reply:
                print_entry(reply["message"], out, as_json)
                count += 1
        if not as_json:
            out.write(f"-- {count} message(s) in the queue{q.where}\n")
        return 0
    if command == "show":
        [reply] = list(q.request({"op": "show", "id": ids[0]}))
        print_show(reply["message"], out, as_json)
        return 0
    request = {"op": command, "ids": ids, "all": everything, "sender": sender}
    for reply in q.request(request):
        if reply.get("done"):
            return _report(command, ids, reply["affected"], out, err or sys.stderr)
    return 1


def _report(command: str, ids: list[str], affected: list[str], out: TextIO, err: TextIO) -> int:
    for qid in affected:
        out.write(f"{qid}: {command}\n")
    missing = [i for i in ids if i not in affected]
    for qid in missing:
        err.write(f"relayd queue {command}: {qid}: no such message in the queue\n")
    return 1 if missing else 0
