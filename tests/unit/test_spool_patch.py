"""ISpoolWriter.patch: content written earlier is overwritten before the
commit, whether it is still in memory or already in the tmp file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relayd.content import patch_chunks
from relayd.diskio import InlineDiskWriter
from relayd.envelope import Envelope
from relayd.queue.spool import SPILL_THRESHOLD, Spool
from relayd.testing import MemorySpool
from relayd.testing import result_of as result

ENVELOPE = Envelope("a@example.org", ("b@example.net",), "default", 1.0)


@pytest.fixture(params=["real", "memory"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        return MemorySpool(Clock())
    s = Spool(str(tmp_path / "spool"), Clock(), InlineDiskWriter())
    s.prepare()
    return s


def stored(spool: Any, queue_id: str) -> bytes:
    return result(spool.load(queue_id)).read()


@pytest.mark.parametrize("offset", [0, 5, SPILL_THRESHOLD - 3, SPILL_THRESHOLD + 10])
def test_patch_anywhere_before_commit(spool: Any, offset: int) -> None:
    chunk = b"x" * 4096
    writer = spool.open_message(ENVELOPE)
    total = 0
    while total < 2 * SPILL_THRESHOLD + 100:  # spills twice on the real spool
        writer.write(chunk)
        total += len(chunk)
    writer.patch(offset, b"PATCHED")
    message = result(writer.commit())
    content = stored(spool, message.queue_id)
    expected = bytearray(b"x" * total)
    expected[offset : offset + 7] = b"PATCHED"
    assert content == bytes(expected)


def test_patch_small_message_in_memory(spool: Any) -> None:
    writer = spool.open_message(ENVELOPE)
    writer.write(b"AAAA")
    writer.write(b"bbbb\r\n")
    writer.patch(2, b"__")
    message = result(writer.commit())
    assert stored(spool, message.queue_id) == b"AA__bbbb\r\n"


def test_patch_beyond_what_was_written_is_refused(spool: Any) -> None:
    writer = spool.open_message(ENVELOPE)
    writer.write(b"abc")
    with pytest.raises(ValueError):
        writer.patch(2, b"xx")


def test_patch_chunks_across_boundaries() -> None:
    chunks = [b"abc", b"", b"defg", b"hi"]
    patch_chunks(chunks, 2, b"XYZW")
    assert b"".join(chunks) == b"abXYZWghi"
    assert [len(c) for c in chunks] == [3, 0, 4, 2]
