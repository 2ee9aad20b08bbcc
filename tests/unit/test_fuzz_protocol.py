"""Property tests of the ESMTP server against arbitrary client bytes.

In memory (StringTransport, task.Clock, RecordingSink from relayd.testing).
Whatever a client sends, in whatever pieces, with time passing, commits held
and released, and the connection dropped at any point:

- the protocol never raises, and never writes after it asked to close;
- nothing is recorded by the sink without a ``250 2.0.0 Ok: queued`` reply
  (except a commit that completes after the client has gone), every such
  reply has a recorded message behind it (invariant 1), and there are never
  more messages than ``354`` replies or end-of-data sequences in the input
  (invariant 4: only ``<CRLF>.<CRLF>`` ends DATA);
- recorded content has no bare CR or LF (the default ``normalize``);
- once the connection is lost, no receiver is left open and no timer pending.

The checks live in :func:`run_session` and :func:`check`, shared with
``bench/fuzz_protocol.py``, which runs the same properties for longer.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.errors import SMTPReply
from relayd.testing import smtp_server

EXAMPLES = 200 if os.environ.get("CI") else 500
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

QUEUED = b"250 2.0.0 Ok: queued as "
GO_AHEAD = b"354 "
#: Every end of DATA contains these bytes in the input: ``<CRLF>.<CRLF>``,
#: or ``.<CRLF>`` right after the DATA line's own line end (bare LF allowed).
END_OF_DATA = b"\n.\r\n"
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class WatchedTransport(StringTransport):
    """A StringTransport that records writes made after ``loseConnection``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.late_writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            self.late_writes.append(data)
        super().write(data)


class Outcome:
    """What one fuzzed session did."""

    def __init__(self) -> None:
        self.fed = bytearray()
        self.output = b""
        self.late_commits = 0
        self.messages: list[bytes] = []
        self.open_receivers = 0
        self.timers_left = 0
        self.late_writes: list[bytes] = []
        self.normalize = True


def run_session(ops: list[tuple[str, Any]], hold: bool = False, client_ip: str = "127.0.0.1",
                **listener: Any) -> Outcome:
    """Play ``ops`` against a fresh server: ``("data", bytes)``, ``("tick", seconds)``,
    ``("release", None)`` (the oldest held commit succeeds), ``("fail", None)`` (it
    fails), ``("lose", None)`` (the client goes away).  The connection is always lost
    at the end, and held commits released, as the reactor would."""
    protocol, transport, clock, sink, _ = smtp_server(
        client_ip, transport_class=WatchedTransport, **listener
    )
    assert isinstance(transport, WatchedTransport)
    sink.hold = hold
    out = Outcome()
    out.normalize = protocol.factory.listener.bare_newline == "normalize"
    lost = False

    def lose() -> None:
        nonlocal lost
        if not lost:
            lost = True
            protocol.connectionLost(Failure(ConnectionDone()))

    for kind, value in ops:
        if kind == "data":
            if not lost:
                out.fed += value
                protocol.dataReceived(value)
        elif kind == "tick":
            clock.advance(value)
        elif kind in ("release", "fail") and sink.pending:
            out.late_commits += lost and kind == "release"
            if kind == "release":
                sink.release()
            else:
                sink.pending[0].fail(SMTPReply(452, "4.3.1", "Insufficient system storage"))
        elif kind == "lose":
            lose()
    lose()
    while sink.pending:
        out.late_commits += 1
        sink.release()
    out.output = transport.value()
    out.late_writes = transport.late_writes
    out.messages = [m.content for m in sink.messages]
    out.open_receivers = sum(1 for r in sink.receivers if r.state == "open")
    out.timers_left = len(clock.getDelayedCalls())
    return out


def check(out: Outcome) -> None:
    """The properties; raises AssertionError with the evidence."""
    assert out.late_writes == [], out.late_writes
    assert out.output.endswith(b"\r\n"), out.output[-200:]
    queued = out.output.count(QUEUED)
    go_aheads = sum(1 for line in out.output.split(b"\r\n") if line.startswith(GO_AHEAD))
    n = len(out.messages)
    # No message without its 250 (a commit finishing after the client left aside)...
    assert n <= queued + out.late_commits, (n, queued, out.late_commits)
    # ...and no 250 without a durable message behind it.
    assert queued <= n, (queued, n)
    assert n <= go_aheads, (n, go_aheads)
    assert n <= bytes(out.fed).count(END_OF_DATA), (n, bytes(out.fed))
    if out.normalize:
        for content in out.messages:
            assert not _BARE.search(content), content
    assert out.open_receivers == 0
    assert out.timers_left == 0


# -- strategies --------------------------------------------------------------------

COMMANDS = [
    b"EHLO client.example\r\n", b"HELO x\r\n", b"ehlo y\n",
    b"MAIL FROM:<a@example.org>\r\n", b"MAIL FROM:<>\r\n", b"mail from:<a@example.org> BODY=8BITMIME\r\n",
    b"MAIL FROM:<a@example.org> SIZE=99999999999\r\n", b"MAIL FROM:<\xc3\xa4@example.org> SMTPUTF8\r\n",
    b"RCPT TO:<b@example.net>\r\n", b"RCPT TO:<c@example.net>\n", b"RCPT TO:<user%x@y>\r\n",
    b"DATA\r\n", b"DATA\n", b"data\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n",
    b"HELP\r\n", b"BDAT 10 LAST\r\n", b"STARTTLS\r\n", b"AUTH PLAIN AGEAYg==\r\n",
    b"GET / HTTP/1.1\r\n",
]
FRAGMENTS = [
    b"\r\n.\r\n", b".\r\n", b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n..\r\n", b"\n.\n",
    b"\r.\r", b"\x00", b"Subject: x\r\n\r\n", b"body line\r\n", b" ", b"\xff",
]
piece = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(FRAGMENTS),
    st.binary(max_size=24),
    st.integers(500, 2100).map(lambda n: b"X" * n),
)
#: A transaction opening, a body of fragments and an end-of-data look-alike (or
#: the real thing), so that whole messages are common, not a lucky accident.
transaction = st.tuples(
    st.sampled_from([
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\n",
    ]),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=16)), max_size=12),
    st.sampled_from([b"\r\n.\r\n"] * 4 + [b".\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r\n", b"\r\n"]),
).map(lambda t: t[0] + b"".join(t[1]) + t[2])
smtpish = st.lists(st.one_of(piece, transaction, transaction, transaction),
                   min_size=1, max_size=30).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn, payload: st.SearchStrategy[bytes],
            extras: bool = False) -> list[tuple[str, Any]]:
    """``payload`` cut at random places; with ``extras``, clock ticks, commit
    releases/failures and a disconnect sprinkled between the pieces."""
    data = draw(payload)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=24))))
    bounds = [0, *cuts, len(data)]
    ops: list[tuple[str, Any]] = []
    # Mostly nothing between pieces: a timeout ends the session, so it must be rare.
    between = st.sampled_from([None] * 16 + [
        ("tick", 1.0), ("tick", 301.0), ("tick", 700.0),
        ("release", None), ("release", None), ("release", None), ("fail", None),
    ])
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            ops.append(("data", data[a:b]))
        if extras:
            extra = draw(between)
            if extra is not None:
                ops.append(extra)
    if extras and ops and draw(st.integers(0, 5)) == 0:
        ops.insert(draw(st.integers(0, len(ops))), ("lose", None))
    return ops


LISTENERS = st.sampled_from([
    {},
    {},
    {},
    {"bare_newline": "reject"},
    {"max_message_size": "64", "max_recipients": 1},
    {"max_errors_per_session": 2, "timeout": 5},
    {"mynetworks": ["192.0.2.0/24"]},
])


# -- the properties ------------------------------------------------------------------


@FUZZ
@given(ops=chunked(st.binary(max_size=2048)))
def test_random_bytes(ops: list[tuple[str, Any]]) -> None:
    """Random bytes in random pieces."""
    check(run_session(ops))


@FUZZ
@given(ops=chunked(smtpish, extras=True), hold=st.booleans(), listener=LISTENERS)
def test_smtp_like_streams(ops: list[tuple[str, Any]], hold: bool, listener: dict) -> None:
    """SMTP commands, dots, CR/LF fragments and junk, in random pieces, with time
    passing, commits held/released/failed, and the client leaving at any point."""
    check(run_session(ops, hold=hold, **listener))


@st.composite
def transactions(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Well-formed pipelined transactions with arbitrary line content (dots at line
    starts included), dot-stuffed as a client must; and the contents expected."""
    line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    bodies = draw(st.lists(st.lists(line, max_size=8), min_size=1, max_size=4))
    stream = b"EHLO client.example\r\n"
    expected = []
    for lines in bodies:
        stuffed = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
        stream += (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                   + stuffed + b".\r\n")
        # NULs are stripped by the default listener (nul = "strip", issue 14.2).
        expected.append(b"".join(x.replace(b"\x00", b"") + b"\r\n" for x in lines))
    return stream + b"QUIT\r\n", expected


@FUZZ
@given(case=transactions(), data=st.data())
def test_well_formed_transactions_round_trip(case: tuple[bytes, list[bytes]], data) -> None:
    """Whatever the chunking: every message arrives once, byte-exact, unstuffed."""
    stream, expected = case
    ops = data.draw(chunked(st.just(stream)))
    out = run_session(ops)
    check(out)
    assert out.messages == expected
    assert out.output.count(QUEUED) == len(expected)
    assert out.output.endswith(b"221 2.0.0 Bye\r\n")
