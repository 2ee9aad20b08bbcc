"""Dot-stuffing (RFC 5321 §4.5.2) of a message body for the client.

Kept apart from the protocol so that the one rule that stops outbound SMTP
smuggling lives in one small module with its own tests: every line that
starts with ``.`` gets another one — the first line and every chunk join
included — and a bare CR or LF becomes CRLF, so no ``<LF>.<LF>`` can reach a
lenient smarthost.  ``twisted.mail.smtp`` stuffs per chunk and misses the
joins (research/twisted-audit.md §2).

A body in memory is stuffed in one ``bytes`` operation (:func:`dot_stuff`);
a spooled one a chunk at a time (:class:`DotStuffer`, :func:`stuffed_chunks`)
with output identical to :func:`dot_stuff` of the whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from relayd.content import Content, has_bare_newline

#: Size of one write of the body; bodies up to it go out in one write.  Also
#: the size of one read of a spooled body.
BODY_CHUNK = 64 * 1024

_CRLF = b"\r\n"
_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")


def dot_stuff(content: bytes) -> tuple[bytes, bytes]:
    """``(stuffed, terminator)`` for ``content`` (CRLF lines, not stuffed).

    One bytes operation over the whole message, never per chunk: every line
    that starts with ``.`` gets another one, the first line included.  A bare
    CR or LF (the server normalises them, so this is a guard) becomes CRLF,
    so no ``<LF>.<LF>`` can reach a lenient smarthost.
    """
    if has_bare_newline(content):
        content = _BARE_NEWLINE.sub(b"\r\n", content)
    if content[:1] == b".":
        content = b"." + content
    if b"\r\n." in content:
        content = content.replace(b"\r\n.", b"\r\n..")
    if not content or content.endswith(_CRLF):
        return content, b".\r\n"
    return content, b"\r\n.\r\n"


class DotStuffer:
    """:func:`dot_stuff` a chunk at a time, for bodies read from the spool.

    ``feed`` each piece of the content in order, then ``finish``: the
    outputs joined are exactly ``b"".join(dot_stuff(whole))``.  What crosses
    a chunk join is carried over: whether the next byte starts a line (a
    ``.`` there is stuffed, the first line's included), and a CR that ends a
    chunk, held back until the next one shows whether an LF follows (CRLF
    stays one line end; a bare CR becomes CRLF).
    """

    def __init__(self) -> None:
        self._line_start = True
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        prefix = b""
        if self._cr and data:
            self._cr = False
            prefix = _CRLF
            if data[:1] == b"\n":
                data = data[1:]
            self._line_start = True
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if data:
            if has_bare_newline(data):
                data = _BARE_NEWLINE.sub(b"\r\n", data)
            if self._line_start and data[:1] == b".":
                data = b"." + data
            if b"\r\n." in data:
                data = data.replace(b"\r\n.", b"\r\n..")
            self._line_start = data.endswith(_CRLF)
        return prefix + data if prefix else data

    def finish(self) -> bytes:
        """The rest: a held-back CR as CRLF, then the terminator."""
        if self._cr:
            self._cr = False
            return _CRLF + b".\r\n"
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


def stuffed_chunks(content: Content) -> Iterator[bytes]:
    """The stuffed body of a spooled message and its terminator, a chunk at
    a time, read only as the consumer asks for the next one.  The terminator
    goes with the last chunk (one write and one reactor turn fewer)."""
    stuffer = DotStuffer()
    left = content.size
    for chunk in content.chunks(BODY_CHUNK):
        left -= len(chunk)
        out = stuffer.feed(chunk)
        if not left:
            yield out + stuffer.finish()
            return
        if out:
            yield out
    yield stuffer.finish()


def slices(body: bytes, terminator: bytes) -> Iterator[bytes]:
    """An in-memory stuffed body in ``BODY_CHUNK`` writes, the terminator
    in the last."""
    start = 0
    while len(body) - start > BODY_CHUNK:
        yield body[start : start + BODY_CHUNK]
        start += BODY_CHUNK
    yield body[start:] + terminator
