"""Command lines out of the client's byte stream, bounded as they arrive.

An over-long line is dropped while it arrives (the buffer never holds more
than one limit's worth: the 2008-era "long line becomes a command" and
memory-exhaustion classes) and reported once it ends, so the session can
answer 500 and go on in step with the client.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["TOO_LONG", "CommandLines", "line_limit"]

#: RFC 5321 §4.5.3.1.4: 512 octets including CRLF.
COMMAND_LINE_LIMIT = 512
#: MAIL and RCPT carry parameters (SIZE, BODY, SMTPUTF8, DSN's ORCPT);
#: Postfix's line_length_limit.
PATH_LINE_LIMIT = 2048
#: RFC 4954 §4: an AUTH line may carry a 12288-octet initial response.
AUTH_LINE_LIMIT = 12288

#: What ``CommandLines.next_line`` returns for a line over its limit.
TOO_LONG = b"\0too long\0"


class CommandLines:
    """The session's input buffer, split into lines on demand."""

    def __init__(self) -> None:
        #: Unread input (pipelined commands, or DATA/BDAT bytes that follow them).
        self.buf = bytearray()
        self._scan = 0
        self._discarding = False

    def clear(self) -> None:
        """Throw away everything unread (STARTTLS: nothing sent before the
        handshake may run inside TLS)."""
        self.buf.clear()
        self._scan = 0
        self._discarding = False

    def next_line(self, limit: Callable[[], int]) -> bytes | None:
        """The next complete line without its CRLF, ``TOO_LONG``, or None
        (no complete line yet).  ``limit()`` is the longest line allowed
        now, CRLF included; it depends on the command (AUTH, MAIL/RCPT)."""
        buf = self.buf
        idx = buf.find(b"\n", self._scan)
        if idx < 0:
            if self._discarding:
                buf.clear()
                self._scan = 0
            elif len(buf) > limit():
                self._discarding = True
                buf.clear()
                self._scan = 0
            else:
                self._scan = len(buf)
            return None
        allowed = limit()
        line = bytes(buf[:idx])
        del buf[: idx + 1]
        self._scan = 0
        if self._discarding or idx + 1 > allowed:
            self._discarding = False
            return TOO_LONG
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


def line_limit(buf: bytearray, in_sasl: bool) -> int:
    """The longest line (CRLF included) allowed for the command ``buf``
    starts with, or for an answer to an AUTH challenge."""
    if in_sasl:
        return AUTH_LINE_LIMIT
    head = bytes(buf[:5]).upper()
    if head.startswith(b"AUTH"):
        return AUTH_LINE_LIMIT
    if head.startswith((b"MAIL ", b"RCPT ")):
        return PATH_LINE_LIMIT
    return COMMAND_LINE_LIMIT
