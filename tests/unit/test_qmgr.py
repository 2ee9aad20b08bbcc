"""The queue manager: when a message is tried, what a courier's verdict does.

Everything is in memory (``MemorySpool``, ``RecordingCourier``) and time is
a ``task.Clock``, so each test states exactly which attempts happen when.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayd import qmgr as qmgr_module
from relayd.envelope import (
    BOUNCED,
    DEFERRED,
    SENT,
    DeliveryResult,
    Envelope,
    QueuedMessage,
    RecipientResult,
    new_queue_id,
)
from relayd.errors import PermanentDeliveryError, TransientDeliveryError
from relayd.interfaces import ICourier, IRetryPolicy, ISpool
from relayd.metrics import Metrics
from relayd.qmgr import QueueManager
from relayd.queue.schedule import RetrySchedule
from relayd.testing import HOLD, LogCapture, MemorySpool, RecordingCourier, sample

NOW = 1_700_000_000.0
STEPS = (60.0, 300.0, 900.0)
RELAY = "fake.test[192.0.2.25]:25"


def envelope(route: str = "default", recipients: tuple[str, ...] = ("r@example.net",),
             arrival: float = NOW) -> Envelope:
    return Envelope(sender="s@example.org", recipients=recipients, route=route, arrival=arrival,
                    listener="mta", client_address="192.0.2.1")


@attrs.define
class Harness:
    qm: QueueManager
    spool: MemorySpool
    courier: RecordingCourier
    clock: Clock
    metrics: Metrics

    def queue(self, content: bytes = b"Subject: x\r\n\r\nbody\r\n", keep: bool = True,
              **kw: Any) -> QueuedMessage:
        """Commit a message to the spool and tell the queue manager, as cleanup does."""
        writer = self.spool.open_message(envelope(**kw))
        writer.write(content)
        message = self.spool_result(writer.commit())
        self.qm.queued(message, content if keep else None)
        return message

    @staticmethod
    def spool_result(d: Any) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        assert out and not hasattr(out[0], "raiseException"), out
        return out[0]

    def deliveries(self, result: str, route: str = "default") -> float:
        return sample(self.metrics, "relayd_deliveries_total", {"route": route, "result": result})

    @property
    def tried(self) -> list[str]:
        return [a.queue_id for a in self.courier.attempts]


def make(
    concurrency: int = 2,
    steps: tuple[float, ...] = STEPS,
    lifetime: float = 5 * 86400,
    courier: RecordingCourier | None = None,
    couriers: dict[str, Any] | None = None,
    concurrencies: dict[str, int] | None = None,
    preload: list[tuple[QueuedMessage, bytes]] = (),  # type: ignore[assignment]
    start: bool = True,
    **kw: Any,
) -> Harness:
    clock = Clock()
    clock.advance(NOW)
    spool = MemorySpool(clock)
    for message, content in preload:
        spool.add(message, content)
    courier = courier if courier is not None else RecordingCourier()
    metrics = Metrics()
    qm = QueueManager(
        spool,
        couriers if couriers is not None else {"default": courier},
        RetrySchedule(steps, lifetime),
        clock,
        metrics,
        concurrencies if concurrencies is not None else {"default": concurrency},
        hostname="relay.test",
        **kw,
    )
    if start:
        qm.startService()
    return Harness(qm, spool, courier, clock, metrics)


def stored(queue_id: str | None = None, arrival: float = NOW, **state: Any) -> QueuedMessage:
    """A message as an earlier run left it in the spool."""
    return QueuedMessage(queue_id or new_queue_id(arrival), envelope(arrival=arrival), **state)


# -- the fakes themselves ------------------------------------------------------------


def test_fakes_provide_their_interfaces() -> None:
    """MemorySpool, RecordingCourier and RetrySchedule implement the seams qmgr drives."""
    assert verifyObject(ISpool, MemorySpool())
    assert verifyObject(ICourier, RecordingCourier())
    assert verifyObject(IRetryPolicy, RetrySchedule(STEPS, 3600))


def test_recording_courier_scripts_outcomes() -> None:
    """Outcomes are consumed in order; HOLD keeps an attempt pending until released."""
    courier = RecordingCourier([TransientDeliveryError("451 later"), HOLD,
                                DeliveryResult("x", "250 fine")])
    env = envelope()
    out: list[Any] = []
    for i in range(4):
        courier.deliver(f"Q{i}", env, b"c%d" % i).addBoth(out.append)
    assert out[0].check(TransientDeliveryError)
    assert out[1:] == [DeliveryResult("x", "250 fine"), DeliveryResult(RELAY)]
    assert [a.content for a in courier.pending] == [b"c1"]
    courier.release()
    assert out[-1] == DeliveryResult(RELAY) and courier.pending == []
    assert [(a.queue_id, a.envelope) for a in courier.attempts] == [(f"Q{i}", env) for i in range(4)]


def test_memory_spool_failure_knobs() -> None:
    """MemorySpool fails the operations it is told to, and records every call."""
    spool = MemorySpool()
    writer = spool.open_message(envelope())
    writer.write(b"x")
    spool.fail_commit = OSError(28, "No space left on device")
    out: list[Any] = []
    writer.commit().addBoth(out.append)
    assert out[0].check(OSError) and len(spool) == 0
    spool.fail_commit = None
    message = spool.add(stored(), b"content")
    spool.fail_load = spool.fail_defer = spool.fail_remove = OSError(5, "I/O error")
    for d in (spool.load(message.queue_id), spool.defer(message), spool.remove(message.queue_id)):
        d.addBoth(out.append)
    assert all(f.check(OSError) for f in out[1:])
    assert (spool.loads, spool.removes, spool.defers) == (
        [message.queue_id], [message.queue_id], [message])
    assert len(spool) == 1


# -- success ---------------------------------------------------------------------------


def test_delivered_removed_counted_and_logged() -> None:
    """A queued message is delivered, removed, counted as sent, and logged per recipient."""
    h = make()
    with LogCapture() as log:
        message = h.queue(recipients=("one@example.net", "two@example.net"))
    qid = message.queue_id
    [attempt] = h.courier.attempts
    assert (attempt.queue_id, attempt.envelope) == (qid, message.envelope)
    assert attempt.content == b"Subject: x\r\n\r\nbody\r\n"
    assert len(h.spool) == 0 and h.spool.removes == [qid]
    assert len(h.qm) == 0
    assert h.deliveries("sent") == 1
    assert h.deliveries("deferred") == 0
    assert sample(h.metrics, "relayd_delivery_seconds_count", {"route": "default"}) == 1
    assert log.lines == [
        f"{qid}: to=<one@example.net> route=default relay={RELAY} delay=0.00 "
        "status=sent (250 2.0.0 Ok)",
        f"{qid}: to=<two@example.net> route=default relay={RELAY} delay=0.00 "
        "status=sent (250 2.0.0 Ok)",
        f"{qid}: removed",
    ]
    assert all(e["log_namespace"] == "relayd.mail" and e["queue_id"] == qid for e in log.events)


def test_delay_and_reply_in_log() -> None:
    """delay= is the time since arrival; the courier's relay and reply are quoted."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    h.clock.advance(1.5)
    with LogCapture() as log:
        h.courier.release(result=DeliveryResult("maildir:/out", "250 2.0.0 Ok: delivered as F"))
    assert log.lines[0] == (
        f"{message.queue_id}: to=<r@example.net> route=default relay=maildir:/out delay=1.50 "
        "status=sent (250 2.0.0 Ok: delivered as F)"
    )
    assert h.qm.route_status()["default"]["last_success"] == NOW + 1.5


def test_conn_use_is_logged_for_a_reused_connection_only() -> None:
    """Postfix's conn_use=N: the N-th transaction on a cached connection."""
    h = make(courier=RecordingCourier(hold=True))
    first, second = h.queue(), h.queue()
    with LogCapture() as log:
        h.courier.release(result=DeliveryResult("mx.test[192.0.2.1]:25", conn_use=1))
        h.courier.release(result=DeliveryResult("mx.test[192.0.2.1]:25", conn_use=3))
    sent = [line for line in log.lines if "status=sent" in line]
    assert sent == [
        f"{first.queue_id}: to=<r@example.net> route=default relay=mx.test[192.0.2.1]:25 "
        "delay=0.00 status=sent (250 2.0.0 Ok)",
        f"{second.queue_id}: to=<r@example.net> route=default relay=mx.test[192.0.2.1]:25 "
        "conn_use=3 delay=0.00 status=sent (250 2.0.0 Ok)",
    ]


def test_content_in_memory_is_used_without_load() -> None:
    """Content handed over by cleanup goes straight to the courier; None is read back."""
    h = make()
    kept = h.queue(b"in memory\r\n")
    assert h.spool.loads == []
    loaded = h.queue(b"on disk\r\n", keep=False)
    assert h.spool.loads == [loaded.queue_id]
    assert [(a.queue_id, a.content) for a in h.courier.attempts] == [
        (kept.queue_id, b"in memory\r\n"), (loaded.queue_id, b"on disk\r\n"),
    ]


def test_content_beyond_memory_budget_is_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CONTENT_MEMORY_BUDGET bytes of waiting content, content is dropped and
    loaded later (each message here is 4 bytes: two fit in 8 while one is tried)."""
    monkeypatch.setattr(qmgr_module, "CONTENT_MEMORY_BUDGET", 8)
    h = make(concurrency=1, courier=RecordingCourier(hold=True))
    messages = [h.queue(b"m%d\r\n" % i) for i in range(4)]
    for _ in range(4):
        h.courier.release()
    assert h.spool.loads == [messages[3].queue_id]
    assert [a.content for a in h.courier.attempts] == [b"m%d\r\n" % i for i in range(4)]
    assert len(h.spool) == 0


def test_remove_failure_after_delivery_forgets_message() -> None:
    """Delivered but not removable: no crash, the message is forgotten, the queue goes on."""
    h = make()
    h.spool.fail_remove = OSError(13, "Permission denied")
    with LogCapture(namespace=None) as log:
        first = h.queue()
        second = h.queue()
    assert h.tried == [first.queue_id, second.queue_id]
    assert len(h.qm) == 0
    assert h.qm.counts() == {"active": 0, "deferred": 0, "held": 0}
    assert h.deliveries("sent") == 2
    assert any("done but not removed" in line for line in log.lines)
    h.clock.advance(10 * 86400)
    assert len(h.courier.attempts) == 2


# -- deferral and retry ------------------------------------------------------------


def test_transient_failure_defers_with_first_step() -> None:
    """451: defer() saves attempts=1, next_attempt=now+60, the reply; counted and logged."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 4.3.0 try later")]))
    with LogCapture() as log:
        message = h.queue()
    qid = message.queue_id
    [saved] = h.spool.defers
    assert (saved.queue_id, saved.attempts, saved.next_attempt, saved.last_error, saved.held) == (
        qid, 1, NOW + 60, "451 4.3.0 try later", False)
    assert h.spool.messages[qid].attempts == 1
    assert h.deliveries("deferred") == 1 and h.deliveries("sent") == 0
    assert log.lines == [
        f"{qid}: to=<r@example.net> route=default delay=0.00 status=deferred "
        "(451 4.3.0 try later)"
    ]
    assert h.qm.counts() == {"active": 0, "deferred": 1, "held": 0}
    status = h.qm.route_status()["default"]
    assert (status["last_error"], status["last_error_reason"]) == (NOW, "451 4.3.0 try later")


def test_not_retried_before_delay_retried_after() -> None:
    """Nothing happens until the step has passed; then the retry reads the spool and delivers."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")]))
    message = h.queue()
    h.clock.advance(59.999)
    assert len(h.courier.attempts) == 1
    h.clock.advance(0.001)
    assert h.tried == [message.queue_id] * 2
    assert h.spool.loads == [message.queue_id]
    assert h.courier.attempts[1].content == h.courier.attempts[0].content
    assert len(h.spool) == 0 and len(h.qm) == 0
    assert h.qm.counts() == {"active": 0, "deferred": 0, "held": 0}


def test_schedule_steps_then_last_step_repeats() -> None:
    """Successive deferrals wait 60, 300, 900, then 900 again and again."""
    h = make(courier=RecordingCourier(lambda q, e, c: TransientDeliveryError("451 busy")))
    h.queue()
    waits = []
    for _ in range(6):
        saved = h.spool.defers[-1]
        waits.append(saved.next_attempt - h.clock.seconds())
        h.clock.advance(saved.next_attempt - h.clock.seconds())
    assert waits == [60.0, 300.0, 900.0, 900.0, 900.0, 900.0]
    assert [m.attempts for m in h.spool.defers] == [1, 2, 3, 4, 5, 6, 7]
    assert h.deliveries("deferred") == 7


def test_retry_schedule_arithmetic() -> None:
    """next_delay follows the steps, clamps at both ends; expired() measures from arrival."""
    schedule = RetrySchedule((60.0, 300.0), 3600.0)
    assert [schedule.next_delay(n) for n in (0, 1, 2, 3, 50)] == [60.0, 60.0, 300.0, 300.0, 300.0]
    assert not schedule.expired(NOW, NOW + 3599.9)
    assert schedule.expired(NOW, NOW + 3600)


def test_unexpected_exception_defers_and_queue_goes_on() -> None:
    """A courier bug (raised or as a failed Deferred) defers that message; others go out."""
    def outcome(queue_id: str, env: Envelope, content: bytes) -> Any:
        if content == b"raise\r\n":
            raise RuntimeError("courier bug")
        if content == b"fail\r\n":
            return fail(ValueError("bad value"))
        return None

    h = make(concurrency=1, courier=RecordingCourier(outcome))
    with LogCapture(namespace=None) as log:
        raising = h.queue(b"raise\r\n")
        failing = h.queue(b"fail\r\n")
        fine = h.queue(b"fine\r\n")
    assert h.tried == [raising.queue_id, failing.queue_id, fine.queue_id]
    assert [(m.queue_id, m.attempts, m.next_attempt, m.held) for m in h.spool.defers] == [
        (raising.queue_id, 1, NOW + 60, False), (failing.queue_id, 1, NOW + 60, False)]
    assert h.spool.defers[0].last_error == "local error: courier bug"
    assert h.spool.defers[1].last_error == "local error: bad value"
    assert fine.queue_id not in h.spool.messages
    assert h.qm.counts() == {"active": 0, "deferred": 2, "held": 0}
    assert any("courier bug" in line or "delivery attempt failed" in line for line in log.lines)
    h.clock.advance(60)
    assert h.tried[3:] == [raising.queue_id, failing.queue_id]


def test_load_failure_defers() -> None:
    """Content that cannot be read back is a local, transient problem."""
    h = make()
    h.spool.fail_load = OSError(5, "Input/output error")
    message = h.queue(keep=False)
    assert h.courier.attempts == []
    [saved] = h.spool.defers
    assert (saved.attempts, saved.held) == (1, False)
    assert saved.last_error is not None and "Input/output error" in saved.last_error
    h.spool.fail_load = None
    h.clock.advance(60)
    assert h.tried == [message.queue_id] and len(h.spool) == 0


def test_defer_failure_still_retries() -> None:
    """State that cannot be saved is logged; the retry timer still runs."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")]))
    h.spool.fail_defer = OSError(28, "No space left on device")
    with LogCapture(namespace=None) as log:
        message = h.queue()
    assert any("cannot save queue state" in line for line in log.lines)
    assert h.qm.counts()["deferred"] == 1
    h.clock.advance(60)
    assert h.tried == [message.queue_id] * 2 and len(h.qm) == 0


def test_missing_courier_defers() -> None:
    """A route without a courier (config changed under a queued message) defers it."""
    h = make(couriers={}, concurrencies={})
    with LogCapture() as log:
        message = h.queue(route="gone")
    [saved] = h.spool.defers
    assert saved.queue_id == message.queue_id and saved.held is False
    assert saved.last_error is not None and "gone" in saved.last_error
    assert h.deliveries("deferred", route="gone") == 1
    assert "status=deferred" in log.lines[0] and "route=gone" in log.lines[0]
    assert h.qm.counts() == {"active": 0, "deferred": 1, "held": 0}


def test_jitter_spreads_the_delay() -> None:
    """With jitter, the delay is scaled by up to +-jitter using the injected rng."""
    for rng_value, expected in ((0.0, 54.0), (0.5, 60.0), (1.0, 66.0)):
        h = make(jitter=0.1, rng=lambda v=rng_value: v,
                 courier=RecordingCourier([TransientDeliveryError("451 busy")]))
        h.queue()
        assert h.spool.defers[-1].next_attempt == pytest.approx(NOW + expected)
        [call] = h.clock.getDelayedCalls()
        assert call.getTime() == pytest.approx(NOW + expected)


def test_message_past_lifetime_bounces() -> None:
    """A failure after the lifetime is up ends the retries: DSN with the last reply verbatim."""
    h = make(steps=(60.0,), lifetime=300.0,
             courier=RecordingCourier(lambda q, e, c: TransientDeliveryError("451 4.4.1 busy")
                                      if e.sender else None))
    with LogCapture() as log:
        message = h.queue()
        h.clock.pump([60.0] * 20)
    qid = message.queue_id
    original = [a for a in h.courier.attempts if a.queue_id == qid]
    assert [a.queue_id for a in original] == [qid] * 6  # at 0, 60, ..., 300
    [dsn] = [a for a in h.courier.attempts if a.queue_id != qid]
    assert (dsn.envelope.sender, dsn.envelope.recipients) == ("", ("s@example.org",))
    assert b"Status: 4.4.1" in dsn.content and b"Diagnostic-Code: smtp; 451 4.4.1 busy" in dsn.content
    assert len(h.spool) == 0 and len(h.qm) == 0
    assert f"{qid}: to=<r@example.net> route=default status=expired (451 4.4.1 busy)" in log.lines
    assert h.deliveries("deferred") == 5 and h.deliveries("bounced") == 1


# -- permanent failure ---------------------------------------------------------------


def test_permanent_failure_bounces_to_sender() -> None:
    """5xx: logged as bounced, a DSN goes to the sender, the original is removed, never retried."""
    h = make(courier=RecordingCourier([PermanentDeliveryError("550 5.1.1 no such user")]))
    with LogCapture() as log:
        message = h.queue(recipients=("r@example.net", "q@example.net"))
    qid = message.queue_id
    original, dsn = h.courier.attempts
    assert original.queue_id == qid
    assert (dsn.envelope.sender, dsn.envelope.recipients, dsn.envelope.route) == (
        "", ("s@example.org",), "default")
    assert b"550 5.1.1 no such user" in dsn.content
    assert b"multipart/report" in dsn.content and b"r@example.net" in dsn.content
    assert h.spool.defers == []
    assert qid in h.spool.removes and len(h.spool) == 0 and len(h.qm) == 0
    assert log.lines[:2] == [
        f"{qid}: to=<r@example.net> route=default delay=0.00 status=bounced "
        "(550 5.1.1 no such user)",
        f"{qid}: to=<q@example.net> route=default delay=0.00 status=bounced "
        "(550 5.1.1 no such user)",
    ]
    assert f"{qid}: sender non-delivery notification: {dsn.queue_id}" in log.lines
    assert h.deliveries("bounced") == 1
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(30 * 86400)
    assert len(h.courier.attempts) == 2


def test_bounce_of_a_bounce_is_not_sent() -> None:
    """A failing message from the null sender is dropped without a DSN (no bounce loops)."""
    h = make(courier=RecordingCourier([PermanentDeliveryError("550 5.1.1 gone")]))
    writer = h.spool.open_message(attrs.evolve(envelope(), sender=""))
    writer.write(b"x\r\n")
    message = h.spool_result(writer.commit())
    with LogCapture() as log:
        h.qm.queued(message, b"x\r\n")
    assert h.tried == [message.queue_id]
    assert f"{message.queue_id}: bounce of a bounce not sent (null sender)" in log.lines
    assert len(h.spool) == 0 and len(h.qm) == 0


def test_per_recipient_outcomes() -> None:
    """Sent, bounced and deferred recipients: DSN for the bounced, retry only the deferred."""
    result = DeliveryResult(RELAY, "250 2.0.0 Ok", (
        RecipientResult("a@example.net", SENT, "250 2.1.5 Ok"),
        RecipientResult("b@example.net", BOUNCED, "550 5.1.1 unknown"),
        RecipientResult("c@example.net", DEFERRED, "451 4.2.0 mailbox busy"),
    ))
    h = make(courier=RecordingCourier([result]))
    with LogCapture() as log:
        message = h.queue(recipients=("a@example.net", "b@example.net", "c@example.net"))
    qid = message.queue_id
    assert [line.split(" status=")[1] for line in log.lines if "to=<" in line][:3] == [
        "sent (250 2.1.5 Ok)", "bounced (550 5.1.1 unknown)", "deferred (451 4.2.0 mailbox busy)"]
    dsn = h.courier.attempts[1]
    assert dsn.envelope.sender == "" and b"550 5.1.1 unknown" in dsn.content
    assert b"b@example.net" in dsn.content and b"a@example.net" not in dsn.content.split(
        b"text/rfc822-headers")[0]
    [saved] = h.spool.defers
    assert (saved.queue_id, saved.attempts, saved.done) == (
        qid, 1, ("a@example.net", "b@example.net"))
    assert saved.last_error == "451 4.2.0 mailbox busy"
    assert h.spool.messages[qid].done == ("a@example.net", "b@example.net")
    h.clock.advance(60)
    retry = h.courier.attempts[2]
    assert retry.queue_id == qid and retry.envelope.recipients == ("c@example.net",)
    assert len(h.spool) == 0
    assert (h.deliveries("sent"), h.deliveries("bounced"), h.deliveries("deferred")) == (3, 1, 1)


def test_recovered_message_retries_only_pending_recipients() -> None:
    """After a restart, recipients already done are not delivered again."""
    old = QueuedMessage(new_queue_id(NOW), envelope(recipients=("a@x.test", "b@x.test")),
                        attempts=1, next_attempt=NOW - 1, done=("a@x.test",))
    h = make(preload=[(old, b"x\r\n")])
    [attempt] = h.courier.attempts
    assert attempt.envelope.recipients == ("b@x.test",)
    assert len(h.spool) == 0


def test_bounce_that_cannot_be_queued_is_retried_later() -> None:
    """A DSN that cannot be written now (disk full) is tried again later, not forgotten."""
    calls = []

    def outcome(queue_id: str, env: Envelope, content: bytes) -> Any:
        calls.append(queue_id)
        if len(calls) == 1:
            return HOLD
        return PermanentDeliveryError("550 5.1.1 no such user") if env.sender else None

    h = make(courier=RecordingCourier(outcome))
    message = h.queue()
    h.spool.fail_commit = OSError(28, "No space left on device")
    with LogCapture(namespace=None):
        h.courier.fail_pending(PermanentDeliveryError("550 5.1.1 no such user"))
    assert message.queue_id in h.spool.messages  # not lost
    assert h.clock.getDelayedCalls(), "nothing will ever try this message again"
    h.spool.fail_commit = None
    h.clock.advance(86400)
    assert message.queue_id not in h.spool.messages
    assert any(a.envelope.sender == "" for a in h.courier.attempts)


# -- concurrency ---------------------------------------------------------------------


def test_per_route_concurrency() -> None:
    """With concurrency 2 only two attempts are in flight; the third starts when one ends."""
    h = make(concurrency=2, courier=RecordingCourier(hold=True))
    messages = [h.queue() for _ in range(3)]
    assert h.tried == [m.queue_id for m in messages[:2]]
    assert len(h.courier.pending) == 2
    assert h.qm.counts()["active"] == 3
    h.courier.release(1)
    assert h.tried == [m.queue_id for m in messages]
    assert len(h.courier.pending) == 2
    h.courier.fail_pending(TransientDeliveryError("451 later"))
    h.courier.release()
    assert h.courier.pending == []
    assert h.qm.counts() == {"active": 0, "deferred": 1, "held": 0}


def test_concurrency_is_never_exceeded_with_a_backlog() -> None:
    """Many queued messages, released in any order: never more than the limit in flight."""
    h = make(concurrency=3, courier=RecordingCourier(hold=True))
    messages = [h.queue() for _ in range(20)]
    most = 0
    while h.courier.pending:
        most = max(most, len(h.courier.pending))
        h.courier.release(len(h.courier.pending) - 1)
    assert most == 3
    assert sorted(h.tried) == sorted(m.queue_id for m in messages)
    assert len(h.spool) == 0


def test_routes_are_independent() -> None:
    """A route stuck at its limit does not hold up another route."""
    slow = RecordingCourier(hold=True)
    fast = RecordingCourier()
    h = make(couriers={"slow": slow, "fast": fast}, concurrencies={"slow": 1, "fast": 1})
    stuck = [h.queue(route="slow") for _ in range(2)]
    through = [h.queue(route="fast") for _ in range(3)]
    assert [a.queue_id for a in slow.attempts] == [stuck[0].queue_id]
    assert [a.queue_id for a in fast.attempts] == [m.queue_id for m in through]
    slow.release()
    assert [a.queue_id for a in slow.attempts] == [m.queue_id for m in stuck]


def test_route_without_concurrency_setting_gets_one() -> None:
    """A route missing from the concurrency map delivers one at a time."""
    courier = RecordingCourier(hold=True)
    h = make(couriers={"other": courier}, concurrencies={})
    h.queue(route="other")
    h.queue(route="other")
    assert len(courier.pending) == 1


# -- recovery --------------------------------------------------------------------------


def test_recovered_messages_by_next_attempt_and_hold() -> None:
    """After a restart: due messages go at once, future ones wait, held ones stay put."""
    due = stored(arrival=NOW - 500, attempts=2, next_attempt=NOW - 5)
    never_tried = stored(arrival=NOW - 400)
    later = stored(arrival=NOW - 300, attempts=1, next_attempt=NOW + 100)
    held = stored(arrival=NOW - 200, attempts=1, held=True, last_error="550 no",
                  next_attempt=NOW + 50)
    preload = [(due, b"due\r\n"), (never_tried, b"new\r\n"), (later, b"later\r\n"),
               (held, b"held\r\n")]
    with LogCapture(namespace="relayd.qmgr") as log:
        h = make(courier=RecordingCourier(hold=True), preload=preload)
    assert log.lines == ["recovered 4 queued messages"]
    assert h.qm.recovered is not None and h.qm.recovered.called
    assert h.tried == [due.queue_id, never_tried.queue_id]
    assert [a.content for a in h.courier.attempts] == [b"due\r\n", b"new\r\n"]
    assert h.spool.loads == [due.queue_id, never_tried.queue_id]
    assert h.qm.counts() == {"active": 2, "deferred": 1, "held": 1}
    assert h.qm.oldest_age() == 500
    h.courier.release()
    h.courier.release()
    h.clock.advance(99)
    assert len(h.courier.attempts) == 2
    h.clock.advance(1)
    assert h.tried[2:] == [later.queue_id]
    h.courier.release()
    h.clock.advance(30 * 86400)
    assert held.queue_id not in h.tried
    assert list(h.spool.messages) == [held.queue_id]
    assert h.qm.counts() == {"active": 0, "deferred": 0, "held": 1}


def test_recovered_retry_continues_the_count() -> None:
    """A recovered message that fails again goes on from its saved attempt count."""
    old = stored(attempts=2, next_attempt=NOW - 1)
    h = make(preload=[(old, b"x\r\n")],
             courier=RecordingCourier([TransientDeliveryError("451 busy")]))
    [saved] = h.spool.defers
    assert (saved.attempts, saved.next_attempt) == (3, NOW + 900)


def test_recovery_failure_is_logged_not_raised() -> None:
    """An unreadable spool at start is logged; the service still runs for new mail."""
    h = make(start=False)
    h.spool.fail_recover = OSError(13, "Permission denied")
    with LogCapture(namespace="relayd.qmgr") as log:
        h.qm.startService()
    assert any("spool recovery failed" in line for line in log.lines)
    h.queue()
    assert len(h.courier.attempts) == 1


# -- stopping -----------------------------------------------------------------------------


def test_stop_cancels_timers_and_starts_nothing() -> None:
    """stopService cancels retry timers; nothing queued or due afterwards is tried."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")], hold=True))
    deferred = h.queue()
    in_flight = h.queue()
    assert len(h.clock.getDelayedCalls()) == 1
    stopped: list[Any] = []
    h.qm.stopService().addBoth(stopped.append)
    assert stopped == []  # waits for the attempt in flight
    assert [c.getTime() - NOW for c in h.clock.getDelayedCalls()] == [30.0]  # its bound
    h.queue()
    h.courier.fail_pending(TransientDeliveryError("451 still busy"))
    assert h.spool.defers[-1].queue_id == in_flight.queue_id  # state still saved
    assert stopped == [None]
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(86400)
    assert h.tried == [deferred.queue_id, in_flight.queue_id]


def test_stop_lets_in_flight_delivery_finish() -> None:
    """An attempt in flight at stop still completes and removes its message."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    h.qm.stopService()
    h.courier.release()
    assert message.queue_id not in h.spool.messages and len(h.qm) == 0


def test_stop_gives_up_waiting_after_stop_timeout() -> None:
    """A smarthost that never answers cannot hold the stop longer than the bound;
    the message stays in the spool for the next start."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    h.qm.stop_timeout = 10
    stopped: list[Any] = []
    h.qm.stopService().addBoth(stopped.append)
    h.clock.advance(9.9)
    assert stopped == []
    h.clock.advance(0.1)
    assert stopped == [None]
    assert message.queue_id in h.spool.messages


def test_stop_with_nothing_in_flight_is_immediate() -> None:
    h = make()
    stopped: list[Any] = []
    h.qm.stopService().addBoth(stopped.append)
    assert stopped == [None]


# -- reload -------------------------------------------------------------------------------


def test_set_routes_new_attempts_use_the_new_courier_in_flight_ones_finish_on_the_old() -> None:
    old = RecordingCourier(hold=True)
    h = make(courier=old, concurrency=1)
    first = h.queue()
    second = h.queue()  # waits: concurrency 1
    new = RecordingCourier()
    h.qm.set_routes({"default": new}, {"default": 1})
    old.release()
    assert first.queue_id not in h.spool.messages
    assert [a.queue_id for a in new.attempts] == [second.queue_id]
    assert second.queue_id not in h.spool.messages


def test_set_routes_raising_concurrency_starts_waiting_messages_at_once() -> None:
    courier = RecordingCourier(hold=True)
    h = make(courier=courier, concurrency=1)
    h.queue()
    h.queue()
    h.queue()
    assert len(courier.pending) == 1
    h.qm.set_routes({"default": courier}, {"default": 3})
    assert len(courier.pending) == 3


def test_set_routes_without_a_route_defers_its_messages() -> None:
    h = make()
    h.qm.set_routes({}, {})
    message = h.queue()
    assert message.queue_id in h.spool.messages
    assert h.qm.counts()["deferred"] == 1
    assert "no route named 'default'" in (h.qm.state.describe(message.queue_id) or {}).get(
        "last_error", "")


# -- views --------------------------------------------------------------------------------


def test_counts_oldest_age_and_metrics() -> None:
    """counts(), oldest_age() and update_metrics() describe the queue by state."""
    held = stored(arrival=NOW - 40, attempts=1, held=True)
    h = make(concurrency=1, preload=[(held, b"x\r\n")],
             courier=RecordingCourier([TransientDeliveryError("451"), HOLD, HOLD]))
    assert h.qm.counts() == {"active": 0, "deferred": 0, "held": 1}
    h.queue(arrival=NOW - 30)
    h.queue(arrival=NOW - 20)
    h.queue(arrival=NOW)
    h.clock.advance(5)
    assert h.qm.counts() == {"active": 2, "deferred": 1, "held": 1}
    assert len(h.qm) == 4
    assert h.qm.oldest_age() == 45
    h.qm.update_metrics()
    for state, value in {"active": 2, "deferred": 1, "held": 1}.items():
        assert sample(h.metrics, "relayd_queue_messages", {"state": state}) == value
    assert sample(h.metrics, "relayd_queue_oldest_age_seconds") == 45
    assert b'relayd_queue_messages{state="deferred"} 1.0' in h.metrics.exposition()
    h.courier.release()
    h.courier.release()
    h.qm.update_metrics()
    assert sample(h.metrics, "relayd_queue_messages", {"state": "active"}) == 0
    assert sample(h.metrics, "relayd_queue_messages", {"state": "held"}) == 1


# -- administration (relayd queue ...) --------------------------------------------------


def fired(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and not hasattr(out[0], "raiseException"), out
    return out[0]


def test_hold_and_release() -> None:
    """hold stops a deferred message's retries (saved as held); release tries it at once."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")]))
    message = h.queue()
    qid = message.queue_id
    assert fired(h.qm.state.administer("hold", [qid, "F" * 20])) == [qid]
    assert h.spool.messages[qid].held is True
    assert h.qm.counts() == {"active": 0, "deferred": 0, "held": 1}
    assert h.qm.state.describe(qid)["state"] == "held"
    h.clock.advance(86400)
    assert len(h.courier.attempts) == 1
    fired(h.qm.state.administer("release", [qid]))
    assert h.tried == [qid, qid]
    assert len(h.spool) == 0


def test_flush_tries_a_deferred_message_now() -> None:
    """flush cancels the back-off: the message is tried at once, and only once."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")]))
    message = h.queue()
    assert fired(h.qm.state.administer("flush", [message.queue_id])) == [message.queue_id]
    assert h.tried == [message.queue_id] * 2
    assert h.clock.getDelayedCalls() == [] and len(h.spool) == 0


def test_delete_waits_for_the_attempt_in_flight() -> None:
    """delete of a message being delivered takes effect after the attempt, without a DSN."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    fired(h.qm.state.administer("delete", [message.queue_id]))
    assert message.queue_id in h.spool.messages
    h.courier.fail_pending(TransientDeliveryError("451 busy"))
    assert len(h.spool) == 0 and len(h.qm) == 0
    assert h.clock.getDelayedCalls() == []
    assert len(h.courier.attempts) == 1


def test_bounce_by_administrator() -> None:
    """bounce returns a waiting message to its sender with a DSN and removes it."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")]))
    message = h.queue()
    fired(h.qm.state.administer("bounce", [message.queue_id]))
    dsn = h.courier.attempts[-1]
    assert dsn.envelope.sender == "" and b"returned by the administrator" in dsn.content
    assert len(h.spool) == 0 and h.clock.getDelayedCalls() == []


def test_listing_and_select() -> None:
    """listing() is oldest first with state and pending recipients; select() by sender pattern."""
    h = make(courier=RecordingCourier([TransientDeliveryError("451 busy")], hold=True))
    deferred = h.queue(arrival=NOW - 10)
    active = h.queue(arrival=NOW - 20)
    rows = list(h.qm.state.listing())
    assert [(r["id"], r["state"]) for r in rows] == [
        (active.queue_id, "active"), (deferred.queue_id, "deferred")]
    assert rows[1]["next_attempt"] == NOW + 60 and rows[1]["last_error"] == "451 busy"
    assert rows[0]["recipients"] == ["r@example.net"] and rows[0]["age"] == 20
    assert sorted(h.qm.state.select(None, False, "*@EXAMPLE.org")) == sorted(
        [deferred.queue_id, active.queue_id])
    assert h.qm.state.select(None, False, "nobody@*") == []
    assert h.qm.state.select(["X"], False, None) == ["X"]


def test_release_of_waiting_message_is_not_tried_twice() -> None:
    """Releasing a message that waits for a slot does not give it a second, back-off-free try."""
    h = make(concurrency=1, courier=RecordingCourier(hold=True))
    first = h.queue()
    waiting = h.queue()
    fired(h.qm.state.administer("hold", [waiting.queue_id]))
    fired(h.qm.state.administer("release", [waiting.queue_id]))
    h.courier.release()
    assert h.tried == [first.queue_id, waiting.queue_id]
    h.courier.fail_pending(TransientDeliveryError("451 busy"))
    assert h.tried == [first.queue_id, waiting.queue_id]  # next try only after the back-off


def test_hold_during_delivery_keeps_a_deferred_message_held() -> None:
    """hold while an attempt is in flight: if it defers, the message stays held (no retry)."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    fired(h.qm.state.administer("hold", [message.queue_id]))
    h.courier.fail_pending(TransientDeliveryError("451 busy"))
    assert h.spool.messages[message.queue_id].held is True
    assert h.qm.state.describe(message.queue_id)["state"] == "held"
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(86400)
    assert len(h.courier.attempts) == 1


def test_hold_during_delivery_that_succeeds_leaves_nothing() -> None:
    """hold while an attempt is in flight that then succeeds: the message is simply gone."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    fired(h.qm.state.administer("hold", [message.queue_id]))
    h.courier.release()
    assert len(h.spool) == 0 and len(h.qm) == 0


def test_bounce_during_delivery_waits_and_skips_delivered_message() -> None:
    """bounce of a message in flight waits for the attempt; if it was delivered, no DSN."""
    h = make(courier=RecordingCourier(hold=True))
    message = h.queue()
    fired(h.qm.state.administer("bounce", [message.queue_id]))
    assert message.queue_id in h.spool.messages
    h.courier.release()
    assert len(h.spool) == 0
    assert all(a.envelope.sender != "" for a in h.courier.attempts)
