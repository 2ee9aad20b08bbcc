"""The DATA phase as a byte-stream transform (RFC 5321 §4.1.1.4, §4.5.2).

Works on whole chunks with ``bytes`` methods rather than a callback per
line, because on a single reactor every per-line Python call is paid for by
every other client.  Only ``<CRLF>.<CRLF>`` ends the data: a ``.`` line after
a bare LF or CR is content, so nothing a client sends can smuggle a second
message past us (the 2023 SMTP smuggling class).
"""

from __future__ import annotations

import re

from relayd.content import has_bare_newline

_TERMINATOR = b"\r\n.\r\n"
_FIRST_LINE_TERMINATOR = b".\r\n"
_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")


class DataReader:
    """Turns the raw bytes after ``354`` into message content.

    Content comes out dot-unstuffed and, when ``normalize`` is true, with
    every bare CR or LF turned into CRLF, and when ``strip_nul`` is true,
    without NUL bytes.  ``bare_newline`` and ``nul`` record whether any bare
    CR or LF, or any NUL, was seen, so the caller can refuse the message
    instead.  NULs go after dot-unstuffing: the line ``NUL .`` was not
    stuffed by the client and becomes the content line ``.``, which the
    smarthost client stuffs again (a next hop never sees ``CRLF . CRLF``).

    Invariant: ``_pending`` holds only a suffix that could be the start of
    the terminator (so nothing is held for longer than 4 bytes), and
    ``_line_start``/``_after_crlf`` describe the position where it begins.
    """

    def __init__(self, normalize: bool = True, strip_nul: bool = False) -> None:
        self._normalize = normalize
        self._strip_nul = strip_nul
        self.nul = False
        self._pending = b""
        # DATA's own CRLF precedes the first content byte.
        self._line_start = True
        self._after_crlf = True
        self.bare_newline = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Consume ``data``.

        :return: ``(content, rest)``: ``content`` to append to the message;
            ``rest`` is ``None`` while the data goes on, and after the
            terminator the bytes that followed it (pipelined commands).
        """
        buf = self._pending + data if self._pending else data
        if self._line_start and self._after_crlf and buf.startswith(_FIRST_LINE_TERMINATOR):
            self._pending = b""
            return b"", buf[3:]
        end = buf.find(_TERMINATOR)
        if end >= 0:
            self._pending = b""
            return self._content(buf[: end + 2]), buf[end + 5 :]
        keep = self._keep(buf)
        if keep:
            self._pending = buf[-keep:]
            buf = buf[:-keep]
        else:
            self._pending = b""
        return self._content(buf), None

    def _keep(self, buf: bytes) -> int:
        """How many trailing bytes might begin the terminator."""
        if self._line_start and self._after_crlf and len(buf) < 3:
            if _FIRST_LINE_TERMINATOR.startswith(buf):
                return len(buf)
        for k in (4, 3, 2, 1):
            if buf.endswith(_TERMINATOR[:k]):
                return k
        return 0

    def _content(self, raw: bytes) -> bytes:
        if not raw:
            return raw
        line_start = self._line_start
        self._line_start = raw[-1:] == b"\n"
        self._after_crlf = raw[-2:] == b"\r\n"
        seg = raw
        if has_bare_newline(seg):
            self.bare_newline = True
            if self._normalize:
                seg = _BARE_NEWLINE.sub(b"\r\n", seg)
        if line_start and seg[:1] == b".":
            seg = seg[1:]
        if b"\r\n." in seg:
            seg = seg.replace(b"\r\n.", b"\r\n")
        if b"\0" in seg:
            self.nul = True
            if self._strip_nul:
                seg = seg.replace(b"\0", b"")
        return seg
