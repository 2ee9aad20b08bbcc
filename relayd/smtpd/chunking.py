"""CHUNKING (RFC 3030): ``BDAT size [LAST]`` and the content it carries.

BDAT content is counted, not scanned: exactly ``size`` octets follow the
command line, with no dot-stuffing and no end-of-data marker, so nothing in
it can end the message early (the smuggling class DATA must guard against
does not arise).  What relayd stores is still mail for a next hop that gets
it through DATA, so the listener's content rules apply as for DATA: bare CR
or LF normalised to CRLF (or refused with ``bare_newline = "reject"``), NUL
stripped (or refused with ``nul = "reject"``).  A CR at the end of one chunk
may pair with an LF at the start of the next, so it is held back until the
next chunk (or LAST) says what it was.

Apart from the state machine because the counting, the grammar and the
content rules are one job; the session only switches into reading ``size``
octets and back.
"""

from __future__ import annotations

import re

from relayd.content import has_bare_newline
from relayd.errors import SMTPReply

__all__ = ["ChunkReader", "parse_bdat"]

_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")
#: A chunk size is at most this many digits (Postfix: a long; far beyond
#: any message size limit, so the size limit answers first).
_MAX_DIGITS = 19


def parse_bdat(arg: bytes) -> tuple[int, bool]:
    """``size [LAST]`` -> (size, last), or 501 5.5.4 (RFC 3030 §2)."""
    parts = arg.split(b" ")
    if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > _MAX_DIGITS:
        raise SMTPReply(501, "5.5.4", "Syntax: BDAT count [LAST]")
    if len(parts) == 2 and parts[1].upper() != b"LAST":
        raise SMTPReply(501, "5.5.4", "Syntax: BDAT count [LAST]")
    return int(parts[0]), len(parts) == 2


class ChunkReader:
    """The content of one message's BDAT chunks, under the listener's rules.

    ``bare_newline`` and ``nul`` record what was seen, so the caller can
    refuse the message instead.
    """

    def __init__(self, normalize: bool = True, strip_nul: bool = True) -> None:
        self._normalize = normalize
        self._strip_nul = strip_nul
        self._cr = False
        self.bare_newline = False
        self.nul = False

    def feed(self, data: bytes) -> bytes:
        """Chunk octets in, content out (a trailing CR held back)."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        return self._rules(data)

    def finish(self) -> bytes:
        """The end of the last chunk: a held-back CR was bare."""
        if not self._cr:
            return b""
        self._cr = False
        return self._rules(b"\r")

    def _rules(self, data: bytes) -> bytes:
        if has_bare_newline(data):
            self.bare_newline = True
            if self._normalize:
                data = _BARE_NEWLINE.sub(b"\r\n", data)
        if b"\0" in data:
            self.nul = True
            if self._strip_nul:
                data = data.replace(b"\0", b"")
        return data
