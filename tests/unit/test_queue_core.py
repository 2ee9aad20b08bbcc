"""One admin suite, two paths: every ``relayd queue`` case is run online (the
daemon's queue manager, asked through its control protocol) and offline
(the commands' own core over the spool files, under the lock), on two
copies of the same spool, and the two must agree: same output, same exit
status, same files left in the spool (state files and DSNs byte for byte).

The spool is real (files under tmp_path, inline disk work), the clock a
``task.Clock`` and the courier holds every attempt, so nothing here depends
on timing; the only difference left between the paths is the one the
design wants: online, a message being delivered is in flight.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relayd.admin import AdminError, LocalQueue, execute
from relayd.config import Config, parse
from relayd.control import ControlFactory
from relayd.diskio import InlineDiskWriter
from relayd.envelope import Envelope, Event, QueuedMessage
from relayd.hostname import resolve_hostname
from relayd.metrics import Metrics
from relayd.qmgr import QueueManager
from relayd.queue.schedule import RetrySchedule
from relayd.queue.spool import Spool
from relayd.queue.state import state_of
from relayd.testing import RecordingCourier, result_of

NOW = 1_700_000_000.0
LATER = NOW + 600.0
#: "Now" for the commands: a little after the spool was written.
ASKED = NOW + 5.0
CONFIG = """
[server]
spool = "{spool}"
[[listener]]
name = "mta"
listen = "tcp:2525"
route = "default"
[route.default]
maildir = "{spool}/outbox"
"""


def config_for(spool: Path) -> Config:
    return parse(CONFIG.format(spool=spool), "test.toml")


def write_spool(directory: Path) -> dict[str, str]:
    """The starting queue, by sender: one message in every state the
    commands distinguish.  Returns sender -> queue id."""
    clock = Clock()
    clock.advance(NOW)
    spool = Spool(str(directory), clock, InlineDiskWriter())
    spool.prepare()

    def put(sender: str, recipients: tuple[str, ...] = ("r@example.net",),
            **state: Any) -> str:
        envelope = Envelope(sender=sender, recipients=recipients, route="default",
                            arrival=clock.seconds(), listener="mta",
                            client_address="192.0.2.1", helo="client.test")
        writer = spool.open_message(envelope)
        writer.write(f"Subject: from {sender or 'nobody'}\r\n\r\nbody\r\n".encode())
        message: QueuedMessage = result_of(writer.commit())
        if state:
            result_of(spool.defer(attrs.evolve(message, **state)))
        clock.advance(1)
        return message.queue_id

    deferred = {"attempts": 2, "next_attempt": LATER, "last_error": "451 4.3.0 later",
                "history": (Event.of(NOW, "deferred", ("r@example.net",), "default",
                                     reply="451 4.3.0 later"),)}
    return {
        "fresh@example.org": put("fresh@example.org"),
        "deferred@example.org": put("deferred@example.org", **deferred),
        "held@example.org": put("held@example.org", held=True, attempts=1,
                                next_attempt=LATER),
        "": put("", **deferred),
        "split@example.org": put("split@example.org", ("x@example.net", "y@example.net"),
                                 done=("x@example.net",), **deferred),
    }


class InProcessDaemon:
    """The online path without a process: the queue manager the daemon runs,
    asked through the control protocol the daemon's socket speaks."""

    where = ""

    def __init__(self, config: Config, clock: Clock) -> None:
        spool = Spool(config.server.spool, clock, InlineDiskWriter())
        self.courier = RecordingCourier(hold=True)
        self.qmgr = QueueManager(
            spool, {"default": self.courier}, RetrySchedule((60.0,), 5 * 86400), clock,
            Metrics(), {"default": 10}, hostname=resolve_hostname(config.server.hostname),
            bounce_from=config.server.bounce_from)
        self.qmgr.startService()
        self.transport = StringTransport()
        self.protocol = ControlFactory(self.qmgr.state).buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def request(self, obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.transport.clear()
        self.protocol.dataReceived(json.dumps(obj).encode() + b"\n")
        for line in self.transport.value().splitlines():
            reply = json.loads(line)
            if "error" in reply:
                raise AdminError(reply["error"])
            yield reply


@attrs.frozen
class Outcome:
    """What one path did: exit status, output, and the spool afterwards."""

    status: int | str
    out: str
    err: str
    spool: dict[str, Any]


def spool_files(directory: Path) -> dict[str, Any]:
    """Every queued message as the next start would read it: envelope, state
    and, for DSNs (whose own ids are random), the content."""
    reader = Spool(str(directory), Clock(), InlineDiskWriter())
    out: dict[str, Any] = {}
    for path in sorted((directory / "messages").iterdir()):
        message: QueuedMessage = result_of(reader.read(path.name))
        data = attrs.asdict(message, recurse=True)
        if message.envelope.sender == "":
            if message.envelope.listener == "bounce":
                data["content"] = result_of(reader.load(path.name)).read()
                del data["queue_id"]
            out[f"dsn to {message.envelope.recipients}" if message.envelope.listener == "bounce"
                else message.queue_id] = data
        else:
            out[message.queue_id] = data
    return out


def run_path(path: str, directory: Path, command: str, ids: list[str] = [],  # noqa: B006
             everything: bool = False, sender: str | None = None,
             as_json: bool = True) -> Outcome:
    config = config_for(directory)
    clock = Clock()
    clock.advance(ASKED)
    lock = None
    if path == "online":
        channel: Any = InProcessDaemon(config, clock)
    else:
        spool = Spool(str(directory), clock, InlineDiskWriter())
        lock = spool.lock()
        assert lock is not None
        channel = LocalQueue(config, spool, clock)
    out, err = io.StringIO(), io.StringIO()
    try:
        status: int | str = execute(channel, command, ids, everything, sender, as_json, out, err)
    except AdminError as e:
        status = f"error: {e}"
    finally:
        if lock is not None:
            os.close(lock)
    return Outcome(status, out.getvalue(), err.getvalue(), spool_files(directory))


@pytest.fixture
def spools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[Path, Path,
                                                                                   dict[str, str]]]:
    # An unset [server] hostname on a machine whose FQDN is "localhost": the
    # one resolver falls back to gethostname(), online and offline alike.
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "fallback.test")

    def make() -> tuple[Path, Path, dict[str, str]]:
        base = tmp_path / "base"
        ids = write_spool(base)
        shutil.copytree(base, tmp_path / "online")
        shutil.copytree(base, tmp_path / "offline")
        return tmp_path / "online", tmp_path / "offline", ids

    return make


def both(spools: Callable[[], tuple[Path, Path, dict[str, str]]], command: str,
         ids: Callable[[dict[str, str]], list[str]] = lambda _: [], **kw: Any,
         ) -> tuple[Outcome, dict[str, str]]:
    """Run the case on both paths; they must agree.  Returns the outcome."""
    online_dir, offline_dir, by_sender = spools()
    online = run_path("online", online_dir, command, ids(by_sender), **kw)
    offline = run_path("offline", offline_dir, command, ids(by_sender), **kw)
    assert online == offline
    return online, by_sender


def entries(outcome: Outcome) -> dict[str, dict[str, Any]]:
    return {e["sender"]: e for e in map(json.loads, outcome.out.splitlines())}


def state(outcome: Outcome, qid: str) -> dict[str, Any]:
    return outcome.spool[qid]


# -- the cases: each is run online and offline and compared -----------------------------


def test_list(spools: Any) -> None:
    outcome, ids = both(spools, "list")
    listed = entries(outcome)
    assert {s: e["state"] for s, e in listed.items()} == {
        "fresh@example.org": "active", "deferred@example.org": "deferred",
        "held@example.org": "held", "": "deferred", "split@example.org": "deferred"}
    assert listed["deferred@example.org"]["next_attempt"] == LATER
    assert listed["held@example.org"]["next_attempt"] is None
    assert listed["split@example.org"]["recipients"] == ["y@example.net"]
    assert [e["sender"] for e in map(json.loads, outcome.out.splitlines())] == list(ids)


def test_list_human(spools: Any) -> None:
    online_dir, offline_dir, ids = spools()
    online = run_path("online", online_dir, "list", as_json=False)
    offline = run_path("offline", offline_dir, "list", as_json=False)
    assert offline.out == online.out.replace("in the queue\n",
                                             "in the queue (relayd is not running)\n")
    assert "retry in 9m" in online.out and "-- 5 message(s) in the queue\n" in online.out


def test_show(spools: Any) -> None:
    outcome, ids = both(spools, "show", lambda i: [i["deferred@example.org"]])
    shown = json.loads(outcome.out)
    assert [e["event"] for e in shown["history"]] == ["received", "deferred"]
    assert shown["state"] == "deferred" and shown["attempts"] == 2


def test_show_missing(spools: Any) -> None:
    outcome, _ = both(spools, "show", lambda i: ["F" * 20])
    assert outcome.status == f"error: no message {'F' * 20!r} in the queue"


def test_hold(spools: Any) -> None:
    outcome, ids = both(spools, "hold", lambda i: [i["deferred@example.org"]])
    qid = ids["deferred@example.org"]
    assert outcome.status == 0 and outcome.out == f"{qid}: hold\n"
    assert state(outcome, qid)["held"] is True
    assert state(outcome, qid)["history"][-1]["event"] == "held"


def test_release(spools: Any) -> None:
    outcome, ids = both(spools, "release", lambda i: [i["held@example.org"]])
    saved = state(outcome, ids["held@example.org"])
    assert (saved["held"], saved["next_attempt"]) == (False, 0.0)
    assert saved["history"][-1]["event"] == "released"


def test_flush_everything(spools: Any) -> None:
    """flush: every deferred message is due now, saved so; held ones stay held."""
    outcome, ids = both(spools, "flush", everything=True)
    for sender in ("deferred@example.org", "", "split@example.org"):
        assert state(outcome, ids[sender])["next_attempt"] == 0.0
    assert state(outcome, ids["held@example.org"])["next_attempt"] == LATER
    assert state(outcome, ids["held@example.org"])["held"] is True


def test_delete(spools: Any) -> None:
    outcome, ids = both(spools, "delete", lambda i: [i["deferred@example.org"]])
    assert ids["deferred@example.org"] not in outcome.spool and len(outcome.spool) == 4


def test_bounce_by_sender_returns_pending_recipients(spools: Any) -> None:
    """The DSN (same bytes both ways) reports only the recipients not done,
    and names the host the one resolver gives (gethostname's fallback)."""
    outcome, ids = both(spools, "bounce", sender="SPLIT@*")
    assert ids["split@example.org"] not in outcome.spool
    dsn = outcome.spool["dsn to ('split@example.org',)"]
    assert dsn["envelope"]["sender"] == "" and dsn["envelope"]["arrival"] == ASKED
    content = dsn["content"]
    assert b"Reporting-MTA: dns; fallback.test" in content
    assert b"From: Mail Delivery System <MAILER-DAEMON@fallback.test>" in content
    assert b"Final-Recipient: rfc822; y@example.net" in content
    assert b"x@example.net" not in content


def test_bounce_of_a_bounce_sends_nothing(spools: Any) -> None:
    outcome, ids = both(spools, "bounce", lambda i: [i[""]])
    assert outcome.status == 0 and ids[""] not in outcome.spool
    assert not any(key.startswith("dsn") for key in outcome.spool)


def test_missing_ids_are_named(spools: Any) -> None:
    outcome, ids = both(spools, "hold", lambda i: ["0" * 20, i["deferred@example.org"]])
    assert outcome.status == 1
    assert outcome.err == f"relayd queue hold: {'0' * 20}: no such message in the queue\n"
    assert state(outcome, ids["deferred@example.org"])["held"] is True


def test_show_after_delete_prints_the_history(spools: Any) -> None:
    """A message that left the queue is shown from the spool's journal, the same
    online and offline: state removed, its history ending in the deletion."""
    online_dir, offline_dir, ids = spools()
    qid = ids["deferred@example.org"]
    shown = []
    for path, directory in (("online", online_dir), ("offline", offline_dir)):
        assert run_path(path, directory, "delete", [qid]).status == 0
        shown.append(run_path(path, directory, "show", [qid]))
    assert shown[0] == shown[1]
    entry = json.loads(shown[0].out)
    assert entry["state"] == "removed" and entry["id"] == qid
    assert [e["event"] for e in entry["history"]] == ["received", "deferred", "deleted"]
    human = run_path("offline", offline_dir, "show", [qid], as_json=False).out
    assert "state:       removed (attempts: 2)" in human and " deleted to=<r@example.net>" in human


# -- the one intended difference ------------------------------------------------------


def test_delete_waits_for_the_attempt_in_flight_online_only(spools: Any) -> None:
    """Online the fresh message is being delivered: delete waits for that
    attempt (it may have gone), offline nothing is in flight."""
    online_dir, offline_dir, ids = spools()
    qid = ids["fresh@example.org"]
    config = config_for(online_dir)
    clock = Clock()
    clock.advance(ASKED)
    daemon = InProcessDaemon(config, clock)
    assert [a.queue_id for a in daemon.courier.pending] == [qid]
    assert execute(daemon, "delete", [qid], False, None, True, io.StringIO()) == 0
    assert qid in spool_files(online_dir)
    daemon.courier.fail_pending(Exception("smarthost went away"))
    assert qid not in spool_files(online_dir)
    assert run_path("offline", offline_dir, "delete", [qid]).spool.keys() == \
        spool_files(online_dir).keys()


def test_state_of_is_the_one_definition() -> None:
    message = QueuedMessage("0" * 20, Envelope("a@b", ("c@d",), "default", NOW))
    assert state_of(message, NOW) == "active"
    assert state_of(attrs.evolve(message, next_attempt=NOW + 1), NOW) == "deferred"
    assert state_of(attrs.evolve(message, next_attempt=NOW + 1, held=True), NOW) == "held"
