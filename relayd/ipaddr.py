"""Client addresses as relayd compares them: one normaliser for every check.

A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses
(``::ffff:192.0.2.1``) and link-local ones with a zone (``fe80::1%eth0``).
``mynetworks``, ``proxy_trusted`` and the loopback test for
``plaintext_auth`` must all see the address the operator wrote, so they all
go through :func:`client_ip` (design §2: one fact, one owner).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(host: str) -> IPAddress | None:
    """``host`` as an address, the zone dropped and an IPv4-mapped IPv6
    address turned into its IPv4 address; ``None`` if it is not an address
    (a Unix socket peer, a name)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """Is ``host`` in any of ``networks``?  Not an address: no."""
    ip = client_ip(host)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (127.0.0.0/8, ::1, or one mapped)?"""
    ip = client_ip(host)
    return ip is not None and ip.is_loopback


#: Per-client limits count an IPv6 client by this prefix: a host gets a whole
#: /64 (RFC 6177 assigns at least that to an end site), so counting per
#: address would let one client rotate past any limit.
IPV6_CLIENT_PREFIX = 64


def client_key(host: str) -> str:
    """What per-client limits count by: the IPv4 address (mapped ones
    included), the IPv6 /64 as ``2001:db8:1:2::/64``, or ``host`` itself
    when it is not an address."""
    ip = client_ip(host)
    if ip is None:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip), IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)
