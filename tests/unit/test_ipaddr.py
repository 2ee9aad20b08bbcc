"""The one client-address normaliser (relayd.ipaddr) and its users."""

from __future__ import annotations

import ipaddress

import pytest

from relayd.config import ListenerConfig, parse
from relayd.ipaddr import client_ip, in_networks, is_loopback
from relayd.smtpd.policy import ListenerPolicy

NETS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    "host, expected",
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("not-an-address", None),
        ("", None),
    ],
)
def test_client_ip(host: str, expected: str | None) -> None:
    ip = client_ip(host)
    assert (None if ip is None else str(ip)) == expected


@pytest.mark.parametrize(
    "host, inside",
    [
        ("192.0.2.7", True),
        ("::ffff:192.0.2.7", True),  # a dual-stack listener's view of an IPv4 client
        ("198.51.100.1", False),
        ("::ffff:198.51.100.1", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("unix-peer", False),
    ],
)
def test_in_networks(host: str, inside: bool) -> None:
    assert in_networks(host, NETS) is inside


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("192.0.2.1", False), ("::ffff:192.0.2.1", False), ("x", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_mynetworks_policy_uses_the_same_normaliser() -> None:
    config = parse(
        '[[listener]]\nname = "a"\nlisten = "tcp:0"\nmynetworks = ["192.0.2.0/24"]\n'
        'route = "r"\n[route.r]\nmaildir = "m"\n',
        "t",
    )
    listener: ListenerConfig = config.listeners[0]
    policy = ListenerPolicy.from_config(listener)
    for host in ("192.0.2.9", "::ffff:192.0.2.9", "2001:db8::1", "198.51.100.1", "x"):
        assert policy.trusted_client(host) is in_networks(host, listener.mynetworks), host
