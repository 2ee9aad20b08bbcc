"""The DKIM body hash, computed as the message streams in.

dkimpy canonicalises a body it holds whole (``DKIM(message).sign()``), and a
relay must sign a 50 MB message with a few hundred KB of memory: so the
body hash is ours, one chunk at a time, and the header part (which is
small and bounded by cleanup's header limit) is left to dkimpy.  The tests
compare this hash with dkimpy's on generated bodies (hypothesis).

Relaxed body canonicalisation (RFC 6376 §3.4.4): whitespace at the end of
a line is dropped, runs of SP/HTAB become one SP, empty lines at the end
are dropped, a non-empty body ends in CRLF, and an empty body (or one of
empty lines only) hashes as nothing at all.  Two things make it stream:

- the tail of a chunk that the next chunk can still change (a run of
  whitespace, a CR that may start a CRLF) is held back and prepended to it;
- a run of CRLFs at the end of what has been canonicalised is only counted,
  not hashed: it is hashed when something other than a line end follows,
  and otherwise, at the end, the body gets exactly one CRLF.

A non-empty last line without CRLF keeps one trailing space, as dkimpy
does (``"abc  "`` hashes as ``"abc \\r\\n"``); relayd never meets that case,
as cleanup ends every message with CRLF before it is signed.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["RelaxedBodyHash"]

_WSP_RUN = re.compile(rb"[ \t]+")
#: Line ends are hashed in pieces of this size when many are pending.
_CRLF_PIECE = b"\r\n" * 32768


class RelaxedBodyHash:
    """SHA-256 of the relaxed-canonical body, fed in chunks of any size.

    Memory is bounded by the largest chunk plus one line's trailing
    whitespace, whatever the size of the body.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        #: Raw bytes held back from the last chunk (see the module docstring).
        self._held = b""
        #: CRLFs canonicalised but not hashed yet: they may be trailing.
        self._pending = 0
        #: Whether anything other than line ends has been hashed.
        self._started = False
        self._done = False

    def update(self, data: bytes) -> None:
        assert not self._done, "update after digest"
        if not data:
            return
        data = self._held + data
        core = data[:-1] if data.endswith(b"\r") else data
        cut = len(core.rstrip(b" \t"))
        self._held = data[cut:]
        self._emit(_canonical(data[:cut]))

    def digest(self) -> bytes:
        """The hash of the whole body; no more data after this."""
        if not self._done:
            self._done = True
            if self._held:
                # The last line had no CRLF: canonicalise it alone (dkimpy
                # keeps one space of its trailing whitespace, see above).
                self._emit(_WSP_RUN.sub(b" ", self._held))
                self._held = b""
            if self._started:
                self._hash.update(b"\r\n")
        return self._hash.digest()

    def _emit(self, text: bytes) -> None:
        """Hash canonical ``text``, holding back the CRLFs it ends with."""
        if not text:
            return
        stripped = text.rstrip(b"\r\n")
        trailing = len(text) - len(stripped)
        if trailing and text[len(stripped):] != b"\r\n" * (trailing // 2):
            # A bare CR or LF among the line ends: count the CRLF pairs only.
            end = len(text)
            while text.endswith(b"\r\n", 0, end):
                end -= 2
            stripped, trailing = text[:end], len(text) - end
        if not stripped:
            self._pending += trailing // 2
            return
        self._flush_pending()
        self._hash.update(stripped)
        self._started = True
        self._pending = trailing // 2

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, 0
        piece = len(_CRLF_PIECE) // 2
        while pending > piece:
            self._hash.update(_CRLF_PIECE)
            pending -= piece
        if pending:
            self._hash.update(_CRLF_PIECE[: 2 * pending])


def _canonical(text: bytes) -> bytes:
    """Relaxed canonical form of complete text: whitespace runs cut to one
    SP, and none before a CRLF (cheap checks first: most lines have neither)."""
    if b"\t" in text or b"  " in text:
        text = _WSP_RUN.sub(b" ", text)
    if b" \r\n" in text:
        text = text.replace(b" \r\n", b"\r\n")
    return text
