"""DSN parameters go on to a smarthost that offers DSN, and only to one (issue 14.7)."""

from __future__ import annotations

from relayd.envelope import SENT, DSNRequest, RecipientDSN
from tests.unit.test_smarthost_client import FakeSmarthost, Setup, envelope

REQUEST = DSNRequest(ret="HDRS", envid="id+1 x", recipients=(
    ("b@example.net", RecipientDSN(("SUCCESS", "FAILURE"), "rfc822;b=1@example.net")),))


def test_passed_on_when_offered():
    server = FakeSmarthost("mx1.test", "192.0.2.1", ext=("PIPELINING", "DSN"))
    s = Setup(server)
    result = s.run(envelope("b@example.net", "c@example.net", dsn=REQUEST))
    assert [r.status for r in result.recipients] == [SENT, SENT]
    lines = [c[0] for c in server.commands]
    assert "MAIL FROM:<a@example.org> RET=HDRS ENVID=id+2B1+20x" in lines, lines
    assert "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+3D1@example.net" in lines
    assert "RCPT TO:<c@example.net>" in lines


def test_not_passed_on_when_not_offered():
    server = FakeSmarthost("mx1.test", "192.0.2.1", ext=("PIPELINING",))
    s = Setup(server)
    s.run(envelope("b@example.net", dsn=REQUEST))
    lines = [c[0] for c in server.commands]
    assert "MAIL FROM:<a@example.org>" in lines and "RCPT TO:<b@example.net>" in lines, lines
