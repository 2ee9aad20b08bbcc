"""One message, several routes (issue 15.2), in memory: each route's
recipients in their own transaction, each recipient's outcome its own, a
DSN naming only the failed ones, the retry only for the deferred ones."""

from __future__ import annotations

from relayd.envelope import Envelope
from relayd.errors import PermanentDeliveryError, TransientDeliveryError
from relayd.testing import LogCapture, RecordingCourier
from tests.unit.test_qmgr import NOW, make

ROUTED = Envelope(
    sender="s@example.org", route="default", arrival=NOW, listener="mta",
    recipients=("a@one.example", "b@two.example", "c@three.example", "d@one.example"),
    routes=("default", "exchange", "google", "default"),
    originals=("", "alias@uss.example.org", "", ""),
)


def queue(h, envelope: Envelope = ROUTED):  # type: ignore[no-untyped-def]
    writer = h.spool.open_message(envelope)
    writer.write(b"Subject: split\r\n\r\nbody\r\n")
    message = h.spool_result(writer.commit())
    h.qm.queued(message, None)
    return message


def test_each_route_its_own_transaction_and_outcomes() -> None:
    default = RecordingCourier(relay="default.test[192.0.2.1]:25")
    exchange = RecordingCourier([PermanentDeliveryError("550 5.7.1 relay not permitted")],
                                relay="exchange.test[192.0.2.2]:25")
    google = RecordingCourier([TransientDeliveryError("421 4.7.0 try later")],
                              relay="google.test[192.0.2.3]:25")
    h = make(couriers={"default": default, "exchange": exchange, "google": google},
             concurrencies={"default": 2, "exchange": 1, "google": 1})
    with LogCapture() as log:
        qid = queue(h).queue_id
        h.clock.advance(0)
    # One transaction per route, each with its own recipients only.
    assert [a.envelope.recipients for a in default.attempts if a.queue_id == qid] == [
        ("a@one.example", "d@one.example")]
    assert [(a.envelope.recipients, a.envelope.route) for a in exchange.attempts] == [
        (("b@two.example",), "exchange")]
    assert [a.envelope.recipients for a in google.attempts] == [("c@three.example",)]
    # Per-recipient mail log lines name their route (and their relay).
    lines = [line for line in log.lines if "to=<" in line]
    assert any("to=<a@one.example> route=default relay=default.test" in x and "status=sent" in x
               for x in lines)
    assert any("to=<b@two.example> orig_to=<alias@uss.example.org> route=exchange" in x
               and "status=bounced" in x for x in lines)
    assert any("to=<c@three.example> route=google" in x and "status=deferred" in x
               for x in lines)
    # The DSN (sent over the message's own route) names only b.
    [dsn] = [a for a in default.attempts if a.queue_id != qid]
    assert dsn.envelope.recipients == ("s@example.org",)
    assert b"b@two.example" in dsn.content and b"550 5.7.1 relay not permitted" in dsn.content
    assert b"a@one.example" not in dsn.content and b"c@three.example" not in dsn.content
    # The message waits for c only.
    entry = h.qm.state.describe(qid)
    assert entry is not None
    assert entry["recipients"] == ["c@three.example"]
    assert set(entry["done"]) == {"a@one.example", "b@two.example", "d@one.example"}
    assert h.deliveries("sent", "default") == 2  # the original's part and the DSN
    # The retry goes to google with c alone.
    h.clock.advance(61 * 1.2)
    assert [a.envelope.recipients for a in google.attempts] == [("c@three.example",)] * 2
    assert len(exchange.attempts) == 1
    assert h.qm.state.describe(qid) is None  # c went: the message is done


def test_single_other_route_and_missing_route() -> None:
    default = RecordingCourier()
    h = make(couriers={"default": default}, concurrencies={"default": 1})
    env = Envelope(sender="s@example.org", route="default", arrival=NOW,
                   recipients=("x@gone.example",), routes=("removed",))
    qid = queue(h, env).queue_id
    h.clock.advance(0)
    assert default.attempts == []  # never through the listener's route by mistake
    entry = h.qm.state.describe(qid)
    assert entry is not None and "no route named 'removed'" in entry["last_error"]
