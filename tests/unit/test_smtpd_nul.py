"""NUL in DATA (issue 14.2): never relayed by default; ``nul = "reject"`` refuses.

A next hop that drops NULs before it looks for end-of-data would read
``CRLF NUL . CRLF`` as the end of the message, and what follows as a second
transaction (the SMTP smuggling variant Postfix answers with
``message_strip_characters = \\0``).  The forwarding side is tested against
a real smarthost in tests/system/test_attacks.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.smtpd.datareader import DataReader
from relayd.testing import Conversation

SMUGGLE = (b"Subject: outer\r\n\r\nhello\r\n\x00.\r\nMAIL FROM:<evil@example.org>\r\n"
           b"RCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nboo\r\n"
           b".\r\n")
ENVELOPE = "EHLO client\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def feed_all(reader: DataReader, chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    out = []
    for chunk in chunks:
        content, rest = reader.feed(chunk)
        out.append(content)
        if rest is not None:
            return b"".join(out), rest
    return b"".join(out), None


def test_strip_removes_nul_after_unstuffing():
    """``NUL .`` is the content line ``.`` (the client did not stuff it);
    ``. . NUL`` is a stuffed line whose content is ``.``."""
    reader = DataReader(strip_nul=True)
    content, rest = feed_all(reader, [b"a\x00b\r\n\x00.\r\n..\x00\r\n\x00\r\n.\r\nQUIT\r\n"])
    assert content == b"ab\r\n.\r\n.\r\n\r\n"
    assert rest == b"QUIT\r\n"
    assert reader.nul


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=10), st.integers(1, 7))
def test_strip_leaves_no_nul_whatever_the_chunking(parts, size):
    wire = b"\r\n".join(parts).replace(b"\r\n.\r\n", b"\r\n..\r\n") + b"\r\n.\r\n"
    if wire.startswith(b".\r\n"):
        wire = b"." + wire
    chunks = [wire[i:i + size] for i in range(0, len(wire), size)]
    reader = DataReader(strip_nul=True)
    content, rest = feed_all(reader, chunks)
    assert b"\x00" not in content
    assert reader.nul == (b"\x00" in wire[: len(wire) - len(rest or b"")])


def test_kept_when_not_stripping():
    reader = DataReader(strip_nul=False)
    content, _ = feed_all(reader, [b"a\x00b\r\n.\r\n"])
    assert content == b"a\x00b\r\n" and reader.nul


def test_default_listener_strips_and_queues_one_message():
    c = Conversation()
    assert c.listener.nul == "strip"
    replies = c.send(ENVELOPE)
    assert replies[-1].startswith("354")
    assert c.send(SMUGGLE)[-1].startswith("250 2.0.0 Ok: queued as")
    [message] = c.sink.messages
    assert b"\x00" not in message.content
    # The smuggled transaction is body text of the one message.
    assert b"\r\n.\r\nMAIL FROM:<evil@example.org>\r\n" in message.content
    assert message.recipients == ("b@example.net",)


def test_reject_listener_answers_554_after_the_data_and_the_session_goes_on():
    c = Conversation(nul="reject")
    c.send(ENVELOPE)
    assert c.send(SMUGGLE) == ["554 5.6.0 Error: NUL character received"]
    assert c.sink.messages == []
    assert c.send(ENVELOPE)[-1].startswith("354")
    assert c.send("clean\r\n.\r\n")[-1].startswith("250 2.0.0 Ok: queued as")


def test_reject_listener_queues_mail_without_nul():
    c = Conversation(nul="reject")
    c.send(ENVELOPE)
    assert c.send("Subject: fine\r\n\r\nbody\r\n.\r\n")[-1].startswith("250 2.0.0")
