"""Per-client limits count an IPv6 client by its /64 (issue 14.8).

A host holds a whole /64, so per-address counting let it rotate addresses
past max_connections_per_ip, messages_per_ip and the AUTH brute-force block.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv6Address
from twisted.internet.testing import StringTransport

from relayd.ipaddr import client_key
from relayd.testing import Conversation


@pytest.mark.parametrize("host, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::1", "::/64"),
    ("not-an-address", "not-an-address"),
])
def test_client_key(host, key):
    assert client_key(host) == key


def test_other_64_is_another_client():
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")


def connect(c: Conversation, host: str) -> StringTransport:
    """Another client of ``c``'s listener; its transport (greeting in value())."""
    peer = IPv6Address("TCP", host, 40000)
    transport = StringTransport(peerAddress=peer)
    c.protocol.factory.buildProtocol(peer).makeConnection(transport)
    return transport


def test_connections_per_ip_counts_the_64():
    c = Conversation(client_ip="2001:db8:1:2::1", max_connections_per_ip=1)
    assert c.greeting[0].startswith("220")
    same_64 = connect(c, "2001:db8:1:2::99")
    assert same_64.value().startswith(b"421 4.7.0")
    other_64 = connect(c, "2001:db8:1:3::1")
    assert other_64.value().startswith(b"220")
    # (the refused one is counted until its connection is gone, as any other)
    assert set(c.protocol.factory.connections_per_ip) == {"2001:db8:1:2::/64", "2001:db8:1:3::/64"}


def test_auth_failures_block_the_whole_64():
    c = Conversation(client_ip="2001:db8:1:2::1")
    tracker = c.protocol.factory.auth_limiter
    for n in range(tracker.failures.count):
        tracker.failure(f"2001:db8:1:2::{n + 10:x}")
    assert tracker.blocked("2001:db8:1:2::abcd")
    assert not tracker.blocked("2001:db8:1:3::1")


def test_messages_per_ip_counts_the_64():
    c = Conversation(client_ip="2001:db8:1:2::1", mynetworks=["2001:db8::/32"],
                     messages_per_ip="1/h")
    assert c.send("EHLO a\r\nMAIL FROM:<a@example.org>\r\n")[-1] == "250 2.1.0 Ok"
    other = connect(c, "2001:db8:1:2::2")
    other.clear()
    proto = c.protocol.factory.sessions
    [second] = [p for p in proto if p.transport is other]
    second.dataReceived(b"EHLO b\r\nMAIL FROM:<a@example.org>\r\n")
    assert other.value().split(b"\r\n")[-2].startswith(b"450 4.7.1")
    third = connect(c, "2001:db8:1:3::1")
    [p3] = [p for p in proto if p.transport is third]
    third.clear()
    p3.dataReceived(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
    assert third.value().split(b"\r\n")[-2] == b"250 2.1.0 Ok"
