"""CHUNKING (RFC 3030): BDAT on the server (issue 14.6), on a StringTransport.

The real-MTA side (Exim 4.96 sending with BDAT) is tests/integration/test_exim_bdat.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.smtpd.chunking import ChunkReader, parse_bdat
from relayd.testing import Conversation, sample

MAIL = "EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
OKS = ["250 2.1.0 Ok", "250 2.1.5 Ok"]


def queued(line: str) -> bool:
    return line.startswith("250 2.0.0 Ok: queued as ")


def start(c: Conversation) -> None:
    assert c.send(MAIL)[-2:] == OKS


def test_ehlo_advertises_chunking():
    assert Conversation().send("EHLO c\r\n")[-1] == "250 CHUNKING"


def test_one_chunk_last_is_queued_byte_for_byte():
    c = Conversation()
    start(c)
    body = b"Subject: x\r\n\r\n.leading dot\r\n.\r\nend\r\n"
    [reply] = c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert queued(reply)
    assert [m.content for m in c.sink.messages] == [body]


def test_chunks_pipelined_with_mail_and_rcpt_and_the_next_transaction():
    c = Conversation()
    first, second = b"Subject: one\r\n\r\nhello ", b"world\r\n"
    replies = c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                     b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(first), first, len(second), second)
                     + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.net>\r\nBDAT 5 LAST\r\n"
                       b"x\r\ny\n" + b"QUIT\r\n")
    assert replies.count(f"250 2.0.0 Ok: {len(first)} octets") == 1, replies
    assert sum(queued(r) for r in replies) == 2 and replies[-1] == "221 2.0.0 Bye"
    assert [m.content for m in c.sink.messages] == [first + second, b"x\r\ny\r\n"]


def test_binary_safe_sizes_count_octets_not_lines():
    """A chunk full of CRLF.CRLF and command text is content: only the count ends it."""
    c = Conversation()
    start(c)
    body = b"a\r\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.net>\r\n.\r\n"
    [reply] = c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert queued(reply)
    [m] = c.sink.messages
    assert m.content == body and m.recipients == ("b@example.net",)


def test_chunk_split_anywhere_and_a_cr_at_a_chunk_end():
    c = Conversation()
    start(c)
    wire = b"BDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd"
    replies = c.send_bytewise(wire)
    assert replies[0] == "250 2.0.0 Ok: 3 octets" and queued(replies[1])
    assert c.sink.messages[0].content == b"ab\r\ncd"


def test_bdat_0_last_ends_the_message():
    c = Conversation()
    start(c)
    first, last = c.send(b"BDAT 4\r\nabcdBDAT 0 LAST\r\n")
    assert first == "250 2.0.0 Ok: 4 octets" and queued(last)
    assert c.sink.messages[0].content == b"abcd"


def test_empty_message_with_bdat_0_last():
    c = Conversation()
    start(c)
    assert queued(c.send(b"BDAT 0 LAST\r\n")[0])
    assert c.sink.messages[0].content == b""


@pytest.mark.parametrize("arg", ["", "x", "-1", "1.5", "10 NOTLAST", "10 LAST extra",
                                 "99999999999999999999"])
def test_bad_sizes_are_501_and_the_session_goes_on(arg):
    c = Conversation()
    start(c)
    assert c.send(f"BDAT {arg}\r\n".replace("BDAT \r", "BDAT\r")) == [
        "501 5.5.4 Syntax: BDAT count [LAST]"]
    assert queued(c.send(b"BDAT 2 LAST\r\nok")[0])


def test_bdat_without_mail_is_503_after_consuming_the_chunk():
    c = Conversation()
    c.send("EHLO c\r\n")
    assert c.send(b"BDAT 12 LAST\r\nRSET\r\nNOOP\r\nNOOP\r\n") == [
        "503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok"]


def test_bdat_without_recipients_is_554_after_consuming_the_chunk():
    c = Conversation(client_ip="192.0.2.7", mynetworks=["10.0.0.0/8"])
    replies = c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                     b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert replies[-2:] == ["554 5.5.1 Error: no valid recipients", "250 2.0.0 Ok"]


def test_data_after_bdat_is_503_and_the_transaction_goes_on():
    c = Conversation()
    start(c)
    assert c.send(b"BDAT 3\r\nabcDATA\r\n") == ["250 2.0.0 Ok: 3 octets",
                                                "503 5.5.1 Error: DATA in a BDAT transaction"]
    assert queued(c.send(b"BDAT 2 LAST\r\nde")[0])
    assert c.sink.messages[0].content == b"abcde"


def test_too_big_is_552_after_the_chunk_and_nothing_is_queued():
    c = Conversation(max_message_size=10)
    start(c)
    replies = c.send(b"BDAT 8\r\n12345678BDAT 8\r\n12345678BDAT 1 LAST\r\nxNOOP\r\n")
    assert replies == ["250 2.0.0 Ok: 8 octets", "552 5.3.4 Error: message file too big",
                       "552 5.3.4 Error: message file too big", "250 2.0.0 Ok"]
    assert c.sink.messages == []
    assert sample(c.metrics, "relayd_smtp_rejects_total", {"code": "552", "status": "5.3.4"}) == 2


def test_huge_declared_chunk_is_read_and_refused_without_storing():
    c = Conversation(max_message_size=100)
    start(c)
    assert c.send(b"BDAT 1000 LAST\r\n") == []
    for _ in range(9):
        assert c.send(b"x" * 100) == []
    assert c.send(b"x" * 100 + b"NOOP\r\n") == ["552 5.3.4 Error: message file too big",
                                                "250 2.0.0 Ok"]
    assert c.sink.messages == []


def test_250_for_last_only_after_the_sink_is_durable():
    c = Conversation()
    c.sink.hold = True
    start(c)
    assert c.send(b"BDAT 2 LAST\r\nokNOOP\r\n") == []
    c.sink.release_all()
    replies = c.replies()
    assert queued(replies[0]) and replies[1] == "250 2.0.0 Ok"


def test_bare_newline_and_nul_rules_apply_to_chunks():
    c = Conversation(bare_newline="reject")
    start(c)
    assert c.send(b"BDAT 3 LAST\r\na\nb") == ["554 5.6.0 Error: bare <CR> or <LF> received"]
    c = Conversation(nul="reject")
    start(c)
    assert c.send(b"BDAT 3 LAST\r\na\x00b") == ["554 5.6.0 Error: NUL character received"]
    c = Conversation()
    start(c)
    assert queued(c.send(b"BDAT 6 LAST\r\na\nb\x00\r\r")[0])
    assert c.sink.messages[0].content == b"a\r\nb\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.lists(st.integers(0, 60), max_size=5))
def test_chunk_reader_is_the_same_whatever_the_chunking(data, cuts):
    whole = ChunkReader()
    expected = whole.feed(data) + whole.finish()
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in [*points, len(data)]:
        parts.append(data[last:p])
        last = p
    split = ChunkReader()
    got = b"".join(split.feed(p) for p in parts) + split.finish()
    assert got == expected
    assert b"\0" not in got and (split.bare_newline, split.nul) == (whole.bare_newline, whole.nul)


def test_parse_bdat():
    assert parse_bdat(b"0 LAST") == (0, True)
    assert parse_bdat(b"12 last") == (12, True)
    assert parse_bdat(b"7") == (7, False)


def test_half_close_after_pipelined_quit_still_gets_the_250():
    """The client shuts its sending side behind BDAT LAST + QUIT (Exim does): the
    message is answered once durable, then 221, then the close."""
    c = Conversation()
    c.sink.hold = True
    start(c)
    assert c.send(b"BDAT 2 LAST\r\nokQUIT\r\n") == []
    c.protocol.readConnectionLost()
    assert not c.transport.disconnecting
    c.sink.release_all()
    replies = c.replies()
    assert queued(replies[0]) and replies[1] == "221 2.0.0 Bye"
    assert c.transport.disconnecting and len(c.sink.messages) == 1


def test_half_close_mid_message_drops_it():
    c = Conversation()
    start(c)
    c.send(b"BDAT 10 LAST\r\nabc")
    c.protocol.readConnectionLost()
    assert c.transport.disconnecting and c.sink.messages == []
