"""Graceful stop and config reload at the protocol level (StringTransport, task.Clock).

A stopping relay must never cut off a client between its final dot and our
250 (the client would resend: a duplicate) nor after a 250 it has not seen
yet; idle sessions go at once, transactions finish within a bound.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.testing import Conversation, listener_config, result_of

SHUTTING_DOWN = "421 4.3.2 relay.test Service shutting down"


def lost(c: Conversation) -> None:
    """What the reactor does after loseConnection/abortConnection."""
    c.protocol.connectionLost(Failure(ConnectionDone()))


def another_session(c: Conversation, client_ip: str = "127.0.0.1") -> Conversation:
    """A second client of the same listener (factory) as ``c``."""
    other = Conversation.__new__(Conversation)
    other.clock, other.sink, other.metrics = c.clock, c.sink, c.metrics
    other.transport = StringTransport(peerAddress=IPv4Address("TCP", client_ip, 23456))
    other.protocol = c.protocol.factory.buildProtocol(None)
    other.protocol.makeConnection(other.transport)
    other.greeting = other.replies()
    return other


def test_idle_session_is_told_421_at_once_and_stop_fires_when_it_is_gone():
    c = Conversation()
    c.send("EHLO client\r\n")
    factory = c.protocol.factory
    d = factory.shutdown(30)
    assert c.replies() == [SHUTTING_DOWN]
    assert c.closed
    assert not d.called
    lost(c)
    assert d.called


def test_transaction_in_data_finishes_and_gets_its_250_before_the_421():
    c = Conversation()
    c.send("EHLO client\r\n")
    c.transaction()
    c.send("Subject: half\r\n\r\nfirst half\r\n")
    d = c.protocol.factory.shutdown(30)
    assert c.replies() == []
    assert not c.closed
    assert c.send("second half\r\n.\r\n") == [
        "250 2.0.0 Ok: queued as 00000000000000000001", SHUTTING_DOWN]
    assert c.closed
    assert c.sink.messages[0].content.endswith(b"second half\r\n")
    lost(c)
    assert d.called


def test_a_pending_commit_is_answered_before_the_session_closes():
    c = Conversation()
    c.send("EHLO client\r\n")
    c.transaction()
    c.sink.hold = True
    c.send("Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    d = c.protocol.factory.shutdown(30)
    assert c.replies() == []
    c.sink.release()
    assert c.replies() == ["250 2.0.0 Ok: queued as 00000000000000000001", SHUTTING_DOWN]
    lost(c)
    assert d.called


def test_mid_transaction_client_may_finish_but_not_start_another():
    c = Conversation()
    c.send("EHLO client\r\nMAIL FROM:<a@example.org>\r\n")
    c.protocol.factory.shutdown(30)
    assert c.replies() == []
    assert c.send("RCPT TO:<b@example.net>\r\n") == ["250 2.1.5 Ok"]
    assert c.send("RSET\r\n") == ["250 2.0.0 Ok", SHUTTING_DOWN]
    assert c.closed


def test_sessions_still_open_after_the_grace_period_are_cut_off_unacknowledged():
    c = Conversation()
    c.send("EHLO client\r\n")
    c.transaction()
    c.send("Subject: slow\r\n\r\nstill sending")
    d = c.protocol.factory.shutdown(30)
    c.clock.advance(29)
    assert not c.transport.disconnected
    c.clock.advance(1)
    assert c.transport.disconnected  # aborted
    assert c.replies() == []  # no 250 was ever sent
    lost(c)
    assert d.called
    assert c.sink.messages == []


def test_no_open_sessions_means_stop_fires_at_once():
    c = Conversation()
    c.send("QUIT\r\n")
    lost(c)
    assert result_of(c.protocol.factory.shutdown(30)) is None


def test_a_connection_arriving_while_stopping_gets_421():
    c = Conversation()
    factory = c.protocol.factory
    factory.shutdown(30)
    lost(c)
    late = another_session(c)
    assert late.greeting == [SHUTTING_DOWN]
    assert late.closed


def test_reconfigure_applies_to_new_sessions_only():
    """A session keeps the policy it started with; the next one gets the reload's."""
    c = Conversation(client_ip="10.1.2.3", mynetworks=["10.0.0.0/8"])
    factory = c.protocol.factory
    c.send("EHLO client\r\n")
    factory.reconfigure(listener_config(mynetworks=["192.0.2.0/24"]))
    assert c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok"]
    later = another_session(c, "10.1.2.3")
    assert later.send("EHLO client\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")[
        -1].startswith("550 5.7.1")


def test_reconfigure_keeps_auth_failure_blocks_and_connection_counts():
    c = Conversation(client_ip="10.1.2.3")
    factory = c.protocol.factory
    tracker = factory.auth_limiter
    for _ in range(10):
        tracker.failure("10.1.2.3")
    assert tracker.blocked("10.1.2.3")
    factory.reconfigure(listener_config(auth_failures="3/1m"))
    assert factory.auth_limiter is tracker
    assert tracker.blocked("10.1.2.3")
    assert tracker.failures.count == 3
    assert factory.connections == 1
    assert factory.connections_per_ip == {"10.1.2.3": 1}
