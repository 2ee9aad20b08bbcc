"""What the queue manager remembers for people: each route's last hour, the
recent deferrals (the status page) and each message's history (``relayd
queue show``), and how the history survives in the spool's state file.

In memory with ``task.Clock`` (see tests/unit/test_qmgr.py for the harness); the
state-file tests use the real ``Spool`` on a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.task import Clock

from relayd.diskio import InlineDiskWriter
from relayd.envelope import (
    BOUNCED,
    DEFERRED,
    EVENT_RECIPIENTS,
    EVENT_REPLY,
    HISTORY_KEEP,
    SENT,
    DeliveryResult,
    Event,
    QueuedMessage,
    RecipientResult,
    history_json,
)
from relayd.errors import PermanentDeliveryError, TransientDeliveryError
from relayd.qmgr import NOT_QUEUED
from relayd.queue.activity import RECENT_DEFERRALS, HourCounts
from relayd.queue.spool import Spool
from relayd.testing import HOLD, RecordingCourier, result_of
from tests.unit.test_qmgr import NOW, RELAY, envelope, make, stored

ZERO = {"sent": 0, "deferred": 0, "bounced": 0}


# -- the last hour per route -------------------------------------------------------------


def test_hour_counts_slide_by_the_minute() -> None:
    """Counts stay for sixty minutes (this one and the 59 before), then drop out."""
    counts = HourCounts()
    counts.add(NOW, SENT)
    counts.add(NOW + 1, SENT)
    counts.add(NOW + 30 * 60, DEFERRED)
    counts.add(NOW + 30 * 60, BOUNCED)
    assert counts.totals(NOW + 30 * 60) == {"sent": 2, "deferred": 1, "bounced": 1}
    minute = NOW - NOW % 60
    assert counts.totals(minute + 59 * 60 + 59) == {"sent": 2, "deferred": 1, "bounced": 1}
    assert counts.totals(minute + 60 * 60) == {"sent": 0, "deferred": 1, "bounced": 1}
    assert counts.totals(NOW + 3 * 3600) == ZERO


def test_hour_counts_memory_is_bounded_and_slots_are_reused() -> None:
    """A day of traffic, one outcome a second: still sixty buckets, and the total is
    the last hour's only."""
    counts = HourCounts()
    start = NOW - NOW % 60
    for second in range(0, 86400, 10):
        counts.add(start + second, SENT)
    assert len(counts._counts) == len(counts._minute) == 60
    # 6 a minute for the 60 minutes that end with the last one counted
    assert counts.totals(start + 86399)["sent"] == 360


def test_hour_counts_ignore_a_clock_that_went_back() -> None:
    counts = HourCounts()
    counts.add(NOW + 600, SENT)  # clock later stepped back ten minutes
    assert counts.totals(NOW) == ZERO
    counts.add(NOW, SENT)
    assert counts.totals(NOW + 600) == {"sent": 2, "deferred": 0, "bounced": 0}


def test_last_hour_counts_what_the_metrics_count() -> None:
    """sent, deferred and bounced in route_status()['last_hour'] follow
    relayd_deliveries_total, and leave the window an hour later."""
    h = make(courier=RecordingCourier([
        None, TransientDeliveryError("451 4.3.0 later"), PermanentDeliveryError("550 5.1.1 no"),
    ]))
    assert h.qm.last_hour("default") == ZERO
    h.queue()
    h.queue()
    h.queue()  # its DSN goes out through the same route: a second "sent"
    status = h.qm.route_status()["default"]
    assert status["last_hour"] == {"sent": 2, "deferred": 1, "bounced": 1}
    assert status["last_hour"] == {r: int(h.deliveries(r)) for r in ("sent", "deferred",
                                                                     "bounced")}
    assert status["last_error_reason"] == "550 5.1.1 no"
    h.clock.advance(60)  # the deferred message is retried and sent
    assert h.qm.last_hour("default") == {"sent": 3, "deferred": 1, "bounced": 1}
    h.clock.advance(3600 - 60)
    assert h.qm.last_hour("default") == {"sent": 1, "deferred": 0, "bounced": 0}
    h.clock.advance(60)
    assert h.qm.last_hour("default") == ZERO
    assert h.qm.route_status()["default"]["last_hour"] == ZERO


def test_last_hour_is_per_route() -> None:
    good, bad = RecordingCourier(), RecordingCourier(
        lambda *a: TransientDeliveryError("421 4.4.2 timeout"))
    h = make(couriers={"good": good, "bad": bad}, concurrencies={"good": 1, "bad": 1})
    h.queue(route="good")
    h.queue(route="bad")
    h.queue(route="bad")
    assert h.qm.last_hour("good") == {"sent": 1, "deferred": 0, "bounced": 0}
    assert h.qm.last_hour("bad") == {"sent": 0, "deferred": 2, "bounced": 0}
    assert h.qm.last_hour("unknown") == ZERO


# -- recent deferrals --------------------------------------------------------------------


def test_recent_deferrals_newest_first_and_bounded() -> None:
    """Each deferral: time, queue id, recipients, route, relay (when known), reason;
    only the last RECENT_DEFERRALS are kept."""
    h = make(concurrency=50, courier=RecordingCourier(
        lambda qid, env, content: TransientDeliveryError(f"451 4.3.0 busy {qid}")))
    messages = []
    for i in range(RECENT_DEFERRALS + 5):
        messages.append(h.queue(recipients=(f"r{i}@example.net",)))
        h.clock.advance(1)
    recent = h.qm.recent_deferrals()
    assert len(recent) == RECENT_DEFERRALS
    newest = messages[-1]
    assert recent[0] == {
        "time": NOW + RECENT_DEFERRALS + 4, "queue_id": newest.queue_id,
        "recipients": [f"r{RECENT_DEFERRALS + 4}@example.net"], "route": "default",
        "relay": "", "reason": f"451 4.3.0 busy {newest.queue_id}", "attempts": 1,
    }
    assert [d["queue_id"] for d in recent] == [m.queue_id for m in reversed(messages[5:])]


def test_recent_deferrals_list_a_retried_message_once() -> None:
    """A message deferred 17 times is one line (its latest deferral, attempts=17),
    and does not push the other deferred messages off the list."""
    h = make(steps=(60.0,), courier=RecordingCourier(
        lambda qid, env, content: TransientDeliveryError("451 4.3.0 busy")))
    other = h.queue(recipients=("other@example.net",))
    h.clock.advance(1)
    retried = h.queue()
    for _ in range(16):
        h.clock.advance(60)
    recent = h.qm.recent_deferrals()
    assert [(d["queue_id"], d["attempts"]) for d in recent] == [
        (retried.queue_id, 17), (other.queue_id, 17)]
    assert recent[0]["time"] == NOW + 1 + 16 * 60


def test_recent_deferral_of_some_recipients_names_them_and_the_relay() -> None:
    result = DeliveryResult(RELAY, "250 2.0.0 Ok", (
        RecipientResult("a@example.net", SENT, "250 2.1.5 Ok"),
        RecipientResult("b@example.net", DEFERRED, "452 4.2.2 mailbox full"),
    ))
    h = make(courier=RecordingCourier([result]))
    message = h.queue(recipients=("a@example.net", "b@example.net"))
    [deferral] = h.qm.recent_deferrals()
    assert (deferral["queue_id"], deferral["recipients"], deferral["relay"],
            deferral["reason"]) == (message.queue_id, ["b@example.net"], RELAY,
                                    "452 4.2.2 mailbox full")


# -- history -----------------------------------------------------------------------------


def history(h: Any, qid: str) -> list[tuple[Any, ...]]:
    return [(e.time, e.event, e.recipients, e.route, e.relay, e.reply)
            for e in h.qm.state.get(qid).history]


def test_history_of_deferrals_then_delivery() -> None:
    """Each deferral is an event in memory and in the state file; describe() shows the
    arrival first, made from the envelope."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 4.3.0 try later"),
                                       TransientDeliveryError("421 4.4.2 timeout"), HOLD]))
    message = h.queue()
    qid = message.queue_id
    h.clock.advance(60)
    expected = [
        (NOW, DEFERRED, ("r@example.net",), "default", "", "451 4.3.0 try later"),
        (NOW + 60, DEFERRED, ("r@example.net",), "default", "", "421 4.4.2 timeout"),
    ]
    assert history(h, qid) == expected
    assert [(e.time, e.event, e.reply) for e in h.spool.defers[-1].history] == [
        (t, ev, reply) for t, ev, _, _, _, reply in expected]
    shown = h.qm.state.describe(qid)
    assert shown is not None
    assert [e["event"] for e in shown["history"]] == ["received", "deferred", "deferred"]
    received = shown["history"][0]
    assert (received["time"], received["from"], received["listener"], received["client"],
            received["nrcpt"]) == (NOW, "s@example.org", "mta", "192.0.2.1", 1)
    assert shown["history"][2] == {"time": NOW + 60, "event": "deferred",
                                   "recipients": ["r@example.net"], "route": "default",
                                   "reply": "421 4.4.2 timeout"}
    assert shown["history_omitted"] == 0 and shown["all_recipients"] == ["r@example.net"]


def test_history_of_per_recipient_outcomes_groups_by_reply() -> None:
    """One event per status and reply, with the relay; bounced recipients whose DSN was
    queued say bounced."""
    result = DeliveryResult(RELAY, "250 2.0.0 Ok", (
        RecipientResult("a@example.net", SENT, "250 2.1.5 Ok"),
        RecipientResult("b@example.net", BOUNCED, "550 5.1.1 unknown"),
        RecipientResult("c@example.net", DEFERRED, "451 4.2.0 busy"),
        RecipientResult("d@example.net", DEFERRED, "451 4.2.0 busy"),
    ))
    h = make(courier=RecordingCourier([result]))
    message = h.queue(recipients=("a@example.net", "b@example.net", "c@example.net",
                                  "d@example.net"))
    assert history(h, message.queue_id) == [
        (NOW, SENT, ("a@example.net",), "default", RELAY, "250 2.1.5 Ok"),
        (NOW, BOUNCED, ("b@example.net",), "default", RELAY, "550 5.1.1 unknown"),
        (NOW, DEFERRED, ("c@example.net", "d@example.net"), "default", RELAY, "451 4.2.0 busy"),
    ]


def test_history_when_the_bounce_cannot_be_queued() -> None:
    """A 5xx whose DSN cannot be written leaves the recipient pending: deferred, saying why."""
    h = make(courier=RecordingCourier([HOLD]))
    message = h.queue()
    h.spool.fail_commit = OSError(28, "No space left on device")
    h.courier.fail_pending(PermanentDeliveryError("550 5.1.1 no such user"))
    [event] = h.qm.state.get(message.queue_id).history
    assert (event.event, event.reply) == (DEFERRED, "550 5.1.1 no such user" + NOT_QUEUED)


def test_a_delivered_message_leaves_its_history_in_the_spool() -> None:
    """Removed after delivery, the message's final state (with the sent event)
    is what the spool keeps for `relayd queue show`; a permanent failure ends
    with the bounced event, every recipient done."""
    h = make(courier=RecordingCourier([DeliveryResult(RELAY),
                                       PermanentDeliveryError("550 5.1.1 no such user")]))
    sent = h.queue()
    final = result_of(h.spool.finished(sent.queue_id))
    assert [(e.event, e.recipients, e.relay) for e in final.history] == [
        (SENT, ("r@example.net",), RELAY)]
    bounced = h.queue()
    final = result_of(h.spool.finished(bounced.queue_id))
    assert [(e.event, e.reply) for e in final.history] == [(BOUNCED, "550 5.1.1 no such user")]
    assert final.done == ("r@example.net",)
    shown = result_of(h.qm.state.show(bounced.queue_id))
    assert shown["state"] == "removed" and shown["recipients"] == []
    assert result_of(h.qm.state.show("F" * 20)) is None


def test_history_of_hold_and_release() -> None:
    h = make(courier=RecordingCourier(lambda *a: TransientDeliveryError("451 4.3.0 later")))
    message = h.queue()
    qid = message.queue_id
    result_of(h.qm.state.administer("hold", [qid]))
    h.clock.advance(10)
    result_of(h.qm.state.administer("release", [qid]))
    assert [e.event for e in h.qm.state.get(qid).history] == [
        DEFERRED, "held", "released", DEFERRED]
    assert h.qm.state.get(qid).history[2].time == NOW + 10
    assert [e.event for e in h.spool.defers[-1].history] == [
        DEFERRED, "held", "released", DEFERRED]


def test_expired_event_is_recorded_when_the_bounce_fails() -> None:
    """Expiry is an event too; it is seen when the message stays (its DSN could not
    be queued: otherwise the message is gone)."""
    h = make(courier=RecordingCourier(lambda *a: TransientDeliveryError("451 4.3.0 later")),
             lifetime=60)
    message = h.queue()
    h.spool.fail_commit = OSError(28, "No space left on device")
    h.clock.advance(60)
    events = [e.event for e in h.qm.state.get(message.queue_id).history]
    assert events[:3] == [DEFERRED, DEFERRED, "expired"]


def test_history_is_bounded_first_event_and_the_last_ones() -> None:
    """A message deferred for days keeps its first event and the last HISTORY_KEEP."""
    h = make(steps=(60.0,), courier=RecordingCourier(
        lambda qid, env, content: TransientDeliveryError(f"451 attempt {len(h.courier.attempts)}")))
    message = h.queue()
    for _ in range(HISTORY_KEEP + 20):
        h.clock.advance(60)
    kept = h.qm.state.get(message.queue_id)
    assert len(kept.history) == HISTORY_KEEP + 1
    assert kept.history_omitted == 20
    assert kept.history[0].reply == "451 attempt 1"
    assert kept.history[1].reply == "451 attempt 22"
    assert kept.history[-1].reply == f"451 attempt {HISTORY_KEEP + 21}"
    assert h.spool.defers[-1].history_omitted == 20


def test_event_bounds_recipients_and_reply() -> None:
    rcpts = [f"r{i}@example.net" for i in range(EVENT_RECIPIENTS + 3)]
    event = Event.of(NOW, DEFERRED, rcpts, "default", reply="4" * (EVENT_REPLY + 100))
    assert event.recipients == tuple(rcpts[:EVENT_RECIPIENTS]) and event.more == 3
    assert len(event.reply) == EVENT_REPLY
    assert Event.from_json(event.to_json()) == event
    assert Event.of(NOW, "held").to_json() == {"time": NOW, "event": "held"}


# -- the state file ----------------------------------------------------------------------


def real_spool(tmp_path: Path) -> Spool:
    clock = Clock()
    clock.advance(NOW)
    spool = Spool(str(tmp_path / "spool"), clock, InlineDiskWriter())
    spool.prepare()
    return spool


def commit(spool: Spool) -> QueuedMessage:
    writer = spool.open_message(envelope())
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    return result_of(writer.commit())  # type: ignore[no-any-return]


def test_history_round_trips_through_the_state_file(tmp_path: Path) -> None:
    spool = real_spool(tmp_path)
    message = commit(spool)
    events = (Event.of(NOW, DEFERRED, ["r@example.net"], "default", RELAY, "451 4.3.0 later"),
              Event.of(NOW + 60, "held"))
    changed = attrs.evolve(message.with_events(*events), attempts=1, history_omitted=3)
    result_of(spool.defer(changed))
    state = json.loads((tmp_path / "spool" / "state" / f"{message.queue_id}.json").read_text())
    assert state["history"][0] == {"time": NOW, "event": "deferred",
                                   "recipients": ["r@example.net"], "route": "default",
                                   "relay": RELAY, "reply": "451 4.3.0 later"}
    read = result_of(spool.read(message.queue_id))
    assert read.history == events and read.history_omitted == 3
    [recovered] = result_of(spool.recover())
    assert recovered == read
    assert history_json(read)[0]["event"] == "received"


def test_state_file_without_history_still_loads(tmp_path: Path) -> None:
    """A state file written before there were histories (same format version)."""
    spool = real_spool(tmp_path)
    message = commit(spool)
    (tmp_path / "spool" / "state" / f"{message.queue_id}.json").write_text(json.dumps(
        {"attempts": 2, "next_attempt": NOW + 60, "last_error": "451 later", "held": False,
         "done": []}))
    read = result_of(spool.read(message.queue_id))
    assert (read.attempts, read.last_error, read.history, read.history_omitted) == (
        2, "451 later", (), 0)
    assert [m.queue_id for m in result_of(spool.recover())] == [message.queue_id]


def test_unreadable_history_entries_are_skipped_not_fatal(tmp_path: Path) -> None:
    """A history is for people: a bad entry must not send the message to corrupt/."""
    spool = real_spool(tmp_path)
    message = commit(spool)
    (tmp_path / "spool" / "state" / f"{message.queue_id}.json").write_text(json.dumps(
        {"attempts": 1, "history": [{"event": "deferred"}, "junk",
                                    {"time": NOW, "event": "held"}]}))
    [recovered] = result_of(spool.recover())
    assert recovered.history == (Event(NOW, "held"),)
    (tmp_path / "spool" / "state" / f"{message.queue_id}.json").write_text(json.dumps(
        {"attempts": 1, "history": {"not": "a list"}}))
    assert result_of(spool.read(message.queue_id)).history == ()


def test_recovered_history_continues(tmp_path: Path) -> None:
    """After a restart, new events are added to the ones read back."""
    old = stored(attempts=1, next_attempt=NOW - 1).with_events(
        Event.of(NOW - 60, DEFERRED, ["r@example.net"], "default", reply="451 before"))
    h = make(preload=[(old, b"x\r\n")],
             courier=RecordingCourier([TransientDeliveryError("451 after")]))
    assert [e.reply for e in h.qm.state.get(old.queue_id).history] == ["451 before", "451 after"]
