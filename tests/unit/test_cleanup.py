"""Cleanup: the headers a relay adds, hop counting, line lengths, capacity.

Most tests run against the real spool on ``tmp_path`` (with
``InlineDiskWriter``), so "nothing is in the spool" means no file; the
property tests use ``MemorySpool`` because hypothesis runs them hundreds of
times and function-scoped fixtures do not mix with ``@given``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relayd import cleanup as cleanup_module
from relayd.cleanup import HEADER_LIMIT, KEEP_LIMIT, MAX_LINE, Cleanup, split_long_lines
from relayd.diskio import InlineDiskWriter
from relayd.envelope import QueuedMessage
from relayd.errors import QueueFull, SMTPReply
from relayd.interfaces import IMessageReceiver, ISession, ISubmissionSink
from relayd.queue.spool import Spool
from relayd.testing import LogCapture, MemorySpool, RecordingArrival, failure_of
from relayd.testing import result_of as result

NOW = 1_700_000_000.0
#: NOW as RFC 5322 dates it.
NOW_TEXT = "Tue, 14 Nov 2023 22:13:20 +0000"
HOST = "relay.test"


@implementer(ISession)
@attrs.define
class FakeSession:
    """What the SMTP server hands cleanup: just the fields it reads."""

    listener: str = "mta"
    client_address: str = "192.0.2.1"
    route: str = "default"
    helo: str = "client.example"
    user: str | None = None
    protocol: str = "ESMTP"


@attrs.define
class Harness:
    """A Cleanup wired to a spool, with what it told the queue manager."""

    cleanup: Cleanup
    spool: Any
    clock: Clock
    arrival: RecordingArrival

    @property
    def queued(self) -> list[tuple[QueuedMessage, bytes | None]]:
        return self.arrival.arrived

    def submit(
        self,
        content: bytes,
        step: int | None = None,
        session: FakeSession | None = None,
        sender: str = "a@example.org",
        recipients: tuple[str, ...] = ("rcpt@example.net",),
        smtputf8: bool = False,
        body: str | None = None,
    ) -> Deferred[str]:
        """Feed one message in writes of ``step`` bytes (one write if None)."""
        message = self.cleanup.open_message(
            session or FakeSession(), sender, recipients, smtputf8, body
        )
        if step is None:
            message.write(content)
        else:
            for i in range(0, len(content), step):
                message.write(content[i : i + step])
        return message.finish()

    def stored(self, queue_id: str) -> bytes:
        return result(self.spool.load(queue_id)).read()

    def roundtrip(self, content: bytes, **kw: Any) -> tuple[str, bytes]:
        """Queue a message; its id and the content as spooled."""
        queue_id = result(self.submit(content, **kw))
        return queue_id, self.stored(queue_id)






def make(spool: Any = None, clock: Clock | None = None, **kw: Any) -> Harness:
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    spool = spool if spool is not None else MemorySpool(clock)
    arrival = RecordingArrival()
    cleanup = Cleanup(spool, HOST, clock, arrival, **kw)
    return Harness(cleanup, spool, clock, arrival)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """Cleanup over the real spool in tmp_path."""
    clock = Clock()
    clock.advance(NOW)
    spool = Spool(str(tmp_path / "spool"), clock, InlineDiskWriter())
    spool.prepare()
    return make(spool, clock)


def spool_files(spool: Spool) -> list[str]:
    return sorted(
        f"{sub}/{name}" for sub in ("tmp", "messages", "state") for name in os.listdir(spool.path(sub))
    )


def split_head(content: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, unfolded, without CRLF), body) of spooled content."""
    head, sep, body = content.partition(b"\r\n\r\n")
    assert sep, "no blank line after the header section"
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def received(
    queue_id: str, helo: str = "client.example", client: str = "192.0.2.1",
    protocol: str = "ESMTP", rcpt: str | None = "rcpt@example.net",
) -> bytes:
    """The Received: header cleanup should write, byte for byte."""
    for_clause = f"\r\n\tfor <{rcpt}>" if rcpt else ""
    return (
        f"Received: from {helo} ([{client}])\r\n\tby {HOST} (relayd) with {protocol} id "
        f"{queue_id}{for_clause}; {NOW_TEXT}"
    ).encode()


def ours(queue_id: str, message_id: bool = True, date: bool = True, **kw: Any) -> bytes:
    """Everything cleanup puts before the client's content."""
    out = received(queue_id, **kw) + b"\r\n"
    if message_id:
        out += f"Message-ID: <20231114221320.{queue_id}@{HOST}>\r\n".encode()
    if date:
        out += f"Date: {NOW_TEXT}\r\n".encode()
    return out


def anonymise(content: bytes, queue_id: str) -> bytes:
    return content.replace(queue_id.encode(), b"QUEUEID")


SIMPLE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


# -- the interfaces -------------------------------------------------------------


def test_provides_the_interfaces(h: Harness) -> None:
    """Cleanup is the server's ISubmissionSink; each message an IMessageReceiver."""
    assert verifyObject(ISubmissionSink, h.cleanup)
    message = h.cleanup.open_message(FakeSession(), "a@example.org", ("b@example.net",), False, None)
    assert verifyObject(IMessageReceiver, message)
    message.abort()


def test_envelope_comes_from_session_and_transaction(h: Harness) -> None:
    """The spooled envelope carries the session's and the transaction's facts."""
    session = FakeSession(listener="submission", client_address="2001:db8::7", route="outbox",
                          helo="laptop", user="app1")
    queue_id = result(h.submit(SIMPLE, session=session, sender="s@example.org",
                               recipients=("x@example.net", "y@example.net"), smtputf8=True,
                               body="8BITMIME"))
    [message] = result(h.spool.recover())
    e = message.envelope
    assert message.queue_id == queue_id
    assert (e.sender, e.recipients, e.route, e.arrival) == (
        "s@example.org", ("x@example.net", "y@example.net"), "outbox", NOW)
    assert (e.listener, e.client_address, e.helo, e.user, e.smtputf8, e.body) == (
        "submission", "2001:db8::7", "laptop", "app1", True, "8BITMIME")
    assert e.size == len(h.stored(queue_id))


# -- Received: ------------------------------------------------------------------


def test_received_header_is_first(h: Harness) -> None:
    """The exact Received: line comes first, then Message-ID/Date, then the message."""
    queue_id, stored = h.roundtrip(SIMPLE)
    assert stored == ours(queue_id) + SIMPLE
    assert stored.startswith(b"Received: from client.example ([192.0.2.1])\r\n\tby relay.test "
                             b"(relayd) with ESMTP id " + queue_id.encode())


def test_received_for_clause_only_with_one_recipient(h: Harness) -> None:
    """'for <rcpt>' names a single recipient, and is left out for several (privacy)."""
    queue_id, stored = h.roundtrip(SIMPLE, recipients=("only@example.net",))
    assert stored.startswith(received(queue_id, rcpt="only@example.net") + b"\r\n")
    queue_id, stored = h.roundtrip(SIMPLE, recipients=("one@example.net", "two@example.net"))
    assert stored.startswith(received(queue_id, rcpt=None) + b"\r\n")
    assert b"for <" not in stored


@pytest.mark.parametrize(
    ("protocol", "smtputf8", "user", "expected"),
    [
        ("ESMTP", False, None, "ESMTP"),
        ("SMTP", False, None, "SMTP"),
        ("ESMTP", True, None, "UTF8SMTP"),
        ("ESMTP", False, "app1", "ESMTPA"),
        ("ESMTP", True, "app1", "UTF8SMTPA"),
    ],
)
def test_received_with_protocol(
    h: Harness, protocol: str, smtputf8: bool, user: str | None, expected: str
) -> None:
    """'with' names the protocol as RFC 3848/6531 do: UTF8SMTP, the A for AUTH."""
    session = FakeSession(protocol=protocol, user=user)
    queue_id, stored = h.roundtrip(SIMPLE, session=session, smtputf8=smtputf8)
    assert stored.startswith(received(queue_id, protocol=expected) + b"\r\n")


def test_received_helo_sanitised(h: Harness) -> None:
    """A missing HELO reads 'unknown'; control characters cannot break the header."""
    queue_id, stored = h.roundtrip(SIMPLE, session=FakeSession(helo=""))
    assert stored.startswith(received(queue_id, helo="unknown") + b"\r\n")
    queue_id, stored = h.roundtrip(SIMPLE, session=FakeSession(helo="evil\r\nX-Injected: 1"))
    assert stored.startswith(received(queue_id, helo="evil??X-Injected: 1") + b"\r\n")


def test_received_utf8_recipient(h: Harness) -> None:
    """An SMTPUTF8 recipient is written as UTF-8 in the for clause."""
    queue_id, stored = h.roundtrip(SIMPLE, recipients=("ç@exemple.fr",), smtputf8=True)
    assert stored.startswith(received(queue_id, protocol="UTF8SMTP", rcpt="ç@exemple.fr")
                             + b"\r\n")


# -- Message-ID: and Date: ----------------------------------------------------


def test_message_id_and_date_added_when_missing(h: Harness) -> None:
    """Without Message-ID/Date the relay adds both; the id names queue id and host."""
    queue_id, stored = h.roundtrip(b"Subject: hi\r\n\r\nbody\r\n")
    fields, body = split_head(stored)
    [mid] = [f for f in fields if f.lower().startswith(b"message-id:")]
    [date] = [f for f in fields if f.lower().startswith(b"date:")]
    assert re.fullmatch(rb"Message-ID: <\d{14}\." + queue_id.encode() + rb"@relay\.test>", mid)
    assert date == f"Date: {NOW_TEXT}".encode()
    assert body == b"body\r\n"


@pytest.mark.parametrize(
    "header",
    [b"Message-ID: <x@y>", b"message-id: <x@y>", b"MESSAGE-ID:<x@y>", b"Message-Id  : <x@y>"],
)
def test_message_id_kept_whatever_its_case(h: Harness, header: bytes) -> None:
    """An existing Message-ID (any case, space before the colon) is not duplicated."""
    content = header + b"\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id, message_id=False, date=False) + content


def test_date_kept_message_id_added(h: Harness) -> None:
    """Each of Message-ID and Date is added on its own account."""
    content = b"date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id, date=False) + content
    content = b"Message-ID: <x@y>\r\n\r\nbody\r\n"
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id, message_id=False) + content


def test_lookalike_headers_do_not_count(h: Harness) -> None:
    """Resent-Message-ID, Resent-Date, and a Message-ID line in the body are not ours to trust."""
    content = (b"Resent-Message-ID: <r@y>\r\nResent-Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"\r\nMessage-ID: <body@y>\r\nDate: in the body\r\n")
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id) + content


# -- where the header section ends ----------------------------------------------


def test_content_without_headers_gets_blank_line(h: Harness) -> None:
    """Content that starts with a non-header line is body: a blank line separates it."""
    content = b"Just some text\r\nSubject: not a header here\r\n"
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id) + b"\r\n" + content


def test_content_starting_with_blank_line(h: Harness) -> None:
    """Content that starts with its blank line gets no second one."""
    content = b"\r\nbody only\r\n"
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id) + content


def test_headers_run_into_body_get_blank_line(h: Harness) -> None:
    """A non-header line right after headers is body: a blank line is inserted before it."""
    queue_id, stored = h.roundtrip(b"Subject: hi\r\n X-folded: still subject\r\nno colon here\r\n")
    assert stored == ours(queue_id) + (
        b"Subject: hi\r\n X-folded: still subject\r\n\r\nno colon here\r\n")


def test_headers_only_message(h: Harness) -> None:
    """A message of headers and no body is kept as it is (the blank line is optional)."""
    content = b"Subject: nothing else\r\n"
    queue_id, stored = h.roundtrip(content)
    assert stored == ours(queue_id) + content


def test_empty_message(h: Harness) -> None:
    """An empty message becomes our headers and the blank line; size counts them."""
    queue_id, stored = h.roundtrip(b"")
    assert stored == ours(queue_id) + b"\r\n"
    [(message, kept)] = h.queued
    assert message.envelope.size == len(stored)
    assert kept == stored


@pytest.mark.parametrize(
    "content",
    [
        SIMPLE,
        b"Subject: a\r\n\tfolded\r\nTo: b@example.net\r\n\r\n\r\nbody\r\n",
        b"Subject: a\r\nnot a header\r\nX: y\r\n",
        b"no headers at all\r\nline two\r\n",
        b"\r\n",
        b"Subject: x\r\n",
        b"Message-ID: <a@b>\r\nReceived: from x\r\n\r\nbody",
    ],
)
def test_bytewise_writes_give_the_same_result(content: bytes) -> None:
    """1-byte writes (and writes split between CR and LF) give what one write gives."""
    outputs = set()
    for step in (None, 1, 2, 3, 7):
        queue_id, stored = make().roundtrip(content, step=step)
        outputs.add(anonymise(stored, queue_id))
    assert len(outputs) == 1


def test_last_line_gets_crlf(h: Harness) -> None:
    """A final line without CRLF is terminated (RFC 5321 §4.1.1.4)."""
    queue_id, stored = h.roundtrip(b"Subject: x\r\n\r\nno newline at the end")
    assert stored == ours(queue_id) + b"Subject: x\r\n\r\nno newline at the end\r\n"
    queue_id, stored = h.roundtrip(b"Subject: x\r\n\r\n" + b"z" * 1500)
    assert stored.endswith(b"\r\n" + b"z" * MAX_LINE + b"\r\n" + b"z" * 502 + b"\r\n")


def test_header_section_search_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scanning a header section that arrives in small writes costs linear, not quadratic, work."""
    scanned = [0]
    real = cleanup_module._HEADER_SECTION

    class Counting:
        def match(self, data: bytes, pos: int = 0, *args: Any) -> Any:
            scanned[0] += len(data) - pos
            return real.match(data, pos, *args)

    monkeypatch.setattr(cleanup_module, "_HEADER_SECTION", Counting())
    line = b"X-Header: " + b"v" * 54 + b"\r\n"
    content = line * 256 + b"\r\nbody\r\n"
    make().roundtrip(content, step=len(line))
    assert scanned[0] <= 20 * len(content), f"scanned {scanned[0]} bytes for {len(content)}"


def test_header_limit_does_not_depend_on_chunking() -> None:
    """Where an over-long header section is cut off does not depend on write sizes."""
    line = b"X-Big: " + b"h" * 500 + b"\r\n"
    content = line * (HEADER_LIMIT // len(line) + 20) + b"\r\nbody\r\n"
    outputs = set()
    for step in (None, 64 * 1024):
        queue_id, stored = make().roundtrip(content, step=step)
        outputs.add(anonymise(stored, queue_id))
    assert len(outputs) == 1


def test_header_limit_spill_still_ends_in_body(h: Harness) -> None:
    """Headers never ending before HEADER_LIMIT: everything is still stored, lines bounded."""
    content = b"X-Big: " + b"h" * (HEADER_LIMIT + 10) + b"\r\n\r\nbody\r\n"
    queue_id, stored = h.roundtrip(content, step=64 * 1024)
    assert all(len(x) <= MAX_LINE for x in stored.split(b"\r\n"))
    assert stored.replace(b"\r\n", b"").endswith(content.replace(b"\r\n", b""))


# -- hop counting ---------------------------------------------------------------


def hops(n: int, body: bytes = b"body\r\n") -> bytes:
    trace = b"".join(
        b"Received: from h%d.example by h%d.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i + 1)
        for i in range(n)
    )
    return trace + b"Subject: loop\r\n\r\n" + body


def test_max_hops_received_is_accepted(h: Harness) -> None:
    """Exactly max_hops (default 50) Received: headers still go through."""
    assert h.cleanup.max_hops == 50
    queue_id, stored = h.roundtrip(hops(50))
    assert stored.count(b"\r\nReceived: ") + stored.startswith(b"Received: ") == 51
    assert len(h.queued) == 1


@pytest.mark.parametrize("body", [b"body\r\n", b"x" * 1000 + b"\r\n" * 2000])
def test_too_many_hops_is_a_loop(h: Harness, body: bytes) -> None:
    """max_hops + 1 Received: fails finish() with 554 5.4.6 and leaves nothing in the spool."""
    with LogCapture() as log:
        error = failure_of(h.submit(hops(51, body), step=4096))
    assert isinstance(error, SMTPReply)
    assert (error.code, error.enhanced) == (554, "5.4.6")
    assert spool_files(h.spool) == []
    assert h.queued == [] and log.lines == []


def test_too_many_hops_spilled_message_leaves_nothing(h: Harness) -> None:
    """A looping message big enough to have gone to tmp/ is removed from there too."""
    big = hops(51, (b"y" * 900 + b"\r\n") * 1500)  # ~1.3 MB: past the spill threshold
    message = h.cleanup.open_message(FakeSession(), "a@example.org", ("b@example.net",), False,
                                     None)
    for i in range(0, len(big), 64 * 1024):
        message.write(big[i : i + 64 * 1024])
    assert [f.split("/")[0] for f in spool_files(h.spool)] == ["tmp"]
    error = failure_of(message.finish())
    assert isinstance(error, SMTPReply) and error.code == 554
    assert spool_files(h.spool) == []


def test_hop_limit_is_configurable_and_case_insensitive() -> None:
    """max_hops is honoured and 'received :' in any case counts; Received in the body does not."""
    cleanup = make(max_hops=2)
    content = b"RECEIVED: a\r\nreceived : b\r\n\r\nReceived: in the body\r\n"
    assert result(cleanup.submit(content))
    error = failure_of(cleanup.submit(b"Received: c\r\n" + content))
    assert isinstance(error, SMTPReply) and error.code == 554


# -- long lines -------------------------------------------------------------------


def test_split_body_line() -> None:
    """A 2500-octet body line becomes lines of 998, 998 and 504 octets."""
    line = bytes(range(65, 91)) * 96 + b"abcd"  # 2500 octets
    out, column = split_long_lines(line + b"\r\n", 0, header=False)
    assert out == line[:998] + b"\r\n" + line[998:1996] + b"\r\n" + line[1996:] + b"\r\n"
    assert column == 0


def test_fold_header_line() -> None:
    """An over-long header line is folded with CRLF SPACE, every line within 998."""
    line = b"X-Long: " + b"w" * 2500  # 2508 octets: 998 + 997 + 513
    out, column = split_long_lines(line + b"\r\n", 0, header=True)
    lines = out.split(b"\r\n")
    assert [len(x) for x in lines] == [998, 998, 514, 0]
    assert all(x.startswith(b" ") for x in lines[1:3])
    assert out.replace(b"\r\n ", b"") == line + b"\r\n"


def test_exact_limit_is_untouched_one_more_is_split() -> None:
    """998 octets pass as they are (the same object); 999 are split."""
    ok = b"a" * 998 + b"\r\n" + b"b" * 998 + b"\r\n" + b"c" * 998
    out, column = split_long_lines(ok, 0, header=False)
    assert out is ok and column == 998
    short = b"line\r\n" * 500
    out, column = split_long_lines(short, 0, header=False)
    assert out is short and column == 0
    out, _ = split_long_lines(b"a" * 999 + b"\r\n", 0, header=False)
    assert out == b"a" * 998 + b"\r\na\r\n"


def test_column_carries_across_chunks() -> None:
    """A line split over two writes is measured as one line."""
    out1, column = split_long_lines(b"a" * 600, 0, header=False)
    assert (out1, column) == (b"a" * 600, 600)
    out2, column = split_long_lines(b"b" * 600 + b"\r\nshort\r\n", column, header=False)
    assert out2 == b"b" * 398 + b"\r\n" + b"b" * 202 + b"\r\nshort\r\n"
    assert column == 0
    out3, column = split_long_lines(b"c" * 500, 0, header=False)
    out4, column = split_long_lines(b"c" * 498 + b"\r", column, header=False)
    out5, column = split_long_lines(b"\nd\r\n", column, header=False)
    assert out3 + out4 + out5 == b"c" * 998 + b"\r\nd\r\n"


def test_long_lines_in_a_message(h: Harness) -> None:
    """Through cleanup: a long Subject is folded and a long body line split."""
    subject = b"Subject: " + b"s" * 1500
    body_line = b"b" * 2100
    queue_id, stored = h.roundtrip(subject + b"\r\n\r\n" + body_line + b"\r\n", step=333)
    assert all(len(x) <= MAX_LINE for x in stored.split(b"\r\n"))
    fields, body = split_head(stored)
    assert subject in [f.replace(b"\r\n ", b"") for f in fields]
    assert body.replace(b"\r\n", b"") == body_line


def split_reference(lines: list[bytes], header: bool) -> list[bytes]:
    """Each line cut into pieces of at most 998 (continuations: SPACE + 997)."""
    out = []
    for line in lines:
        out.append(line[:MAX_LINE])
        rest = line[MAX_LINE:]
        step = MAX_LINE - 1 if header else MAX_LINE
        while rest:
            out.append((b" " if header else b"") + rest[:step])
            rest = rest[step:]
    return out


line_lengths = st.one_of(
    st.sampled_from([0, 1, 996, 997, 998, 999, 1000, 1995, 1996, 1997, 2994]),
    st.integers(0, 3000),
)


@st.composite
def chunked_lines(draw: Any) -> tuple[list[bytes], bytes, list[bytes]]:
    """Lines (no CR/LF in them), the CRLF text they make, and that text cut at random."""
    lengths = draw(st.lists(line_lengths, min_size=1, max_size=6))
    fill = draw(st.binary(min_size=1, max_size=20).map(
        lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n")))
    lines = [(fill * (n // len(fill) + 1))[:n] for n in lengths]
    data = b"\r\n".join(lines) + b"\r\n"
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return lines, data, chunks


@settings(max_examples=300, deadline=None)
@given(chunked_lines(), st.booleans())
def test_split_property(sample: tuple[list[bytes], bytes, list[bytes]], header: bool) -> None:
    """Any chunking: every line <= 998, and removing the inserted breaks gives the input."""
    lines, data, chunks = sample
    column, out = 0, []
    for chunk in chunks:
        piece, column = split_long_lines(chunk, column, header=header)
        out.append(piece)
    joined = b"".join(out)
    assert column == 0
    assert all(len(x) <= MAX_LINE for x in joined.split(b"\r\n"))
    assert joined.split(b"\r\n")[:-1] == split_reference(lines, header)
    if not header:
        assert joined.replace(b"\r\n", b"") == data.replace(b"\r\n", b"")


@settings(max_examples=150, deadline=None)
@given(chunked_lines(), st.lists(st.integers(1, 40), max_size=3))
def test_cleanup_property(sample: tuple[list[bytes], bytes, list[bytes]], head: list[int]) -> None:
    """Through cleanup, any chunking gives one result with every line within 998."""
    lines, data, chunks = sample
    headers = b"".join(b"X-H%d: " % i + b"v" * n + b"\r\n" for i, n in enumerate(head))
    content = headers + b"\r\n" + data
    whole = make()
    queue_id, expected = whole.roundtrip(content)
    expected = anonymise(expected, queue_id)
    assert all(len(x) <= MAX_LINE for x in expected.split(b"\r\n"))
    assert expected.endswith(b"\r\n" + b"\r\n".join(split_reference(lines, False)) + b"\r\n")
    h = make()
    message = h.cleanup.open_message(FakeSession(), "a@example.org", ("b@example.net",), False,
                                     None)
    message.write(headers + b"\r\n")
    for chunk in chunks:
        message.write(chunk)
    queue_id = result(message.finish())
    assert anonymise(h.stored(queue_id), queue_id).replace(b"<b@example.net>", b"<x>") == \
        expected.replace(b"<rcpt@example.net>", b"<x>")


# -- capacity ---------------------------------------------------------------------


def test_queue_full() -> None:
    """A queue (IQueueArrival's len) at max_messages refuses with 452 4.3.1; below it accepts."""
    cleanup = make(max_messages=3)
    cleanup.arrival.size = 2
    cleanup.cleanup.check_capacity()
    cleanup.arrival.size = 3
    with pytest.raises(QueueFull) as e:
        cleanup.cleanup.check_capacity()
    assert (e.value.code, e.value.enhanced) == (452, "4.3.1")
    assert isinstance(e.value, SMTPReply)


def test_min_free_disk_larger_than_disk(tmp_path: Path) -> None:
    """Asking for more free space than the disk has refuses with 452 4.3.1."""
    ok = make(MemorySpool(directory=str(tmp_path)), min_free_disk=1)
    ok.cleanup.check_capacity()
    full = make(MemorySpool(directory=str(tmp_path)), min_free_disk=2**62)
    with pytest.raises(QueueFull) as e:
        full.cleanup.check_capacity()
    assert (e.value.code, e.value.enhanced) == (452, "4.3.1")


def test_unreadable_spool_counts_as_full(tmp_path: Path) -> None:
    """statvfs failing (spool gone) refuses mail rather than accepting it blindly."""
    h = make(MemorySpool(directory=str(tmp_path / "missing")), min_free_disk=1)
    with pytest.raises(QueueFull):
        h.cleanup.check_capacity()


def test_disk_check_is_cached_for_one_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """statvfs runs at most once per second of clock time, and its verdict is reused."""
    calls: list[str] = []
    free = [10_000]

    def statvfs(path: str) -> SimpleNamespace:
        calls.append(path)
        return SimpleNamespace(f_bavail=free[0], f_frsize=1)

    monkeypatch.setattr(os, "statvfs", statvfs)
    h = make(MemorySpool(directory="/spool"), min_free_disk=5_000)
    h.cleanup.check_capacity()
    assert calls == ["/spool"]
    free[0] = 100
    h.clock.advance(0.5)
    h.cleanup.check_capacity()  # cached: still fine
    h.clock.advance(0.49)
    h.cleanup.check_capacity()
    assert len(calls) == 1
    h.clock.advance(0.01)
    with pytest.raises(QueueFull):
        h.cleanup.check_capacity()
    assert len(calls) == 2
    free[0] = 10_000
    h.clock.advance(0.9)
    with pytest.raises(QueueFull):  # the bad verdict is cached as well
        h.cleanup.check_capacity()
    h.clock.advance(0.1)
    h.cleanup.check_capacity()
    assert len(calls) == 3


def test_no_disk_check_without_min_free_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """min_free_disk = 0 means no statvfs at all."""
    monkeypatch.setattr(os, "statvfs", lambda path: pytest.fail("statvfs called"))
    make().cleanup.check_capacity()


# -- handing over to the queue manager, and the mail log ----------------------------


def test_on_queued_called_once_with_message_and_content(h: Harness) -> None:
    """After the commit, on_queued gets the QueuedMessage and the exact spooled content."""
    queue_id, stored = h.roundtrip(SIMPLE)
    [(message, content)] = h.queued
    assert message.queue_id == queue_id
    assert message.envelope.size == len(stored)
    assert content == stored


def test_on_queued_without_content_past_keep_limit(h: Harness) -> None:
    """Past KEEP_LIMIT the content is not kept in memory (None); it is still spooled."""
    body = (b"x" * 70 + b"\r\n") * (KEEP_LIMIT // 72 + 10)
    queue_id, stored = h.roundtrip(b"Subject: big\r\n\r\n" + body, step=8192)
    [(message, content)] = h.queued
    assert content is None
    assert message.envelope.size == len(stored) > KEEP_LIMIT
    assert stored.endswith(body)


def test_on_queued_not_called_before_durable(h: Harness) -> None:
    """on_queued runs only once the commit has succeeded, not on write or finish."""
    spool = MemorySpool()
    hh = make(spool)
    message = hh.cleanup.open_message(FakeSession(), "a@example.org", ("b@example.net",), False,
                                      None)
    message.write(SIMPLE)
    assert hh.queued == []
    spool.fail_commit = OSError(28, "No space left on device")
    with LogCapture() as log:
        error = failure_of(message.finish())
    assert isinstance(error, OSError)
    assert hh.queued == [] and log.lines == [] and len(spool) == 0


def test_abort_leaves_nothing(h: Harness) -> None:
    """abort() after some writes leaves no file and tells nobody."""
    message = h.cleanup.open_message(FakeSession(), "a@example.org", ("b@example.net",), False,
                                     None)
    message.write(SIMPLE)
    message.write(b"more\r\n" * 300_000)
    message.abort()
    assert spool_files(h.spool) == [] and h.queued == []


def test_mail_log_line(h: Harness) -> None:
    """One Postfix-style line per queued message: id, from, size, nrcpt, listener, client."""
    with LogCapture() as log:
        queue_id, stored = h.roundtrip(SIMPLE, recipients=("x@example.net", "y@example.net"))
    assert log.lines == [
        f"{queue_id}: from=<a@example.org> size={len(stored)} nrcpt=2 listener=mta "
        "client=[192.0.2.1]"
    ]
    assert log.events[0]["queue_id"] == queue_id


def test_mail_log_line_user_and_null_sender(h: Harness) -> None:
    """The authenticated user is logged; the null sender shows as from=<>."""
    session = FakeSession(listener="submission", client_address="2001:db8::1", user="app1")
    with LogCapture() as log:
        queue_id, stored = h.roundtrip(SIMPLE, session=session, sender="")
    assert log.lines == [
        f"{queue_id}: from=<> size={len(stored)} nrcpt=1 listener=submission "
        "client=[2001:db8::1] user=app1"
    ]


def test_cleanup_is_fast_enough() -> None:
    """A 1 MB message in 64 KB writes takes well under a second (no per-line Python work)."""
    content = b"Subject: x\r\n\r\n" + (b"y" * 76 + b"\r\n") * 13_000
    started = time.perf_counter()
    make().roundtrip(content, step=64 * 1024)
    assert time.perf_counter() - started < 1.0
