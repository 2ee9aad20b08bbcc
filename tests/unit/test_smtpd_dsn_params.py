"""DSN (RFC 3461) parameters on MAIL and RCPT, kept in the envelope (issue 14.7)."""

from __future__ import annotations

import json

import pytest

from relayd.envelope import DSNRequest, Envelope, RecipientDSN
from relayd.smtpd.dsnparams import xtext, xtext_decode
from relayd.testing import Conversation

EHLO = "EHLO c\r\n"


def test_ehlo_advertises_dsn():
    assert "250-DSN" in Conversation().send(EHLO)


def test_parameters_reach_the_sink():
    c = Conversation()
    c.send(EHLO)
    replies = c.send(
        "MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B314\r\n"
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.net\r\n"
        "RCPT TO:<c@example.net> NOTIFY=NEVER\r\n"
        "RCPT TO:<d@example.net>\r\n"
        "DATA\r\nhi\r\n.\r\n")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies
    [m] = c.sink.messages
    assert m.dsn == DSNRequest(ret="HDRS", envid="QQ+314", recipients=(
        ("b@example.net", RecipientDSN(("SUCCESS", "FAILURE"), "rfc822;b@example.net")),
        ("c@example.net", RecipientDSN(("NEVER",), "")),
    ))
    assert m.dsn.of("d@example.net") == RecipientDSN()
    assert m.dsn.of("d@example.net").wants("FAILURE") and not m.dsn.of("c@example.net").wants(
        "FAILURE")


def test_no_parameters_no_request():
    c = Conversation()
    c.send(EHLO)
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n")
    assert c.sink.messages[0].dsn is None


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<a@example.org> RET=BODY", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> RET", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a+2", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=" + "x" * 101, "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a+00b", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> RET=FULL RET=HDRS", "501 5.5.4 Duplicate RET parameter"),
])
def test_malformed_mail_parameters_are_501_and_the_session_goes_on(command, reply):
    c = Conversation()
    c.send(EHLO)
    assert c.send(command + "\r\n") == [reply]
    assert c.send("MAIL FROM:<a@example.org> RET=FULL\r\n") == ["250 2.1.0 Ok"]


@pytest.mark.parametrize("param, reply", [
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter syntax"),
    ("NOTIFY=SOMETIMES", "501 5.5.4 Bad NOTIFY parameter syntax"),
    ("NOTIFY=", "501 5.5.4 Bad NOTIFY parameter syntax"),
    ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 Bad NOTIFY parameter syntax"),
    ("ORCPT=b@example.net", "501 5.5.4 Bad ORCPT parameter syntax"),
    ("ORCPT=rfc822;", "501 5.5.4 Bad ORCPT parameter syntax"),
    ("ORCPT=rfc822;a=b", "501 5.5.4 Bad ORCPT parameter syntax"),
    ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4 Duplicate NOTIFY parameter"),
    ("XFOO=1", "555 5.5.4 Unsupported option: XFOO"),
])
def test_malformed_rcpt_parameters_are_refused_and_the_session_goes_on(param, reply):
    c = Conversation()
    c.send(EHLO + "MAIL FROM:<a@example.org>\r\n")
    assert c.send(f"RCPT TO:<b@example.net> {param}\r\n") == [reply]
    assert c.send("RCPT TO:<b@example.net> notify=delay\r\n") == ["250 2.1.5 Ok"]


def test_xtext_round_trip():
    for text in ["plain", "a+b=c", "sp ace", "rfc822;x@y"]:
        assert xtext_decode(xtext(text), "X") == text
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"


def test_envelope_keeps_dsn_and_reads_old_spools():
    dsn = DSNRequest("HDRS", "id 1", (("b@x", RecipientDSN(("SUCCESS",), "rfc822;b@x")),))
    env = Envelope(sender="a@x", recipients=("b@x", "c@x"), route="r", arrival=1.0, dsn=dsn)
    again = Envelope.from_json(json.loads(json.dumps(env.to_json())))
    assert again == env and again.dsn.of("b@x").wants("SUCCESS")
    # An envelope written by the previous release has no "dsn" key.
    old = {"sender": "a@x", "recipients": ["b@x"], "route": "r", "arrival": 1.0}
    assert Envelope.from_json(old).dsn == DSNRequest()
    assert "dsn" not in Envelope.from_json(old).to_json()
