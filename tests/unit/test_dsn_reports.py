"""relayd's own DSNs honour the client's RFC 3461 parameters (issue 14.7)."""

from __future__ import annotations

from relayd.envelope import DSNRequest, QueuedMessage, RecipientDSN, RecipientResult
from tests.unit.test_bounce import dsn, envelope


def test_envid_and_orcpt_appear_in_the_report():
    request = DSNRequest(envid="app-42", recipients=(
        ("bob@example.net", RecipientDSN(("FAILURE",), "rfc822;Bob@Example.NET")),))
    out = dsn(envelope=envelope(dsn=request))
    assert b"Original-Envelope-Id: app-42\r\n" in out
    assert b"Original-Recipient: rfc822;Bob@Example.NET\r\n" in out


def test_without_parameters_no_original_fields():
    out = dsn()
    assert b"Original-Envelope-Id" not in out and b"Original-Recipient" not in out


def test_notify_never_and_success_only_suppress_the_bounce():
    """The queue core asks the bouncer only for recipients whose NOTIFY includes FAILURE."""
    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock

    from relayd.queue.state import QueueState
    from relayd.testing.spool import MemorySpool

    asked: list[list[str]] = []

    class Bouncer:
        def bounce(self, message, failed, content, remote):
            asked.append([r.recipient for r in failed])
            return succeed("B0")

    request = DSNRequest(recipients=(("never@example.net", RecipientDSN(("NEVER",))),
                                     ("ok@example.net", RecipientDSN(("SUCCESS",)))))
    env = envelope(recipients=("never@example.net", "ok@example.net", "plain@example.net"),
                   dsn=request)
    core = QueueState(MemorySpool(Clock()), Clock(), Bouncer())
    message = QueuedMessage("0" * 20, env)
    fail = [RecipientResult(r, "bounced", "550 5.1.1 no") for r in env.recipients]
    core.bounce(message, fail[:2])
    assert asked == []
    core.bounce(message, fail)
    assert asked == [["plain@example.net"]]


def test_ret_full_returns_the_body_and_hdrs_the_headers_only():
    from twisted.internet.task import Clock

    from relayd.dsn import DSNQueue
    from relayd.testing.spool import MemorySpool
    from tests.unit.test_bounce import ORIGINAL

    for ret, body_there in (("FULL", True), ("HDRS", False), (None, False)):
        spool = MemorySpool(Clock())
        bouncer = DSNQueue(spool, Clock(), "relay.test")
        message = QueuedMessage("0" * 20, envelope(dsn=DSNRequest(ret=ret)))
        failed = [RecipientResult("bob@example.net", "bounced", "550 5.1.1 no")]
        bouncer.bounce(message, failed, ORIGINAL, None)
        [queued] = list(spool.messages.values())
        data = spool.contents[queued.queue_id]
        body = ORIGINAL.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1].strip().split(b"\n")[0]
        assert body and (body in data) == body_there, (ret, data)
