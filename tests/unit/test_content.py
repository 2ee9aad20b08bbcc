"""Message content that is never held whole: the value, and everyone who reads it.

``Content`` is bytes or a region of a spool file.  These tests check the
value itself, the chunked dot-stuffer against ``dot_stuff`` of the whole
message (dots, CRs and LFs exactly at chunk joins, with tiny chunks so that
every join is hit), the smarthost client streaming a spooled body (wire
bytes, back-pressure, a file that disappears), the maildir copy, the bounce
builder reading only the header section, the queue manager handing a big
message to its courier as a file region on every attempt, and on the way
in, the spool's back-pressure reaching the SMTP client.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd import qmgr as qmgr_module
from relayd.bounce import HEADER_READ_LIMIT, build_dsn
from relayd.content import CHUNK, IN_MEMORY_LIMIT, Content, as_content, has_bare_newline
from relayd.courier import maildir as maildir_module
from relayd.courier.maildir import MaildirCourier
from relayd.courier.smarthost import DotStuffer, dot_stuff
from relayd.courier.smarthost import dotstuff as smarthost_module
from relayd.diskio import Batch, InlineDiskWriter, fsync_dir
from relayd.envelope import BOUNCED, DeliveryResult, Envelope, RecipientResult
from relayd.errors import PermanentDeliveryError, TransientDeliveryError
from relayd.metrics import Metrics
from relayd.qmgr import QueueManager
from relayd.queue.schedule import RetrySchedule
from relayd.queue.spool import MAX_BACKLOG, SPILL_THRESHOLD, Spool
from relayd.testing import Conversation, RecordingCourier
from relayd.testing import result_of as result
from tests.unit.test_smarthost_client import (
    FakeSmarthost,
    Setup,
    content_with_dots_at,
    outcome,
    transient,
)
from tests.unit.test_smarthost_client import envelope as smtp_envelope

NOW = 1_700_000_000.0


def spooled(tmp_path: Path, content: bytes, prefix: bytes = b'{"envelope": 1}\n') -> Content:
    """``content`` as a region of a file that starts with something else, as a
    queue file starts with its envelope line."""
    path = tmp_path / f"q{len(os.listdir(tmp_path))}"
    path.write_bytes(prefix + content + b"trailing bytes that are not the message")
    return Content.region(str(path), len(prefix), len(content))


# -- the value -------------------------------------------------------------------------


def test_bytes_and_region_read_alike(tmp_path: Path) -> None:
    """Same size, head, chunks, read and isascii whether in memory or in a file."""
    data = b"Subject: x\r\n\r\n" + bytes(range(256)) * 300
    for content in (Content.of(data), spooled(tmp_path, data)):
        assert content.size == len(data)
        assert content.head(14) == b"Subject: x\r\n\r\n"
        assert content.head(10 * len(data)) == data
        chunks = list(content.chunks(1000))
        assert b"".join(chunks) == data and {len(c) for c in chunks[:-1]} == {1000}
        assert content.read() == data
        assert not content.isascii()
    assert Content.of(data).in_memory and not spooled(tmp_path, data).in_memory
    assert spooled(tmp_path, b"ascii\r\n").isascii()


def test_empty_content_has_no_chunks(tmp_path: Path) -> None:
    for content in (Content.of(b""), spooled(tmp_path, b"")):
        assert list(content.chunks()) == [] and content.read() == b"" and content.head(5) == b""


def test_truncated_or_missing_file_is_an_oserror(tmp_path: Path) -> None:
    """A queue file shorter than the region never passes for a shorter message."""
    path = tmp_path / "q"
    path.write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="ends 50 bytes early"):
        Content.region(str(path), 0, 150).read()
    with pytest.raises(FileNotFoundError):
        next(Content.region(str(tmp_path / "gone"), 0, 10).chunks())


def test_repr_never_shows_the_message() -> None:
    assert "secret" not in repr(Content.of(b"secret"))


def test_as_content() -> None:
    c = Content.of(b"x")
    assert as_content(c) is c and as_content(b"x") == c


# -- chunked dot-stuffing --------------------------------------------------------------


def stuffed_in_chunks(data: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(stuffer.feed(data[start:cut]))
        start = cut
    out.append(stuffer.finish())
    return b"".join(out)


def whole(data: bytes) -> bytes:
    return b"".join(dot_stuff(data))


def test_stuffer_matches_dot_stuff_for_every_split_of_short_inputs() -> None:
    """Every string of up to 6 bytes over '.', CR, LF, 'x', cut at every pair of places."""
    for n in range(7):
        for letters in itertools.product(b".\r\nx", repeat=n):
            data = bytes(letters)
            for a in range(n + 1):
                for b in range(a, n + 1):
                    assert stuffed_in_chunks(data, [a, b]) == whole(data), (data, a, b)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.translate(bytes(b".\r\nxy"[i % 5]
                                                               for i in range(256)))),
       st.lists(st.integers(0, 200), max_size=20))
def test_stuffer_matches_dot_stuff_for_any_chunking(data: bytes, cuts: list[int]) -> None:
    cuts = [min(c, len(data)) for c in cuts]
    assert stuffed_in_chunks(data, cuts) == whole(data)


def test_stuffer_cases() -> None:
    """The awkward joins, spelled out."""
    # '.' right after a join, after CRLF, after a CR held back, after a bare LF.
    assert stuffed_in_chunks(b"a\r\n.b\r\n", [3]) == b"a\r\n..b\r\n.\r\n"
    assert stuffed_in_chunks(b"a\r\n.b\r\n", [2]) == b"a\r\n..b\r\n.\r\n"
    assert stuffed_in_chunks(b"a\r.b\r\n", [2]) == b"a\r\n..b\r\n.\r\n"
    assert stuffed_in_chunks(b"a\n.b\r\n", [2]) == b"a\r\n..b\r\n.\r\n"
    # The first line, and a message that ends without CRLF or in a bare CR.
    assert stuffed_in_chunks(b".x", [1]) == b"..x\r\n.\r\n"
    assert stuffed_in_chunks(b"x\r", [2]) == b"x\r\n.\r\n"
    assert stuffed_in_chunks(b"", []) == b".\r\n"


# -- the smarthost client streaming a spooled body ------------------------------------------


def wire_body(server: FakeSmarthost) -> bytes:
    raw = b"".join(server.feeds)
    return raw[raw.index(b"DATA\r\n") + len(b"DATA\r\n"):]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 4096])
def test_spooled_body_on_the_wire_is_dot_stuff_of_the_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Read and stuffed a few bytes at a time, the body on the wire is still exactly
    dot_stuff() of the whole message, and arrives intact."""
    monkeypatch.setattr(smarthost_module, "BODY_CHUNK", chunk)
    data = (b".first\r\nSubject: x\r\n\r\n.\r\n..\r\nbare\rcr\nlf\r\n.\r.\n"
            b"a\r\n.\r\nmid\r\n\r\n.last")
    s = Setup()
    assert s.run(smtp_envelope(), spooled(tmp_path, data)).recipients[0].status == "sent"
    assert wire_body(s.server) == whole(data)
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", data) + b"\r\n"
    assert s.server.messages[0]["data"] == normalised


def test_dots_at_every_chunk_join_of_a_spooled_message(tmp_path: Path) -> None:
    """The 16/64 KiB boundary test of the in-memory path, with the body read from a
    file in BODY_CHUNK pieces: dot lines sit exactly on the read boundaries."""
    boundaries = [16384 * k for k in range(1, 9)] + [65536 * 3, 65536 * 4 - 1, 65536 * 5 + 1]
    data = content_with_dots_at(boundaries, 400_000)
    s = Setup()
    result = s.run(smtp_envelope(), spooled(tmp_path, data))
    assert result.recipients[0].status == "sent"
    assert s.server.messages[0]["data"] == data
    assert wire_body(s.server) == whole(data)
    assert s.server.commands[1][0] == f"MAIL FROM:<a@example.org> SIZE={len(data)}"


def test_crlf_split_at_a_chunk_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CR at the end of one read and LF at the start of the next stay one CRLF."""
    monkeypatch.setattr(smarthost_module, "BODY_CHUNK", 8)
    data = b"1234567\r\n.234567\r\n" + b"x" * 7 + b"\r\n"
    s = Setup()
    s.run(smtp_envelope(), spooled(tmp_path, data))
    assert wire_body(s.server) == b"1234567\r\n..234567\r\n" + b"x" * 7 + b"\r\n.\r\n"


def test_eight_bit_found_beyond_the_first_chunk(tmp_path: Path) -> None:
    """The 8-bit scan reads the whole spooled message (a chunk at a time)."""
    data = b"Subject: x\r\n\r\n" + b"a" * (3 * CHUNK) + "é\r\n".encode()
    s = Setup()
    s.run(smtp_envelope(), spooled(tmp_path, data))
    assert s.server.commands[1][0] == f"MAIL FROM:<a@example.org> SIZE={len(data)} BODY=8BITMIME"
    assert s.server.messages[0]["data"] == data


def test_spooled_body_waits_for_the_transport(tmp_path: Path) -> None:
    """Back-pressure: one chunk is written per request of the transport, and the file
    is read no further ahead than the chunk after it."""
    data = b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * 5000
    server = FakeSmarthost("mx1.test", "192.0.2.1", stall_body=True)
    s = Setup(server)
    reads: list[int] = []
    content = spooled(tmp_path, data)
    real_chunks = Content.chunks

    def counting(self: Content, size: int = CHUNK) -> Any:
        for chunk in real_chunks(self, size):
            reads.append(len(chunk))
            yield chunk

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Content, "chunks", counting)
        d = s.deliver(smtp_envelope(), content)
        s.pump()
        link = server.links[0]
        # The 8-bit scan has read the file once, and the body has not started.
        assert link.producer is not None and sum(reads) == len(data)
        before = sum(reads)
        link.producer.resumeProducing()
        assert len(link.out) == smarthost_module.BODY_CHUNK
        assert sum(reads) - before <= 2 * smarthost_module.BODY_CHUNK
        link.stalled = False
        s.pump()
    assert outcome(d).recipients[0].status == "sent"
    assert s.server.messages[0]["data"] == data


def test_spool_file_gone_before_the_attempt_is_transient(tmp_path: Path) -> None:
    content = spooled(tmp_path, b"Subject: x\r\n\r\nbody\r\n")
    assert content.path is not None
    os.unlink(content.path)
    s = Setup()
    reply = transient(outcome(s.deliver(smtp_envelope(), content)))
    assert reply.startswith("cannot read the queued message: ")
    assert s.server.connections == 0


def test_spool_file_truncated_mid_data_aborts_without_the_dot(tmp_path: Path) -> None:
    """A read error while sending aborts the connection: the smarthost never sees the
    final dot, so it cannot accept a truncated message."""
    data = b"Subject: x\r\n\r\n" + (b"z" * 78 + b"\r\n") * 5000
    content = spooled(tmp_path, data)
    server = FakeSmarthost("mx1.test", "192.0.2.1", stall_body=True)
    s = Setup(server)
    d = s.deliver(smtp_envelope(), content)
    s.pump()
    link = server.links[0]
    link.producer.resumeProducing()
    assert content.path is not None
    with open(content.path, "r+b") as f:
        f.truncate(100_000)
    link.stalled = False
    s.pump()
    reply = transient(outcome(d))
    assert reply.startswith("cannot read the queued message: ") and "early" in reply
    assert server.messages == []


# -- the maildir copy -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 7, 64 * 1024])
def test_maildir_copies_a_spooled_message_in_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The file written from a spool region is the one written from bytes (CRLF as
    LF), with CRLF split across reads."""
    monkeypatch.setattr(maildir_module, "COPY_CHUNK", chunk)
    data = b"Subject: x\r\n\r\nline\r\n\r\n.\r\nbare\rcr\r\r\nend\r"
    env = Envelope(sender="s@example.org", recipients=("a@example.net",), route="outbox",
                   arrival=NOW)
    from_bytes = MaildirCourier(str(tmp_path / "a"), InlineDiskWriter(), "mx.test")
    from_file = MaildirCourier(str(tmp_path / "b"), InlineDiskWriter(), "mx.test")
    result(from_bytes.deliver("Q1", env, data))
    result(from_file.deliver("Q1", env, spooled(tmp_path, data)))
    [a] = (tmp_path / "a" / "new").iterdir()
    [b] = (tmp_path / "b" / "new").iterdir()
    assert b.read_bytes() == a.read_bytes()
    assert a.read_bytes().endswith(b"Subject: x\n\nline\n\n.\nbare\rcr\r\nend\r")


# -- bounces read the header section only ---------------------------------------------------


def dsn_of(content: Content | bytes) -> bytes:
    env = Envelope(sender="s@example.org", recipients=("r@example.net",), route="default",
                   arrival=NOW)
    return build_dsn(queue_id="Q1", envelope=env,
                     failed=[RecipientResult("r@example.net", BOUNCED, "550 5.1.1 no")],
                     content=content, reporting_mta="relay.test", bounce_from="", now=NOW)


def test_bounce_of_a_spooled_message_reads_only_its_head(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"Subject: big\r\nFrom: s@example.org\r\n\r\n" + b"body line\r\n" * 200_000
    content = spooled(tmp_path, data)
    expected = dsn_of(data)

    def no_chunks(self: Content, size: int = CHUNK) -> Any:
        raise AssertionError("the whole message was read for a bounce")

    monkeypatch.setattr(Content, "chunks", no_chunks)
    assert dsn_of(content) == expected
    assert b"Subject: big" in expected and b"body line" not in expected


def test_bounce_of_an_endless_header_section_is_bounded(tmp_path: Path) -> None:
    """A header section longer than HEADER_READ_LIMIT comes back cut at a line end."""
    line = b"X-Filler: " + b"f" * 60 + b"\r\n"
    data = line * (2 * HEADER_READ_LIMIT // len(line)) + b"\r\nbody\r\n"
    dsn = dsn_of(spooled(tmp_path, data))
    assert dsn == dsn_of(data)
    returned = dsn.split(b"Content-Type: text/rfc822-headers\r\n\r\n")[1]
    assert HEADER_READ_LIMIT - len(line) < returned.count(line) * len(line) <= HEADER_READ_LIMIT


# -- the queue manager hands big messages over as file regions ----------------------------


def qmgr_with_spool(tmp_path: Path, courier: RecordingCourier,
                    clock: Clock | None = None) -> tuple[QueueManager, Spool]:
    clock = clock or Clock()
    clock.advance(NOW)
    spool = Spool(str(tmp_path / "spool"), clock, InlineDiskWriter())
    spool.prepare()
    qm = QueueManager(spool, {"default": courier}, RetrySchedule((60.0,), 86400), clock,
                      Metrics(), {"default": 1}, hostname="relay.test")
    qm.startService()
    return qm, spool


def queue_big(qm: QueueManager, spool: Spool, size: int) -> tuple[Any, bytes]:
    data = b"Subject: big\r\n\r\n" + b"b" * (size - 18) + b"\r\n"
    writer = spool.open_message(Envelope(sender="s@example.org", recipients=("r@example.net",),
                                         route="default", arrival=NOW))
    writer.write(data)
    message = result(writer.commit())
    # What cleanup does past KEEP_LIMIT: no content, read back when its turn comes.
    qm.queued(message, None)
    return message, data


def test_big_message_goes_to_the_courier_as_a_region_on_every_attempt(tmp_path: Path) -> None:
    courier = RecordingCourier([TransientDeliveryError("451 later"), None])
    clock = Clock()
    qm, spool = qmgr_with_spool(tmp_path, courier, clock)
    message, data = queue_big(qm, spool, 2 * IN_MEMORY_LIMIT)
    clock.advance(60)
    assert len(courier.attempts) == 2
    for attempt in courier.attempts:
        assert attempt.source is not None and not attempt.source.in_memory
        assert attempt.content == data
    assert os.listdir(spool.path("messages")) == []


def test_permanent_failure_of_a_big_message_bounces_with_its_headers(tmp_path: Path) -> None:
    courier = RecordingCourier([PermanentDeliveryError("554 5.3.4 too big"), None])
    qm, spool = qmgr_with_spool(tmp_path, courier)
    queue_big(qm, spool, 3 * IN_MEMORY_LIMIT)
    dsn = courier.attempts[1]
    assert dsn.envelope.sender == "" and dsn.source is not None and dsn.source.in_memory
    assert b"Subject: big" in dsn.content and b"bbbb" not in dsn.content


def test_small_content_is_kept_within_the_byte_budget(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """What cleanup kept goes to the courier without a read-back while the ready
    messages' content fits the budget; past it, the content is read back."""
    monkeypatch.setattr(qmgr_module, "CONTENT_MEMORY_BUDGET", 3000)
    courier = RecordingCourier(hold=True)
    qm, spool = qmgr_with_spool(tmp_path, courier)
    kept = []
    for i in range(4):
        data = bytes([65 + i]) * 1000 + b"\r\n"
        writer = spool.open_message(Envelope(sender="s@example.org",
                                             recipients=("r@example.net",),
                                             route="default", arrival=NOW))
        writer.write(data)
        message = result(writer.commit())
        qm.queued(message, data)
        kept.append(message.queue_id)
    # The first is tried at once; two of the other three fit in 3000 bytes.
    for _ in range(4):
        courier.release(result=DeliveryResult("x"))
    assert [a.content[:1] for a in courier.attempts] == [b"A", b"B", b"C", b"D"]
    assert qm._in_memory == 0  # type: ignore[attr-defined]


# -- receiving: the spool's back-pressure reaches the client ---------------------------


class ManualDisk:
    """A disk writer whose jobs wait until the test runs them (a stalled disk)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Deferred[Any]]] = []

    def submit(self, job: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((job, d))
        return d

    def run(self, count: int | None = None) -> None:
        todo = self.jobs[:count] if count is not None else list(self.jobs)
        del self.jobs[: len(todo)]
        for job, d in todo:
            batch = Batch()
            value = job(batch)
            for path in batch.dirs:
                fsync_dir(path)
            d.callback(value)


def test_spool_writer_says_when_the_disk_is_behind(tmp_path: Path) -> None:
    """Past MAX_BACKLOG bytes handed to a disk thread that has not written them,
    write() returns a Deferred; it fires once half of that is on disk."""
    disk = ManualDisk()
    spool = Spool(str(tmp_path / "spool"), Clock(), disk)
    spool.prepare()
    writer = spool.open_message(Envelope(sender="s@example.org", recipients=("r@example.net",),
                                         route="default", arrival=NOW))
    piece = b"p" * 65535 + b"\n"
    answers = [writer.write(piece) for _ in range((MAX_BACKLOG + SPILL_THRESHOLD) // len(piece))]
    first = next(i for i, a in enumerate(answers) if a is not None)
    assert first * len(piece) >= MAX_BACKLOG and answers[first] is answers[-1]
    behind = answers[-1]
    assert behind is not None and not behind.called
    disk.run(2)
    assert not behind.called
    disk.run(1)
    assert behind.called
    assert writer.write(piece) is None
    d = writer.commit()
    disk.run()
    message = result(d)
    assert result(spool_load(spool, message.queue_id)) == piece * (len(answers) + 1)


def spool_load(spool: Spool, queue_id: str) -> Deferred[bytes]:
    disk = spool.disk
    spool.disk = InlineDiskWriter()
    try:
        return spool.load(queue_id).addCallback(lambda c: c.read())
    finally:
        spool.disk = disk


def test_server_stops_reading_while_the_spool_is_behind() -> None:
    """The SMTP server pauses its transport while the receiver is behind, and reads
    on once the spool caught up; the message is complete."""
    c = Conversation()
    c.send("EHLO client.test\r\n")
    assert c.transaction()[-1].startswith("354")
    behind: Deferred[None] = Deferred()
    c.sink.behind = behind
    c.send("Subject: x\r\n\r\n" + "line\r\n" * 100)
    assert c.transport.producerState == "paused"
    c.sink.behind = None
    behind.callback(None)
    assert c.transport.producerState == "producing"
    assert c.send("more\r\n.\r\n")[-1].startswith("250")
    assert c.sink.messages[0].content.endswith(b"line\r\nmore\r\n")


@given(st.binary(max_size=40).map(lambda b: bytes(b"\r\nx."[c % 4] for c in b)))
def test_has_bare_newline_is_the_counting_definition(data: bytes) -> None:
    """Every CR and LF in a CRLF pair, counted the slow way."""
    crlf = data.count(b"\r\n")
    assert has_bare_newline(data) == (data.count(b"\r") != crlf or data.count(b"\n") != crlf)
