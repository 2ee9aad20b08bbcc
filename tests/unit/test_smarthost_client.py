"""The smarthost client, driven in memory against a scripted fake smarthost.

No sockets and no reactor: the courier connects through an endpoint factory
that links its protocol to a ``FakeSmarthost`` by a ``Link`` (a fake
transport that also plays STARTTLS), and ``Net.pump()`` moves bytes until
nothing moves.  Every timer runs on a ``task.Clock``.
"""

from __future__ import annotations

import base64
from collections import deque
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relayd.config import Rate, RouteConfig, Smarthost
from relayd.courier.smarthost import (
    DATA_BLOCK_TIMEOUT,
    DATA_END_TIMEOUT,
    IDLE_TIMEOUT,
    SmarthostCourier,
    dot_stuff,
)
from relayd.envelope import BOUNCED, DEFERRED, SENT, DeliveryResult, Envelope
from relayd.errors import TransientDeliveryError
from relayd.interfaces import ICourier

BASIC_EXT = ("PIPELINING", "SIZE 10485760", "ENHANCEDSTATUSCODES", "8BITMIME")
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello\r\n"


# ---------------------------------------------------------------------------
# The fake network
# ---------------------------------------------------------------------------


class FakeSmarthost:
    """A scriptable ESMTP server.

    Attributes set the replies; the recordings (``commands`` with their TLS
    state, ``raw`` bytes, ``messages``) are what tests assert on.
    """

    def __init__(self, host: str, ip: str, port: int = 25, **kw: Any) -> None:
        self.host, self.ip, self.port = host, ip, port
        self.greeting: str | None = "220 fake.test ESMTP"
        self.ext: tuple[str, ...] = BASIC_EXT
        self.starttls = False
        self.inject_after_starttls = b""
        self.auth: str | None = None  # e.g. "PLAIN LOGIN"
        self.auth_reply = "235 2.7.0 Authentication successful"
        self.ehlo_reply: str | None = None
        self.mail_reply = "250 2.1.0 Ok"
        self.rcpt_replies: dict[str, str] = {}
        self.max_rcpts: int | None = None
        self.data_reply = "354 End data with <CR><LF>.<CR><LF>"
        self.dot_replies: deque[str] = deque()
        self.dot_reply = "250 2.0.0 Ok: queued as ABC"
        self.silent: set[str] = set()  # verbs that get no reply
        self.hold_dot = False
        self.stall_body = False
        self.implicit_tls = False
        self.refuse = False
        self.hang_connect = False
        self.split = 0  # deliver replies in pieces of this many bytes (0: whole)
        for k, v in kw.items():
            setattr(self, k, v)
        self.links: list[Link] = []
        self.commands: list[tuple[str, bool]] = []  # (line, tls)
        self.feeds: list[bytes] = []  # client writes as they arrived
        self.messages: list[dict[str, Any]] = []
        self.held: list[ServerConn] = []

    @property
    def connections(self) -> int:
        return len(self.links)

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c, _ in self.commands]

    def release(self) -> None:
        held, self.held = self.held, []
        for conn in held:
            conn.reply(self.next_dot_reply())

    def next_dot_reply(self) -> str:
        return self.dot_replies.popleft() if self.dot_replies else self.dot_reply


class ServerConn:
    """One connection's server-side state."""

    def __init__(self, server: FakeSmarthost, link: Link) -> None:
        self.server = server
        self.link = link
        self.buf = b""
        self.data: bytearray | None = None
        self.tls = False
        self.reset()
        if server.greeting is not None:
            self.reply(server.greeting)

    def reset(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []

    def reply(self, text: str, extra: bytes = b"") -> None:
        data = text.replace("\n", "\r\n").encode() + b"\r\n" + extra
        if self.link.server_tls and not self.link.tls:
            self.link.held_for_tls += data  # sent once the handshake is done
        else:
            self.link.inbound += data

    def feed(self, data: bytes) -> None:
        self.server.feeds.append(data)
        self.buf += data
        while True:
            if self.data is not None:
                end = self.buf.find(b"\r\n.\r\n")
                if self.data == b"" and self.buf.startswith(b".\r\n"):
                    end = -2
                if end == -1:
                    # Keep what may be the start of a terminator split across writes.
                    if len(self.buf) > 4:
                        self.data += self.buf[:-4]
                        self.buf = self.buf[-4:]
                    return
                self.data += self.buf[: end + 2]
                self.buf = self.buf[end + 5 :]
                self.end_of_data(bytes(self.data))
                self.data = None
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            self.buf = rest
            self.command(line.decode("utf-8"))

    def end_of_data(self, raw: bytes) -> None:
        s = self.server
        lines = raw.split(b"\r\n")
        unstuffed = b"\r\n".join(x[1:] if x.startswith(b".") else x for x in lines)
        s.messages.append(
            {"sender": self.sender, "rcpts": list(self.rcpts), "raw": raw, "data": unstuffed,
             "tls": self.tls}
        )
        self.reset()
        if s.hold_dot:
            s.held.append(self)
        else:
            self.reply(s.next_dot_reply())

    def command(self, line: str) -> None:
        s = self.server
        s.commands.append((line, self.tls))
        verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
        if verb in s.silent:
            return
        if verb == "EHLO":
            if s.ehlo_reply is not None:
                return self.reply(s.ehlo_reply)
            ext = list(s.ext)
            if s.starttls and not self.tls:
                ext.append("STARTTLS")
            if s.auth and (self.tls or not s.starttls):
                ext.append(f"AUTH {s.auth}")
            lines = ["fake.test", *ext]
            text = "\n".join(
                f"250-{x}" if i < len(lines) - 1 else f"250 {x}" for i, x in enumerate(lines)
            )
            return self.reply(text)
        if verb == "HELO":
            return self.reply("250 fake.test")
        if verb == "STARTTLS":
            self.reply("220 2.0.0 Ready to start TLS", s.inject_after_starttls)
            self.link.server_tls = True
            self.tls = True
            self.reset()
            return None
        if verb == "AUTH":
            if line.upper().startswith("AUTH LOGIN"):
                self.login_step = 1
                return self.reply("334 VXNlcm5hbWU6")
            return self.reply(s.auth_reply)
        if getattr(self, "login_step", 0) == 1:
            self.login_step = 2
            return self.reply("334 UGFzc3dvcmQ6")
        if getattr(self, "login_step", 0) == 2:
            self.login_step = 0
            return self.reply(s.auth_reply)
        if verb == "MAIL":
            if s.mail_reply.startswith("2"):
                self.sender = line[line.index("<") + 1 : line.index(">")]
            return self.reply(s.mail_reply)
        if verb == "RCPT":
            rcpt = line[line.index("<") + 1 : line.index(">")]
            if self.sender is None:
                return self.reply("503 5.5.1 Error: need MAIL command")
            if s.max_rcpts is not None and len(self.rcpts) >= s.max_rcpts:
                return self.reply("452 4.5.3 Error: too many recipients")
            reply = s.rcpt_replies.get(rcpt, "250 2.1.5 Ok")
            if reply.startswith("2"):
                self.rcpts.append(rcpt)
            return self.reply(reply)
        if verb == "DATA":
            if not self.rcpts:
                return self.reply("554 5.5.1 Error: no valid recipients")
            if s.data_reply.startswith("354"):
                self.data = bytearray()
            return self.reply(s.data_reply)
        if verb == "RSET":
            self.reset()
            return self.reply("250 2.0.0 Ok")
        if verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.link.server_close = True
            return None
        return self.reply("502 5.5.2 Error: command not recognized")


class Link:
    """The client's transport, joined to a ``ServerConn``."""

    def __init__(self, net: Net, server: FakeSmarthost, proto: Any) -> None:
        self.net = net
        self.server = server
        self.proto = proto
        self.out = bytearray()
        self.inbound = bytearray()
        self.held_for_tls = bytearray()
        self.producer: Any = None
        self.stalled = False
        self.client_tls: Any = None
        self.server_tls = False
        self.tls = False
        self.disconnecting = False
        self.aborted = False
        self.server_close = False
        self.lost = False
        self.conn: ServerConn | None = None

    # ITransport (what the protocol uses)
    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        if not self.lost and not self.aborted:
            self.out += data

    def writeSequence(self, seq: list[bytes]) -> None:
        for d in seq:
            self.write(d)

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", self.server.ip, self.server.port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.254", 40000)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert not streaming
        self.producer = producer
        if self.server.stall_body:
            self.stalled = True

    def unregisterProducer(self) -> None:
        self.producer = None

    def startTLS(self, creator: Any) -> None:
        self.client_tls = creator

    # the wire
    def lose(self, reason: Failure) -> bool:
        self.lost = True
        if self.producer is not None:
            self.producer.stopProducing()
            self.producer = None
        self.proto.connectionLost(reason)
        return True

    def step(self) -> bool:
        if self.lost:
            return False
        if self.aborted:
            return self.lose(Failure(ConnectionLost("aborted")))
        moved = False
        if self.producer is not None and not self.stalled:
            self.producer.resumeProducing()
            moved = True
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            assert self.conn is not None
            self.conn.feed(data)
            moved = True
        if self.client_tls is not None and not self.tls:
            if self.inbound:
                # Plaintext where the server's handshake should be.
                return self.lose(Failure(ConnectionLost("TLS handshake failed: not TLS")))
            if self.server_tls:
                self.tls = True
                self.proto.handshakeCompleted()
                self.inbound += self.held_for_tls
                self.held_for_tls.clear()
                return True
        elif self.inbound:
            data = bytes(self.inbound)
            self.inbound.clear()
            n = self.server.split or len(data)
            for i in range(0, len(data), n):
                if self.lost or self.aborted:
                    break
                if self.client_tls is not None and not self.tls:
                    # The client switched to TLS: the rest meets its TLS layer.
                    self.inbound[:0] = data[i:]
                    break
                self.proto.dataReceived(data[i : i + n])
            moved = True
        if self.server_close or (self.disconnecting and not self.out and self.producer is None):
            return self.lose(Failure(ConnectionDone("closed")))
        return moved


class Net:
    def __init__(self, *servers: FakeSmarthost) -> None:
        self.servers = {(s.host, s.port): s for s in servers}
        self.links: list[Link] = []

    def endpoint(self, smarthost: Smarthost) -> FakeEndpoint:
        return FakeEndpoint(self, smarthost)

    def pump(self) -> None:
        for _ in range(100000):
            if not any([link.step() for link in self.links]):
                return
        raise AssertionError("pump did not settle")


class FakeEndpoint:
    def __init__(self, net: Net, smarthost: Smarthost) -> None:
        self.net = net
        self.smarthost = smarthost

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        server = self.net.servers.get((self.smarthost.host, self.smarthost.port))
        if server is None or server.refuse:
            return defer.fail(ConnectionRefusedError("Connection refused"))
        if server.hang_connect:
            return defer.Deferred()
        proto = factory.buildProtocol(IPv4Address("TCP", server.ip, server.port))
        link = Link(self.net, server, proto)
        self.net.links.append(link)
        server.links.append(link)
        if server.implicit_tls:
            link.server_tls = True
        link.conn = ServerConn(server, link)
        link.conn.tls = server.implicit_tls
        proto.makeConnection(link)
        return defer.succeed(proto)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def route(**kw: Any) -> RouteConfig:
    kw.setdefault("smarthost", (Smarthost("mx1.test", 25),))
    kw.setdefault("tls", "none")
    return RouteConfig(name="default", **kw)


def envelope(*rcpts: str, sender: str = "a@example.org", **kw: Any) -> Envelope:
    return Envelope(
        sender=sender, recipients=rcpts or ("b@example.net",), route="default", arrival=0.0, **kw
    )


class Setup:
    def __init__(self, *servers: FakeSmarthost, **route_kw: Any) -> None:
        if not servers:
            servers = (FakeSmarthost("mx1.test", "192.0.2.1"),)
        self.servers = servers
        self.server = servers[0]
        self.net = Net(*servers)
        self.clock = Clock()
        route_kw.setdefault("smarthost", tuple(Smarthost(s.host, s.port) for s in servers))
        self.courier = SmarthostCourier(
            route(**route_kw), "relay.example.org", None, self.clock,
            endpoint_factory=self.net.endpoint,
        )

    def deliver(self, env: Envelope | None = None, content: bytes = MESSAGE) -> defer.Deferred[Any]:
        return self.courier.deliver("QID1", env or envelope(), content)

    def pump(self) -> None:
        self.net.pump()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()

    def run(self, env: Envelope | None = None, content: bytes = MESSAGE) -> Any:
        d = self.deliver(env, content)
        self.pump()
        return outcome(d)


def outcome(d: defer.Deferred[Any]) -> Any:
    """The result of a fired Deferred, or its Failure."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the delivery has not finished"
    return box[0]


def transient(result: Any) -> str:
    assert isinstance(result, Failure), result
    assert result.check(TransientDeliveryError), result
    return result.value.reply


def statuses(result: DeliveryResult) -> list[tuple[str, str, str]]:
    return [(r.recipient, r.status, r.reply) for r in result.recipients]


# ---------------------------------------------------------------------------
# Happy paths
# ---------------------------------------------------------------------------


def test_courier_provides_icourier():
    s = Setup()
    assert verifyObject(ICourier, s.courier)


def test_pipelined_delivery_sends_mail_rcpt_data_in_one_write():
    s = Setup()
    result = s.run(envelope("b@example.net", "c@example.net"))
    assert isinstance(result, DeliveryResult), result
    assert result.relay == "mx1.test[192.0.2.1]:25"
    assert result.reply == "250 2.0.0 Ok: queued as ABC"
    assert statuses(result) == [
        ("b@example.net", SENT, "250 2.0.0 Ok: queued as ABC"),
        ("c@example.net", SENT, "250 2.0.0 Ok: queued as ABC"),
    ]
    assert s.server.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    assert s.server.commands[0][0] == "EHLO relay.example.org"
    assert (
        b"MAIL FROM:<a@example.org> SIZE=%d BODY=8BITMIME\r\n" % len(MESSAGE)
        not in s.server.feeds
    )
    assert s.server.feeds[1] == (
        b"MAIL FROM:<a@example.org> SIZE=%d\r\n" % len(MESSAGE)
        + b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    msg = s.server.messages[0]
    assert msg["data"] == MESSAGE
    assert msg["rcpts"] == ["b@example.net", "c@example.net"]


def test_lockstep_without_pipelining():
    s = Setup(FakeSmarthost("mx1.test", "192.0.2.1", ext=("SIZE",)))
    result = s.run(envelope("b@example.net", "c@example.net"))
    assert [r.status for r in result.recipients] == [SENT, SENT]
    # One command per write: each waited for the previous reply.
    assert s.server.feeds[1:5] == [
        b"MAIL FROM:<a@example.org> SIZE=%d\r\n" % len(MESSAGE),
        b"RCPT TO:<b@example.net>\r\n",
        b"RCPT TO:<c@example.net>\r\n",
        b"DATA\r\n",
    ]
    assert s.server.messages[0]["data"] == MESSAGE


@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_multiline_replies_split_at_every_byte(split):
    server = FakeSmarthost(
        "mx1.test", "192.0.2.1", split=split,
        greeting="220-fake.test ESMTP\n220-no UCE\n220 really",
        rcpt_replies={"x@example.net": "550-5.1.1 <x@example.net>: no such user\n550 5.1.1 go away"},
    )
    s = Setup(server)
    result = s.run(envelope("b@example.net", "x@example.net"))
    assert statuses(result) == [
        ("b@example.net", SENT, "250 2.0.0 Ok: queued as ABC"),
        ("x@example.net", BOUNCED, "550 5.1.1 <x@example.net>: no such user go away"),
    ]


def test_relay_names_the_peer_ip_and_port():
    s = Setup(FakeSmarthost("smtp.example.com", "198.51.100.7", port=587))
    result = s.run()
    assert result.relay == "smtp.example.com[198.51.100.7]:587"


# ---------------------------------------------------------------------------
# Per-recipient outcomes
# ---------------------------------------------------------------------------


def test_rcpt_outcomes():
    server = FakeSmarthost(
        "mx1.test", "192.0.2.1",
        rcpt_replies={
            "t@example.net": "450 4.2.0 <t@example.net>: mailbox busy",
            "u@example.net": "550 5.1.1 <u@example.net>: Recipient address rejected: User unknown",
        },
    )
    s = Setup(server)
    result = s.run(envelope("b@example.net", "t@example.net", "u@example.net"))
    assert statuses(result) == [
        ("b@example.net", SENT, "250 2.0.0 Ok: queued as ABC"),
        ("t@example.net", DEFERRED, "450 4.2.0 <t@example.net>: mailbox busy"),
        ("u@example.net", BOUNCED,
         "550 5.1.1 <u@example.net>: Recipient address rejected: User unknown"),
    ]
    assert server.messages[0]["rcpts"] == ["b@example.net"]


@pytest.mark.parametrize(
    "reply,status",
    [
        ("250 2.0.0 Ok", SENT),
        ("452 4.3.1 Insufficient system storage", DEFERRED),
        ("552 5.3.4 Message too big", BOUNCED),
        ("421 4.7.0 Try again later", DEFERRED),
    ],
)
def test_reply_after_final_dot_applies_to_accepted_recipients(reply, status):
    server = FakeSmarthost(
        "mx1.test", "192.0.2.1", dot_reply=reply,
        rcpt_replies={"u@example.net": "550 5.1.1 unknown"},
    )
    s = Setup(server)
    result = s.run(envelope("b@example.net", "c@example.net", "u@example.net"))
    assert statuses(result) == [
        ("b@example.net", status, reply),
        ("c@example.net", status, reply),
        ("u@example.net", BOUNCED, "550 5.1.1 unknown"),
    ]
    assert result.reply == reply


def test_soft_bounce_defers_5xx():
    server = FakeSmarthost(
        "mx1.test", "192.0.2.1", dot_reply="554 5.7.1 spam",
        rcpt_replies={"u@example.net": "550 5.1.1 unknown"},
    )
    s = Setup(server, soft_bounce=True)
    result = s.run(envelope("b@example.net", "u@example.net"))
    assert [r.status for r in result.recipients] == [DEFERRED, DEFERRED]


def test_all_recipients_refused_sends_no_data():
    server = FakeSmarthost("mx1.test", "192.0.2.1",
                           rcpt_replies={"u@example.net": "550 5.1.1 unknown"})
    s = Setup(server)
    result = s.run(envelope("u@example.net"))
    assert statuses(result) == [("u@example.net", BOUNCED, "550 5.1.1 unknown")]
    assert server.messages == []
    # The DATA went out pipelined and was refused by the server.
    assert server.verbs == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_452_at_rcpt_goes_into_a_further_transaction():
    server = FakeSmarthost("mx1.test", "192.0.2.1", max_rcpts=2)
    s = Setup(server)
    rcpts = ("b@example.net", "c@example.net", "d@example.net")
    result = s.run(envelope(*rcpts))
    assert [r.status for r in result.recipients] == [SENT, SENT, SENT]
    assert [m["rcpts"] for m in server.messages] == [list(rcpts[:2]), [rcpts[2]]]
    assert server.connections == 1


def test_452_without_progress_defers():
    server = FakeSmarthost("mx1.test", "192.0.2.1", max_rcpts=0)
    s = Setup(server)
    result = s.run(envelope("b@example.net"))
    assert statuses(result) == [("b@example.net", DEFERRED, "452 4.5.3 Error: too many recipients")]


def test_max_recipients_per_transaction():
    server = FakeSmarthost("mx1.test", "192.0.2.1")
    s = Setup(server, max_recipients_per_transaction=2)
    rcpts = tuple(f"r{i}@example.net" for i in range(5))
    result = s.run(envelope(*rcpts))
    assert [r.status for r in result.recipients] == [SENT] * 5
    assert [m["rcpts"] for m in server.messages] == [
        ["r0@example.net", "r1@example.net"],
        ["r2@example.net", "r3@example.net"],
        ["r4@example.net"],
    ]
    assert all(m["data"] == MESSAGE for m in server.messages)
    assert server.connections == 1
    assert server.verbs.count("MAIL") == 3


def test_max_recipients_per_transaction_lockstep_with_rset_after_refusal():
    server = FakeSmarthost(
        "mx1.test", "192.0.2.1", ext=(),
        rcpt_replies={"r0@example.net": "550 no", "r1@example.net": "550 no"},
    )
    s = Setup(server, max_recipients_per_transaction=2)
    rcpts = tuple(f"r{i}@example.net" for i in range(3))
    result = s.run(envelope(*rcpts))
    assert [r.status for r in result.recipients] == [BOUNCED, BOUNCED, SENT]
    assert server.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET", "MAIL", "RCPT", "DATA"]


def test_failure_in_a_later_transaction_keeps_earlier_results():
    # The second MAIL is refused: the first recipient is already delivered,
    # so the result reports it and defers the rest (no Transient: no duplicate).
    server2 = FakeSmarthost("mx1.test", "192.0.2.1", max_rcpts=None)
    s2 = Setup(server2, max_recipients_per_transaction=1)
    original = ServerConn.command

    def second_mail_fails(self: ServerConn, line: str) -> None:
        if line.startswith("MAIL") and self.server.verbs.count("MAIL") >= 1:
            self.server.commands.append((line, self.tls))
            return self.reply("451 4.3.0 try later")
        return original(self, line)

    ServerConn.command = second_mail_fails  # type: ignore[method-assign]
    try:
        result = s2.run(envelope("b@example.net", "c@example.net"))
    finally:
        ServerConn.command = original  # type: ignore[method-assign]
    assert [r.status for r in result.recipients] == [SENT, DEFERRED]
    assert "451 4.3.0 try later" in result.recipients[1].reply


# ---------------------------------------------------------------------------
# Failures before MAIL are transient, never bounces
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting,value,verb",
    [
        ("greeting", "554 5.7.1 go away", "greeting"),
        ("ehlo_reply", "550 5.7.1 no", "EHLO"),
        ("mail_reply", "553 5.7.1 Sender address rejected", "MAIL FROM"),
        ("mail_reply", "451 4.3.0 later", "MAIL FROM"),
        ("greeting", "421 4.7.0 busy", "greeting"),
    ],
)
def test_refusals_before_or_at_mail_are_transient(setting, value, verb):
    server = FakeSmarthost("mx1.test", "192.0.2.1", **{setting: value})
    s = Setup(server, tls="starttls", tls_verify=False) if setting == "ehlo_reply" else Setup(server)
    result = s.run()
    reply = transient(result)
    assert value in reply
    assert "mx1.test[192.0.2.1]" in reply
    assert server.messages == []


def test_ehlo_5xx_falls_back_to_helo_only_without_tls_and_auth():
    server = FakeSmarthost("mx1.test", "192.0.2.1", ehlo_reply="502 5.5.2 what")
    s = Setup(server)
    result = s.run()
    assert [r.status for r in result.recipients] == [SENT]
    assert server.verbs[:2] == ["EHLO", "HELO"]
    # No extensions after HELO: no SIZE parameter, lockstep.
    assert server.commands[2][0] == "MAIL FROM:<a@example.org>"


def test_auth_5xx_is_transient():
    server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True, auth="PLAIN",
                           auth_reply="535 5.7.8 Error: authentication failed")
    s = Setup(server, tls="starttls", tls_verify=False, username="u", password="sekrit")
    reply = transient(s.run())
    assert "535 5.7.8" in reply
    assert "sekrit" not in reply
    assert "MAIL" not in server.verbs


def test_failover_when_the_first_refuses_the_connection():
    first = FakeSmarthost("mx1.test", "192.0.2.1", refuse=True)
    second = FakeSmarthost("mx2.test", "192.0.2.2")
    s = Setup(first, second)
    result = s.run()
    assert result.relay == "mx2.test[192.0.2.2]:25"
    assert len(second.messages) == 1


def test_failover_on_421_greeting():
    first = FakeSmarthost("mx1.test", "192.0.2.1", greeting="421 4.7.0 too busy")
    second = FakeSmarthost("mx2.test", "192.0.2.2")
    s = Setup(first, second)
    result = s.run()
    assert result.relay == "mx2.test[192.0.2.2]:25"
    assert first.links[0].lost


def test_all_smarthosts_failing_is_transient_and_names_them():
    first = FakeSmarthost("mx1.test", "192.0.2.1", refuse=True)
    second = FakeSmarthost("mx2.test", "192.0.2.2", greeting="554 5.3.2 no")
    s = Setup(first, second)
    reply = transient(s.run())
    assert "connect to mx1.test:25: Connection was refused" in reply
    assert "mx2.test[192.0.2.2] refused to talk to me: 554 5.3.2 no" in reply
    assert s.courier.connections == 0


# ---------------------------------------------------------------------------
# Extensions
# ---------------------------------------------------------------------------


def test_size_too_big_bounces_without_mail():
    server = FakeSmarthost("mx1.test", "192.0.2.1", ext=("PIPELINING", "SIZE 10"))
    s = Setup(server)
    result = s.run(envelope("b@example.net", "c@example.net"))
    assert statuses(result) == [
        ("b@example.net", BOUNCED, "552 5.3.4 Message size exceeds fixed limit of smarthost"),
        ("c@example.net", BOUNCED, "552 5.3.4 Message size exceeds fixed limit of smarthost"),
    ]
    assert "MAIL" not in server.verbs


def test_8bit_body_sends_body_8bitmime():
    s = Setup()
    content = "Subject: x\r\n\r\ncaf\u00e9\r\n".encode()
    result = s.run(envelope(), content)
    assert result.recipients[0].status == SENT
    assert s.server.commands[1][0] == f"MAIL FROM:<a@example.org> SIZE={len(content)} BODY=8BITMIME"
    # Without 8BITMIME at the server the message goes anyway, without the parameter.
    s2 = Setup(FakeSmarthost("mx1.test", "192.0.2.1", ext=("PIPELINING",)))
    s2.run(envelope(body="8BITMIME"), content)
    assert s2.server.commands[1][0] == "MAIL FROM:<a@example.org>"
    assert s2.server.messages[0]["data"] == content


def test_smtputf8_sent_when_needed_and_offered():
    server = FakeSmarthost("mx1.test", "192.0.2.1", ext=("PIPELINING", "SMTPUTF8", "8BITMIME"))
    s = Setup(server)
    env = envelope("j\u00fcrgen@example.net", smtputf8=True)
    result = s.run(env)
    assert result.recipients[0].status == SENT
    assert server.commands[1][0] == "MAIL FROM:<a@example.org> SMTPUTF8"
    assert server.commands[2][0] == "RCPT TO:<j\u00fcrgen@example.net>"


def test_smtputf8_needed_for_addresses_but_missing_bounces_567():
    s = Setup()
    result = s.run(envelope("j\u00fcrgen@example.net", smtputf8=True))
    assert statuses(result) == [(
        "j\u00fcrgen@example.net", BOUNCED,
        "550 5.6.7 SMTPUTF8 is required, but was not offered by host mx1.test[192.0.2.1]",
    )]
    assert "MAIL" not in s.server.verbs


def test_smtputf8_needed_for_headers_only_but_missing_bounces_569():
    s = Setup()
    content = "Subject: gr\u00fc\u00dfe\r\n\r\nhi\r\n".encode()
    result = s.run(envelope(smtputf8=True), content)
    assert statuses(result) == [(
        "b@example.net", BOUNCED,
        "550 5.6.9 SMTPUTF8 is required, but was not offered by host mx1.test[192.0.2.1]",
    )]


def test_legacy_8bit_headers_without_smtputf8_request_are_sent():
    s = Setup()
    content = b"Subject: gr\xfc\xdfe\r\n\r\nhi\r\n"
    result = s.run(envelope(), content)
    assert result.recipients[0].status == SENT
    assert "BODY=8BITMIME" in s.server.commands[1][0]


# ---------------------------------------------------------------------------
# Dot-stuffing
# ---------------------------------------------------------------------------


def content_with_dots_at(offsets: list[int], total: int) -> bytes:
    """Lines of filler with a line starting with '.' exactly at each offset."""
    out = bytearray(b".first line starts with a dot\r\n")
    for off in offsets:
        while len(out) < off:
            room = off - len(out)
            if room >= 80:
                out += b"x" * 78 + b"\r\n"
            elif room >= 2:
                out += b"y" * (room - 2) + b"\r\n"
            else:  # room == 1: lengthen the previous filler line by one
                out[-2:-2] = b"z"
        assert len(out) == off
        out += b".\r\n" if off % 2 else b".dot at boundary\r\n"
    while len(out) < total:
        out += b"w" * 70 + b"\r\n"
    out += b".\r\n..\r\n.last\r\n"
    return bytes(out)


def test_dot_stuff_function():
    assert dot_stuff(b".\r\n") == (b"..\r\n", b".\r\n")
    assert dot_stuff(b"a\r\n.b\r\n..\r\n") == (b"a\r\n..b\r\n...\r\n", b".\r\n")
    assert dot_stuff(b"no newline at end") == (b"no newline at end", b"\r\n.\r\n")
    assert dot_stuff(b"") == (b"", b".\r\n")
    # Bare LF / CR are normalised first, so no <LF>.<LF> reaches the wire.
    assert dot_stuff(b"a\n.\nb\r.\rc\r\n") == (b"a\r\n..\r\nb\r\n..\r\nc\r\n", b".\r\n")


@pytest.mark.parametrize("first", [b".\r\n", b".hidden\r\n"])
def test_first_line_dot_is_stuffed(first):
    s = Setup()
    content = first + b"Subject: x\r\n\r\nbody\r\n"
    s.run(envelope(), content)
    msg = s.server.messages[0]
    assert msg["raw"].startswith(b".." )
    assert msg["data"] == content


def test_dots_at_every_16k_and_64k_boundary_survive():
    boundaries = [16384 * k for k in range(1, 9)] + [65536 * 3]
    content = content_with_dots_at(boundaries, 300_000)
    for b in boundaries:
        assert content[b - 2 : b + 1] == b"\r\n."
    stuffed, _ = dot_stuff(content)
    # Also put a dot line exactly at the stuffed stream's 64 KiB chunk joins.
    s = Setup()
    result = s.run(envelope(), content)
    assert result.recipients[0].status == SENT
    msg = s.server.messages[0]
    assert msg["data"] == content
    raw_stream = b"".join(s.server.feeds)
    body = raw_stream[raw_stream.index(b"DATA\r\n") + 6 :]
    # Exactly one terminator, at the very end.
    assert body.find(b"\r\n.\r\n") == len(body) - 5
    assert body == stuffed + b".\r\n"


def test_dot_lines_at_the_stuffed_chunk_joins():
    # Build a message whose *stuffed* form has a '.'-line at 64 KiB multiples.
    from relayd.courier.smarthost import BODY_CHUNK

    out = bytearray(b"Subject: x\r\n\r\n")
    stuffed_len = len(out)
    for k in (1, 2, 3):
        target = BODY_CHUNK * k
        while stuffed_len < target:
            room = target - stuffed_len
            line = b"y" * (min(room, 80) - 2) + b"\r\n" if room >= 2 else None
            if line is None:
                out[-2:-2] = b"z"
                stuffed_len += 1
                continue
            out += line
            stuffed_len += len(line)
        out += b".\r\n"
        stuffed_len += 4  # stuffed as "..\r\n"
    stuffed, _ = dot_stuff(bytes(out))
    for k in (1, 2, 3):
        assert stuffed[BODY_CHUNK * k : BODY_CHUNK * k + 2] == b".."
    s = Setup()
    s.run(envelope(), bytes(out))
    assert s.server.messages[0]["data"] == bytes(out)


# ---------------------------------------------------------------------------
# STARTTLS and AUTH
# ---------------------------------------------------------------------------


def test_starttls_required_but_not_offered():
    server = FakeSmarthost("mx1.test", "192.0.2.1", auth="PLAIN")
    s = Setup(server, tls="starttls", username="u", password="pw")
    reply = transient(s.run())
    assert reply == "TLS is required, but was not offered by host mx1.test[192.0.2.1]"
    assert server.verbs == ["EHLO"]
    assert b"".join(server.feeds) == b"EHLO relay.example.org\r\n"


def test_starttls_then_ehlo_again_then_mail_inside_tls():
    server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True)
    s = Setup(server, tls="starttls", tls_verify=False)
    result = s.run()
    assert result.recipients[0].status == SENT
    assert server.commands[:3] == [
        ("EHLO relay.example.org", False),
        ("STARTTLS", False),
        ("EHLO relay.example.org", True),
    ]
    assert all(tls for _, tls in server.commands[2:])


@pytest.mark.parametrize("split", [0, 1])
def test_plaintext_injected_after_starttls_fails_the_attempt(split):
    server = FakeSmarthost(
        "mx1.test", "192.0.2.1", starttls=True, auth="PLAIN", split=split,
        inject_after_starttls=b"250-fake.test\r\n250 AUTH PLAIN\r\n",
    )
    s = Setup(server, tls="starttls", tls_verify=False, username="u", password="pw")
    reply = transient(s.run())
    if split == 0:
        assert reply == "plaintext injected after STARTTLS by mx1.test[192.0.2.1]"
    else:
        assert "TLS handshake with mx1.test[192.0.2.1] failed" in reply
    assert server.verbs == ["EHLO", "STARTTLS"]
    assert server.links[0].lost


def test_auth_plain_exact_bytes_and_only_after_tls():
    server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True, auth="LOGIN PLAIN")
    s = Setup(server, tls="starttls", tls_verify=False, username="user", password="p\u00e4ss")
    result = s.run()
    assert result.recipients[0].status == SENT
    token = base64.b64encode("\0user\0p\u00e4ss".encode()).decode()
    assert server.commands[3] == (f"AUTH PLAIN {token}", True)
    assert server.verbs[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]


def test_auth_login_exact_bytes():
    server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True, auth="LOGIN")
    s = Setup(server, tls="starttls", tls_verify=False, username="user", password="pw")
    result = s.run()
    assert result.recipients[0].status == SENT
    assert server.commands[3:6] == [
        ("AUTH LOGIN", True),
        (base64.b64encode(b"user").decode(), True),
        (base64.b64encode(b"pw").decode(), True),
    ]


def test_auth_without_supported_mechanism_is_transient():
    server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True, auth="CRAM-MD5 XOAUTH2")
    s = Setup(server, tls="starttls", tls_verify=False, username="user", password="pw")
    reply = transient(s.run())
    assert "no supported SASL mechanism" in reply
    server2 = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True)
    s2 = Setup(server2, tls="starttls", tls_verify=False, username="user", password="pw")
    assert "AUTH was not offered" in transient(s2.run())
    assert "MAIL" not in server.verbs + server2.verbs


def test_opportunistic_uses_starttls_when_offered_and_plain_otherwise():
    server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True)
    s = Setup(server, tls="opportunistic")
    assert s.run().recipients[0].status == SENT
    assert server.verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]
    server2 = FakeSmarthost("mx1.test", "192.0.2.1")
    s2 = Setup(server2, tls="opportunistic")
    assert s2.run().recipients[0].status == SENT
    assert server2.verbs[:2] == ["EHLO", "MAIL"]


def test_implicit_tls_starts_tls_before_the_greeting():
    server = FakeSmarthost("mx1.test", "192.0.2.1", port=465, implicit_tls=True)
    s = Setup(server, tls="implicit", tls_verify=False)
    d = s.deliver()
    link = server.links[0]
    assert link.client_tls is not None  # startTLS called in connectionMade
    assert not link.inbound  # nothing in the clear
    s.pump()
    assert outcome(d).recipients[0].status == SENT
    assert all(tls for _, tls in server.commands)
    # A plaintext server on the implicit TLS port: the handshake fails.
    plain = FakeSmarthost("mx1.test", "192.0.2.1", port=465)
    s2 = Setup(plain, tls="implicit", tls_verify=False)
    assert "TLS handshake with mx1.test[192.0.2.1] failed" in transient(s2.run())


# ---------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------


def test_connect_timeout():
    s = Setup(FakeSmarthost("mx1.test", "192.0.2.1", hang_connect=True))
    d = s.deliver()
    s.advance(29)
    assert not d.called
    s.advance(2)
    assert transient(outcome(d)) == "connect to mx1.test:25: timed out"


@pytest.mark.parametrize(
    "setting,value,limit",
    [
        ("greeting", None, 300),
        ("silent", {"EHLO"}, 300),
        ("silent", {"MAIL"}, 300),
        ("silent", {"RCPT"}, 300),
        ("silent", {"DATA"}, 120),
    ],
)
def test_phase_timeouts(setting, value, limit):
    # Lockstep, so the silent command is the one being waited for.
    server = FakeSmarthost("mx1.test", "192.0.2.1", ext=(), **{setting: value})
    s = Setup(server)
    d = s.deliver()
    s.pump()
    s.advance(limit - 1)
    assert not d.called
    s.advance(2)
    assert "timed out" in transient(outcome(d))
    assert server.links[0].lost
    assert s.courier.connections == 0


def test_timeout_after_final_dot_is_ten_minutes():
    server = FakeSmarthost("mx1.test", "192.0.2.1", hold_dot=True)
    s = Setup(server)
    d = s.deliver()
    s.pump()
    assert len(server.messages) == 1
    s.advance(DATA_END_TIMEOUT - 1)  # 9:59
    assert not d.called
    s.advance(2)  # 10:01
    reply = transient(outcome(d))
    assert reply == (
        "conversation with mx1.test[192.0.2.1] timed out while waiting for the reply "
        "to the end of data"
    )


BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300


def test_data_block_timeout_when_the_transport_does_not_drain():
    server = FakeSmarthost("mx1.test", "192.0.2.1", stall_body=True)
    s = Setup(server)
    d = s.deliver(envelope(), BIG)
    s.pump()
    link = server.links[0]
    assert link.producer is not None
    s.advance(DATA_BLOCK_TIMEOUT - 1)
    assert not d.called
    # Progress (the transport asks for the next block) restarts the timer.
    link.producer.resumeProducing()
    s.advance(DATA_BLOCK_TIMEOUT - 1)
    assert not d.called
    s.advance(2)
    assert transient(outcome(d)) == (
        "conversation with mx1.test[192.0.2.1] timed out while sending message body"
    )
    assert server.messages == []


def test_big_body_goes_out_in_large_writes():
    s = Setup()
    assert s.run(envelope(), BIG).recipients[0].status == SENT
    assert s.server.messages[0]["data"] == BIG
    body_writes = s.server.feeds[2:]
    assert len(body_writes) <= len(BIG) // (64 * 1024) + 2


def test_connection_lost_mid_data_is_transient():
    server = FakeSmarthost("mx1.test", "192.0.2.1", stall_body=True)
    s = Setup(server)
    d = s.deliver(envelope(), BIG)
    s.pump()
    link = server.links[0]
    link.producer.resumeProducing()
    s.pump()
    assert not d.called
    link.lose(Failure(ConnectionLost("reset by peer")))
    reply = transient(outcome(d))
    assert reply == "lost connection with mx1.test[192.0.2.1] while sending message body"
    assert server.messages == []
    assert s.courier.connections == 0


def test_connection_lost_before_the_final_reply_is_transient():
    server = FakeSmarthost("mx1.test", "192.0.2.1", hold_dot=True)
    s = Setup(server)
    d = s.deliver()
    s.pump()
    server.links[0].server_close = True
    s.pump()
    assert transient(outcome(d)) == (
        "lost connection with mx1.test[192.0.2.1] while waiting for the reply to the end of data"
    )


def test_protocol_error_on_garbage_reply():
    server = FakeSmarthost("mx1.test", "192.0.2.1", greeting="hello there")
    s = Setup(server)
    assert "protocol error from mx1.test[192.0.2.1]" in transient(s.run())


def test_overlong_reply_is_a_protocol_error():
    lines = "\n".join(["250-" + "x" * 900] * 120 + ["250 end"])
    server = FakeSmarthost("mx1.test", "192.0.2.1", ehlo_reply=lines)
    s = Setup(server)
    assert "reply too long" in transient(s.run())


# ---------------------------------------------------------------------------
# Connection cache, concurrency, rate
# ---------------------------------------------------------------------------


def test_connection_reuse_with_rset_and_idle_close_with_quit():
    s = Setup()
    r1 = s.run()
    assert s.courier.idle_connections == 1
    r2 = s.run(envelope("c@example.net"))
    assert r1.recipients[0].status == r2.recipients[0].status == SENT
    assert s.server.connections == 1
    assert (r1.conn_use, r2.conn_use) == (1, 2)  # Postfix's conn_use= in the mail log
    assert s.server.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    s.advance(IDLE_TIMEOUT - 0.5)
    assert not s.server.links[0].lost
    s.advance(1)
    assert s.server.verbs[-1] == "QUIT"
    assert s.server.links[0].lost
    assert s.courier.connections == 0


def test_dead_cached_connection_is_replaced():
    s = Setup()
    s.run()
    # The server closes the idle connection without telling us (no FIN seen yet):
    # RSET fails; a new connection takes the message.
    s.server.links[0].server_close = False
    s.server.silent = {"RSET"}
    d = s.deliver()
    s.pump()
    assert not d.called
    s.server.silent = set()
    s.advance(300)
    result = outcome(d)
    assert result.recipients[0].status == SENT
    assert s.server.connections == 2


def test_unsolicited_close_of_idle_connection():
    s = Setup()
    s.run()
    conn = s.server.links[0].conn
    conn.reply("421 4.4.2 fake.test Error: timeout exceeded")
    s.pump()
    assert s.server.links[0].lost
    assert s.courier.connections == 0
    assert s.run().recipients[0].status == SENT
    assert s.server.connections == 2


def test_errored_connection_is_not_reused():
    server = FakeSmarthost("mx1.test", "192.0.2.1", mail_reply="451 4.3.0 later")
    s = Setup(server)
    transient(s.run())
    assert server.links[0].lost
    server.mail_reply = "250 2.1.0 Ok"
    assert s.run().recipients[0].status == SENT
    assert server.connections == 2


def test_concurrency_limit():
    server = FakeSmarthost("mx1.test", "192.0.2.1", hold_dot=True)
    s = Setup(server, concurrency=2)
    ds = [s.courier.deliver(f"Q{i}", envelope(), MESSAGE) for i in range(3)]
    s.pump()
    assert server.connections == 2
    assert s.courier.connections == 2
    assert len(server.messages) == 2
    assert not any(d.called for d in ds)
    server.hold_dot = False
    server.release()
    s.pump()
    assert all(outcome(d).recipients[0].status == SENT for d in ds)
    # The third went over a reused connection.
    assert server.connections == 2
    assert len(server.messages) == 3
    assert server.verbs.count("RSET") == 1


def test_max_rate_spacing():
    s = Setup(max_rate=Rate(2, 10.0))
    ds = [s.courier.deliver(f"Q{i}", envelope(), MESSAGE) for i in range(4)]
    s.pump()
    assert [d.called for d in ds] == [True, True, False, False]
    s.advance(4.9)
    assert not ds[2].called
    s.advance(0.2)
    assert ds[2].called and not ds[3].called
    s.advance(5)
    assert ds[3].called
    assert all(outcome(d).recipients[0].status == SENT for d in ds)


def test_stop_closes_idle_connections():
    s = Setup()
    s.run()
    d = s.courier.stop()
    s.pump()
    assert outcome(d) is None
    assert s.server.verbs[-1] == "QUIT"
    assert transient(s.run()).endswith("shutting down")


def test_duplicate_recipients_each_get_a_result():
    s = Setup()
    result = s.run(envelope("b@example.net", "b@example.net"))
    assert len(result.recipients) == 2


def test_logs_carry_the_queue_id_and_never_the_password(capsys):
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = FakeSmarthost("mx1.test", "192.0.2.1", starttls=True, auth="PLAIN",
                               auth_reply="535 5.7.8 bad")
        second = FakeSmarthost("mx2.test", "192.0.2.2", refuse=True)
        s = Setup(server, second, tls="starttls", tls_verify=False, username="u",
                  password="hunter2")
        transient(s.run())
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    mine = [formatEvent(e) for e in events if e.get("log_namespace") == "relayd.courier"]
    assert mine
    assert all("QID1" in m or "route" in m for m in mine)
    assert not any("hunter2" in m or "aHVudGVyMg" in m for m in mine)

