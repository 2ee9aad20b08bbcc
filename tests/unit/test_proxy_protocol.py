"""PROXY protocol v1/v2 on SMTP listeners: the parser and the wrapper in memory
(relayd as a process behind a PROXY header: tests/system/test_proxy_protocol_process.py)."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.metrics import Metrics
from relayd.smtpd.protocol import SMTPServerFactory
from relayd.smtpd.proxy import (
    V2_SIGNATURE,
    HeaderParser,
    ProxyHeader,
    ProxyHeaderError,
    ProxyProtocolFactory,
)
from relayd.testing import LogCapture, RecordingSink, listener_config, sample

LB = "127.0.0.1"
CLIENT = "192.0.2.7"
OUTSIDER = "198.51.100.9"
GREETING = "220 relay.test ESMTP relayd"


def v1(proto: str = "TCP4", src: str = CLIENT, dst: str = "127.0.0.1", sport: int = 40000,
       dport: int = 25) -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None = CLIENT, dst: str = "10.0.0.1", sport: int = 40000, dport: int = 25, *,
       command: int = 1, tlvs: bytes = b"", family: int | None = None, proto: int = 1,
       version: int = 2) -> bytes:
    if src is None:
        payload = b""
        fam = 0 if family is None else family
    else:
        a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        fam = (1 if a.version == 4 else 2) if family is None else family
        payload = a.packed + b.packed + struct.pack("!HH", sport, dport)
    payload += tlvs
    return (V2_SIGNATURE + bytes([version << 4 | command, fam << 4 | proto])
            + struct.pack("!H", len(payload)) + payload)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse_all(data: bytes) -> tuple[ProxyHeader, bytes]:
    result = HeaderParser().feed(data)
    assert result is not None
    return result


def parse_bytewise(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    """Feed one byte at a time; the result (and the bytes after the header,
    which here only arrive with the byte that completes it)."""
    parser = HeaderParser()
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None:
            header, rest = result
            return header, rest + data[i + 1 :]
    return None


# -- the parser: v1 --------------------------------------------------------------


def test_v1_tcp4() -> None:
    header, rest = parse_all(v1() + b"EHLO x\r\n")
    assert header == ProxyHeader(1, (CLIENT, 40000), ("127.0.0.1", 25))
    assert rest == b"EHLO x\r\n"


def test_v1_tcp6() -> None:
    header, rest = parse_all(v1("TCP6", "2001:db8::7", "2001:db8::1", 65535, 587))
    assert header == ProxyHeader(1, ("2001:db8::7", 65535), ("2001:db8::1", 587))
    assert rest == b""


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_names_no_client(line: bytes) -> None:
    assert parse_all(line + b"QUIT\r\n") == (ProxyHeader(1), b"QUIT\r\n")


def test_v1_longest_valid_line() -> None:
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = v1("TCP6", a, a, 65535, 65535)
    assert len(line) == 104
    assert parse_all(line)[0].source == (a, 65535)


@pytest.mark.parametrize(
    "data",
    [
        v1(),
        v1("TCP6", "::ffff:192.0.2.7", "::1"),
        b"PROXY UNKNOWN\r\n",
        v2(),
        v2("2001:db8::7", "2001:db8::1", tlvs=tlv(0x01, b"h2") + tlv(0x04, b"")),
        v2(command=0),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-inet", "v2-inet6-tlv", "v2-local"],
)
def test_byte_at_a_time_gives_the_same_result(data: bytes) -> None:
    assert parse_bytewise(data + b"EHLO x\r\n") == parse_all(data + b"EHLO x\r\n")
    assert parse_bytewise(data[:-1]) is None  # one byte short: not complete


# -- the parser: v2 --------------------------------------------------------------


def test_v2_inet_with_tlvs_skipped() -> None:
    data = v2(tlvs=tlv(0x01, b"smtp") + tlv(0x20, b"\x07" + b"\x00" * 4) + tlv(0x04, b"\0" * 9))
    header, rest = parse_all(data + b"EHLO x\r\n")
    assert header == ProxyHeader(2, (CLIENT, 40000), ("10.0.0.1", 25))
    assert rest == b"EHLO x\r\n"


def test_v2_inet6() -> None:
    header, rest = parse_all(v2("2001:db8::7", "2001:db8::1", 1, 2))
    assert header == ProxyHeader(2, ("2001:db8::7", 1), ("2001:db8::1", 2))
    assert rest == b""


def test_v2_local_ignores_addresses() -> None:
    """LOCAL (health checks): the connection's own peer is the client."""
    assert parse_all(v2(command=0, tlvs=tlv(0x04, b"x")) + b"Q") == (ProxyHeader(2), b"Q")
    assert parse_all(v2(None, command=0)) == (ProxyHeader(2), b"")


def test_v2_unspec_family_names_no_client() -> None:
    assert parse_all(v2(None) + b"Q") == (ProxyHeader(2), b"Q")


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12), st.sampled_from([
    v1(), v1("TCP6", "2001:db8::7", "2001:db8::1"), b"PROXY UNKNOWN x\r\n",
    v2(), v2("2001:db8::7", "2001:db8::1", tlvs=tlv(0x02, b"lb.example") * 3), v2(command=0),
]))
def test_any_fragmentation_gives_the_same_result(cuts: list[int], header: bytes) -> None:
    data = header + b"EHLO client.test\r\nMAIL FROM:<a@b>\r\n"
    expected = parse_all(data)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    parser = HeaderParser()
    got = None
    for i, piece in enumerate(pieces):
        got = parser.feed(piece)
        if got is not None:
            got = (got[0], got[1] + b"".join(pieces[i + 1 :]))
            break
    assert got == expected


# -- the parser: refusals -----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.test\r\n",
        b"GET / HTTP/1.0\r\n",
        b"PROXX TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIX\n",
        b"\r\n\r\nEHLO\r\n",
    ],
)
def test_wrong_signature(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError, match="not a PROXY protocol header"):
        parse_bytewise(data)


def test_wrong_signature_fails_on_the_first_byte() -> None:
    with pytest.raises(ProxyHeaderError):
        HeaderParser().feed(b"E")


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\n",  # LF without CR
        b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25 9\r\n",
        b"PROXY TCP4  192.0.2.7 10.0.0.1 40000 25\r\n",
        b"PROXY UDP4 192.0.2.7 10.0.0.1 40000 25\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 25\r\n",
        b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 25\r\n",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 25\r\n",
        b"PROXY TCP4 192.0.2.256 10.0.0.1 40000 25\r\n",
        b"PROXY TCP4 192.0.2.07 10.0.0.1 40000 25\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 25\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 040000 25\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 25\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 4e4 25\r\n",
        b"PROXY TCP4 \xc0.0.2.7 10.0.0.1 1 25\r\n",
        b"PROXY \r\n",
        v2(version=1),
        v2(command=2),
        v2(family=3 + 1),  # no such family
        v2(proto=2),  # DGRAM
        v2(family=2),  # INET6 announced, INET-sized address block
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_all(data)
    with pytest.raises(ProxyHeaderError):
        parse_bytewise(data)


def test_v1_line_over_107_bytes_is_refused_without_waiting_for_its_end() -> None:
    parser = HeaderParser()
    assert parser.feed(b"PROXY TCP6 " + b"a" * 95) is None  # 106 bytes
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parser.feed(b"a")


def test_v2_oversize_length_is_refused_at_the_fixed_header() -> None:
    big = v2(tlvs=tlv(0x04, b"\0" * 1024))
    with pytest.raises(ProxyHeaderError, match="announces"):
        HeaderParser().feed(big[:16])
    assert parse_all(v2(tlvs=tlv(0x04, b"\0" * (1024 - 12 - 3))))[0].source == (CLIENT, 40000)


def test_v2_bad_version_fails_before_the_length_arrives() -> None:
    with pytest.raises(ProxyHeaderError, match="version"):
        HeaderParser().feed(V2_SIGNATURE + b"\x11")


def test_parser_is_single_use() -> None:
    parser = HeaderParser()
    assert parser.feed(v1()) is not None
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"x")


# -- the wrapper around the SMTP server, in memory -----------------------------------


class Proxied:
    """A listener with proxy_protocol = true on StringTransports; one
    ``connect`` per TCP connection (sharing the factory, so its per-IP
    connection counts)."""

    def __init__(self, trusted: tuple[str, ...] = ("127.0.0.0/8",), **keys: Any) -> None:
        keys.setdefault("mynetworks", ["192.0.2.0/24"])
        self.listener = listener_config(proxy_protocol=True, proxy_trusted=list(trusted), **keys)
        self.sink = RecordingSink()
        self.clock = Clock()
        self.metrics = Metrics()
        self.smtp = SMTPServerFactory(self.listener, "relay.test", self.sink, self.clock,
                                      self.metrics)
        self.factory = ProxyProtocolFactory(self.smtp, self.listener.proxy_trusted, self.clock,
                                            name=self.listener.name)

    def connect(self, peer: str = LB) -> Conn:
        return Conn(self, peer)


class Conn:
    def __init__(self, env: Proxied, peer: str) -> None:
        address = IPv4Address("TCP", peer, 40001)
        self.transport = StringTransport(peerAddress=address)
        self.protocol = env.factory.buildProtocol(address)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list[str]:
        raw = self.transport.value()
        self.transport.clear()
        return raw.decode().split("\r\n")[:-1]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


TRANSACTION = (b"EHLO client.test\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<u@example.net>\r\n"
               b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")


def test_no_greeting_before_the_header() -> None:
    env = Proxied()
    c = env.connect()
    assert c.replies() == [] and not c.closed
    assert c.send(v2()[:20]) == []
    assert c.send(v2()[20:]) == [GREETING]


def test_untrusted_peer_is_closed_at_once_without_a_word() -> None:
    env = Proxied()
    with LogCapture("relayd.smtpd") as logs:
        c = env.connect(OUTSIDER)
    assert c.closed and c.replies() == []
    assert c.send(v2() + TRANSACTION) == []
    assert env.sink.messages == []
    assert any(OUTSIDER in line and "proxy_trusted" in line for line in logs.lines)
    c.lose()
    assert sample(env.metrics, "relayd_smtp_connections_total", {"listener": "test"}) == 0


def test_client_outside_mynetworks_is_denied_relaying() -> None:
    """The trusted balancer forwards a client outside mynetworks: the
    header's address, not the balancer's, decides."""
    env = Proxied(mynetworks=["127.0.0.0/8"])  # the balancer itself would be trusted
    c = env.connect()
    replies = c.send(v1(src=OUTSIDER) + b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n"
                     b"RCPT TO:<u@example.net>\r\n")
    assert replies[0] == GREETING
    assert replies[-1] == "550 5.7.1 <u@example.net>: Relay access denied"


def test_client_inside_mynetworks_relays_and_is_recorded() -> None:
    env = Proxied()
    c = env.connect()
    replies = c.send(v2(tlvs=tlv(0x04, b"\0\0")) + TRANSACTION)  # header and SMTP in one packet
    assert replies[0] == GREETING
    assert "250 2.0.0 Ok: queued as 00000000000000000001" in replies
    assert replies[-1] == "221 2.0.0 Bye"
    [message] = env.sink.messages
    assert message.session.client_address == CLIENT
    assert message.content == b"Subject: hi\r\n\r\nhello\r\n"


def test_header_and_transaction_byte_at_a_time() -> None:
    env = Proxied()
    c = env.connect()
    for byte in v1() + TRANSACTION:
        c.protocol.dataReceived(bytes([byte]))
    replies = c.replies()
    assert replies[0] == GREETING and replies[-1] == "221 2.0.0 Bye"
    assert env.sink.messages[0].session.client_address == CLIENT


def test_ipv6_client_from_the_header() -> None:
    env = Proxied(mynetworks=["2001:db8::/32"])
    c = env.connect()
    replies = c.send(v1("TCP6", "2001:db8::7", "2001:db8::1") + TRANSACTION)
    assert "250 2.0.0 Ok: queued as 00000000000000000001" in replies
    assert env.sink.messages[0].session.client_address == "2001:db8::7"


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2(command=0)], ids=["unknown", "local"])
def test_unknown_and_local_mean_the_tcp_peer(header: bytes) -> None:
    env = Proxied(mynetworks=["127.0.0.0/8"])
    c = env.connect()
    assert "250 2.0.0 Ok: queued as 00000000000000000001" in c.send(header + TRANSACTION)
    assert env.sink.messages[0].session.client_address == LB


def test_per_ip_connection_limit_counts_the_real_client() -> None:
    env = Proxied(max_connections_per_ip=1)
    a = env.connect()
    assert a.send(v2(CLIENT)) == [GREETING]
    b = env.connect()
    assert b.send(v2("192.0.2.8")) == [GREETING]  # same balancer, another client
    c = env.connect()
    assert c.send(v2(CLIENT)) == [f"421 4.7.0 relay.test Error: too many connections from {CLIENT}"]
    assert c.closed
    c.lose()
    a.lose()
    assert env.connect().send(v2(CLIENT)) == [GREETING]


def test_missing_header_times_out_without_a_greeting() -> None:
    env = Proxied()
    c = env.connect()
    with LogCapture("relayd.smtpd") as logs:
        env.clock.advance(9.9)
        assert not c.closed
        env.clock.advance(0.2)
    assert c.closed and c.replies() == []
    assert any("no PROXY protocol header" in line for line in logs.lines)
    c.lose()
    assert env.clock.getDelayedCalls() == []


def test_partial_header_times_out() -> None:
    env = Proxied()
    c = env.connect()
    c.send(v2()[:15])
    env.clock.advance(10)
    assert c.closed and c.replies() == []


def test_plain_smtp_client_is_closed_without_a_greeting() -> None:
    env = Proxied()
    c = env.connect()
    with LogCapture("relayd.smtpd") as logs:
        assert c.send(b"EHLO client.test\r\n") == []
    assert c.closed
    assert any("bad PROXY protocol header" in line for line in logs.lines)
    assert c.send(b"MAIL FROM:<a@b>\r\n") == []
    c.lose()
    assert env.clock.getDelayedCalls() == []
    assert sample(env.metrics, "relayd_smtp_connections_active", {"listener": "test"}) == 0


def test_connection_lost_after_the_header_reaches_the_session() -> None:
    env = Proxied()
    c = env.connect()
    c.send(v2())
    assert sample(env.metrics, "relayd_smtp_connections_active", {"listener": "test"}) == 1
    c.lose()
    assert sample(env.metrics, "relayd_smtp_connections_active", {"listener": "test"}) == 0
    assert env.smtp.connections == 0 and env.smtp.connections_per_ip == {}
    assert env.clock.getDelayedCalls() == []
