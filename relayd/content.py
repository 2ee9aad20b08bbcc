"""A queued message's content, without holding it whole: bytes or a spool file region.

A relay must carry a message of tens of megabytes with a few hundred KB of
memory, and a message of a few KB without touching the disk again after it
was written: small content is kept as ``bytes`` (Postfix keeps nothing, but
a read-back per message is a thread hop here), big content stays in the
spool file and is read a chunk at a time.  ``Content`` is the one value
both travel in, from the spool or cleanup through the queue manager to the
couriers and the bounce builder; each asks only for what it needs: the
size, the header section, the whole thing in chunks.

Reading a file region blocks: 64 KiB from the page cache (the file was just
written, or is read while it is being sent) takes microseconds, as in
Postfix's smtp(8), which reads its queue file with blocking reads.  Callers
on the reactor thread read one chunk per turn, never the whole region.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import attrs

__all__ = ["CHUNK", "IN_MEMORY_LIMIT", "Content", "as_content", "patch_chunks"]

#: Size of one read of a file region.
CHUNK = 64 * 1024
#: Content up to this size travels as bytes (cleanup keeps it, the spool
#: reads it whole); larger content is read from the spool file in chunks.
IN_MEMORY_LIMIT = 64 * 1024


@attrs.frozen
class Content:
    """The content of one message (CRLF lines, as spooled).

    Either ``data`` (in memory) or ``path``, ``offset`` and ``size`` (a region
    of a spool file that is never rewritten once committed).  Build one with
    :meth:`of` or :meth:`region`.
    """

    size: int
    data: bytes | None = attrs.field(default=None, repr=False)
    path: str | None = None
    offset: int = 0

    @classmethod
    def of(cls, data: bytes) -> Content:
        """Content held in memory."""
        return cls(len(data), data)

    @classmethod
    def region(cls, path: str, offset: int, size: int) -> Content:
        """``size`` bytes of the file ``path`` from ``offset``."""
        return cls(size, None, path, offset)

    @property
    def in_memory(self) -> bool:
        return self.data is not None

    def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes (all of it if shorter): enough for the
        header section without reading the body."""
        if self.data is not None:
            return self.data[:limit]
        assert self.path is not None
        with open(self.path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), min(limit, self.size), self.offset)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The content in pieces of at most ``size`` bytes (none for empty
        content).  For a file region the file is opened on the first
        ``next`` and closed when the iterator ends or is discarded.

        :raises OSError: the spool file is gone or shorter than ``size`` says
            (a truncated file must not go out as a shorter message).
        """
        if self.data is not None:
            data = self.data
            if len(data) <= size:
                if data:
                    yield data
                return
            view = memoryview(data)
            for start in range(0, len(data), size):
                yield bytes(view[start : start + size])
            return
        assert self.path is not None
        left = self.size
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while left > 0:
                chunk = f.read(min(size, left))
                if not chunk:
                    raise OSError(errno.EIO, f"queue file ends {left} bytes early", self.path)
                left -= len(chunk)
                yield chunk

    def read(self) -> bytes:
        """All of it, in memory.  Only for content known to be small (or
        tests): a file region's whole point is not to be read whole."""
        if self.data is not None:
            return self.data
        return b"".join(self.chunks())

    def isascii(self) -> bool:
        """True when every byte is 7-bit, scanned a chunk at a time."""
        if self.data is not None:
            return self.data.isascii()
        return all(chunk.isascii() for chunk in self.chunks())


def as_content(content: Content | bytes) -> Content:
    """``bytes`` (tests, DSNs) as ``Content``; ``Content`` as is."""
    return content if isinstance(content, Content) else Content.of(content)


def has_bare_newline(data: bytes) -> bool:
    """A CR or LF that is not part of a CRLF?  Removing the CRLFs leaves the
    others: one copy and two ``memchr``, ~5x faster than counting CR, LF and
    CRLF (``bytes.count`` of one byte is a plain loop: ~100 us per 64 KiB),
    which matters to every chunk of DATA the server reads."""
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


def patch_chunks(chunks: list[bytes], offset: int, data: bytes) -> None:
    """Overwrite ``len(data)`` bytes at ``offset`` of the content that
    ``chunks`` holds in order, in place (the chunks that overlap are
    replaced): space reserved early and filled at the end, as DKIM
    signatures are (see ``ISpoolWriter.patch``)."""
    end = offset + len(data)
    pos = 0
    for i, chunk in enumerate(chunks):
        stop = pos + len(chunk)
        if stop > offset and pos < end:
            lo, hi = max(offset, pos), min(end, stop)
            chunks[i] = chunk[: lo - pos] + data[lo - offset : hi - offset] + chunk[hi - pos :]
        pos = stop
        if pos >= end:
            return
    if pos < end:
        raise ValueError(f"patch of {offset}..{end} beyond the {pos} bytes written")
