"""The DATA transform: termination, unstuffing, bare newlines, any chunking."""

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.smtpd.datareader import DataReader


def stuff(content: bytes) -> bytes:
    """What an RFC 5321 client sends for CRLF ``content``."""
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def run(chunks, normalize=True):
    reader = DataReader(normalize=normalize)
    out = []
    for i, chunk in enumerate(chunks):
        content, rest = reader.feed(chunk)
        out.append(content)
        if rest is not None:
            return b"".join(out), rest + b"".join(chunks[i + 1 :]), reader
    return b"".join(out), None, reader


def split_at(data: bytes, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def test_simple_message_and_pipelined_rest():
    """The terminator ends the data; what follows is handed back."""
    content, rest, _ = run([b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"])
    assert content == b"Subject: x\r\n\r\nhello\r\n"
    assert rest == b"QUIT\r\n"


def test_empty_message():
    """A lone dot right after DATA is an empty message."""
    assert run([b".\r\n"])[:2] == (b"", b"")


def test_dot_stuffing_removed_including_first_line():
    """One leading dot is removed from every line, the first included."""
    content, rest, _ = run([b"..first\r\nmid\r\n...two\r\n.\r\n"])
    assert content == b".first\r\nmid\r\n..two\r\n"
    assert rest == b""


def test_terminator_split_over_every_boundary():
    """The terminator is found wherever the chunks break it."""
    raw = b"abc\r\n.\r\nNOOP\r\n"
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            content, rest, _ = run([raw[:i], raw[i:j], raw[j:]])
            assert (content, rest) == (b"abc\r\n", b"NOOP\r\n"), (i, j)


def test_bare_lf_dot_does_not_end_data():
    """<LF>.<LF> and its mixes are content, never the end (no smuggling)."""
    for eod in (b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r"):
        raw = b"hello" + eod + b"MAIL FROM:<evil@x>\r\n"
        content, rest, reader = run([raw])
        assert rest is None, eod
        assert reader.bare_newline
        assert b"MAIL FROM:<evil@x>" in content


def test_bare_newlines_normalised():
    """Bare CR and bare LF become CRLF; CRLF stays CRLF."""
    content, rest, reader = run([b"a\nb\rc\r\nd\r\n.\r\n"])
    assert content == b"a\r\nb\r\nc\r\nd\r\n"
    assert reader.bare_newline


def test_bare_newlines_kept_when_not_normalising():
    """In reject mode the flag is set and the content left alone."""
    content, _, reader = run([b"a\nb\r\n.\r\n"], normalize=False)
    assert reader.bare_newline
    assert content == b"a\nb\r\n"


def test_clean_message_has_no_bare_newline_flag():
    _, _, reader = run([b"a\r\n", b"b\r", b"\nc\r\n.\r\n"])
    assert not reader.bare_newline


def test_dot_line_after_bare_lf_is_content():
    """A '.' line after a bare LF is content; the real terminator comes later."""
    content, rest, _ = run([b"x\n.\r\ny\r\n.\r\n"])
    assert rest == b""
    assert content == b"x\r\n\r\ny\r\n"


def test_long_line_streams_without_holding():
    """A 1 MB line comes out as it arrives: the reader holds at most 4 bytes."""
    reader = DataReader()
    total = 0
    for _ in range(100):
        content, rest = reader.feed(b"x" * 10_000)
        total += len(content)
        assert rest is None
    assert total == 1_000_000


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=30,
)


@settings(max_examples=400, deadline=None)
@given(lines, st.lists(st.integers(min_value=0), max_size=8))
def test_roundtrip_any_content_any_chunking(content_lines, cuts):
    """Any CRLF content, stuffed and terminated, comes back exactly."""
    content = b"".join(line + b"\r\n" for line in content_lines)
    wire = stuff(content[:-2]) + b"\r\n" if content else b""
    wire += b".\r\nRSET\r\n"
    got, rest, reader = run(split_at(wire, cuts))
    assert got == content
    assert rest == b"RSET\r\n"
    assert not reader.bare_newline


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_never_end_early(noise, cuts):
    """Whatever the bytes, the data ends at the first CRLF.CRLF and nowhere else."""
    wire = noise + b"\r\n.\r\n"
    got, rest, _ = run(split_at(wire, cuts))
    first = (b"\r\n" + wire).find(b"\r\n.\r\n")
    assert rest is not None
    assert rest == (b"\r\n" + wire)[first + 5 :]
