"""Every refusal leaves one Postfix-style mail-log line and a counted status (issue 14.5)."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from relayd.testing import Conversation, LogCapture, sample

ENVELOPE = "EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def rejects(log: LogCapture) -> list[str]:
    return [line for line in log.lines if "reject:" in line]


def count(c: Conversation, code: str, status: str) -> float:
    return sample(c.metrics, "relayd_smtp_rejects_total",
                  {"listener": c.listener.name, "code": code, "status": status})


def test_relay_denied_is_one_postfix_line():
    c = Conversation(client_ip="192.0.2.7", mynetworks=["10.0.0.0/8"])
    with LogCapture() as log:
        replies = c.send("EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                         "RCPT TO:<b@example.net>\r\n")
    assert replies[-1] == "550 5.7.1 <b@example.net>: Relay access denied"
    assert rejects(log) == [
        "NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.7.1 <b@example.net>: Relay "
        "access denied; from=<a@example.org> to=<b@example.net> proto=ESMTP "
        "helo=<client.test> listener=test"]
    [event] = [e for e in log.events if "rcpt" in e]
    assert (event["rcpt"], event["sender"], event["code"]) == ("b@example.net", "a@example.org", 550)
    assert count(c, "550", "5.7.1") == 1


def test_bare_newline_refusal_is_logged_at_end_of_message():
    c = Conversation(bare_newline="reject")
    c.send(ENVELOPE)
    with LogCapture() as log:
        assert c.send("Subject: x\r\n\r\nbare\nline\r\n.\r\n") == [
            "554 5.6.0 Error: bare <CR> or <LF> received"]
    assert rejects(log) == [
        "NOQUEUE: reject: END-OF-MESSAGE from unknown[127.0.0.1]: 554 5.6.0 Error: bare <CR> "
        "or <LF> received; from=<a@example.org> proto=ESMTP helo=<client.test> listener=test"]
    assert count(c, "554", "5.6.0") == 1


def test_nul_refusal_is_logged():
    c = Conversation(nul="reject")
    c.send(ENVELOPE)
    with LogCapture() as log:
        assert c.send(b"a\x00b\r\n.\r\n") == ["554 5.6.0 Error: NUL character received"]
    [line] = rejects(log)
    assert line.startswith("NOQUEUE: reject: END-OF-MESSAGE from unknown[127.0.0.1]: 554 5.6.0 "
                           "Error: NUL character received; from=<a@example.org>")


def test_452_statuses_are_separate_series():
    c = Conversation(max_recipients=1)
    with LogCapture() as log:
        c.send("EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
               "RCPT TO:<c@example.net>\r\nRSET\r\n")
        c.sink.full = True
        assert c.send("MAIL FROM:<a@example.org>\r\n")[-1].startswith("452 4.3.1")
    assert count(c, "452", "4.5.3") == 1 and count(c, "452", "4.3.1") == 1
    lines = rejects(log)
    assert len(lines) == 2
    assert lines[0].startswith("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 452 4.5.3 Error: "
                               "too many recipients; from=<a@example.org> to=<c@example.net>")
    assert lines[1].startswith("NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 452 4.3.1 ")


@pytest.mark.parametrize("command, reply", [
    ("FOO\r\n", "502 5.5.2"),
    ("MAIL FROM:<a@example.org> BOGUS=1\r\n", "555 5.5.4"),
    ("DATA\r\n", "503 5.5.1"),
])
def test_every_5xx_leaves_exactly_one_line(command, reply):
    c = Conversation()
    c.send("EHLO client.test\r\n")
    with LogCapture() as log:
        assert c.send(command)[-1].startswith(reply)
    [line] = rejects(log)
    assert line.startswith("NOQUEUE: reject: ") and f": {reply} " in line


def test_connection_limit_421_is_logged_as_connect():
    first = Conversation(max_connections_per_ip=1)
    peer = IPv4Address("TCP", "127.0.0.1", 23456)
    transport = StringTransport(peerAddress=peer)
    with LogCapture() as log:
        first.protocol.factory.buildProtocol(peer).makeConnection(transport)
    assert transport.value().startswith(b"421 4.7.0")
    [line] = rejects(log)
    assert line.startswith("NOQUEUE: reject: CONNECT from unknown[127.0.0.1]: 421 4.7.0 relay.test "
                           "Error: too many connections from 127.0.0.1; proto=SMTP")
    assert count(first, "421", "4.7.0") == 1


def test_successful_mail_logs_no_reject():
    c = Conversation()
    with LogCapture() as log:
        c.send(ENVELOPE)
        assert c.send("hi\r\n.\r\n")[-1].startswith("250 2.0.0")
    assert rejects(log) == []
