"""Cleanup signs what it spools: reserved at the top, filled in before the commit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from relayd.cleanup import Cleanup
from relayd.content import as_content
from relayd.diskio import InlineDiskWriter
from relayd.dkim.keys import SigningKey, load_key
from relayd.dkim.signer import DomainKey, Signer
from relayd.errors import SMTPReply
from relayd.queue.spool import SPILL_THRESHOLD, Spool
from relayd.testing import LogCapture, MemorySpool, RecordingArrival, failure_of
from relayd.testing import result_of as result
from tests.dkimtools import dkimpy_results, keygen

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("keys")
    rsa_path, rsa_line = keygen(d, "example.org", "rsa1", "rsa", 1024)
    ed_path, ed_line = keygen(d, "example.org", "ed1", "ed25519")
    return {"rsa": DomainKey("example.org", "rsa1", load_key(str(rsa_path))),
            "ed": DomainKey("example.org", "ed1", load_key(str(ed_path))),
            "zone": [rsa_line, ed_line]}


class Kept(RecordingArrival):
    """The content cleanup hands the queue manager, as a list."""

    def __init__(self, kept: list[Any]) -> None:
        super().__init__()
        self.kept = kept

    def queued(self, message: Any, content: Any) -> None:
        self.kept.append(None if content is None else as_content(content).read())


def cleanup(spool: Any, signer: Signer, clock: Clock, kept: list[Any]) -> Cleanup:
    return Cleanup(spool, "relay.test", clock, Kept(kept), signer=signer)


def submit(c: Cleanup, content: bytes, step: int = 1000, listener: str = "mta") -> Any:
    session = SimpleNamespace(listener=listener, client_address="192.0.2.1", route="default",
                              helo="client.example", user=None, protocol="ESMTP")
    message = c.open_message(session, "a@example.org", ("b@example.net",), False, None)
    for i in range(0, len(content), step):
        message.write(content[i : i + step])
    return message.finish()


MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: b@example.net\r\nSubject: signed\r\n"
           b"\r\nHello,\r\n..a dot-stuffed-looking line\r\n\xc3\xa9t\xc3\xa9\r\nno final CRLF")


def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


def test_memory_spool_content_is_signed_once_at_the_top(keys) -> None:
    spool, kept = MemorySpool(clock()), []
    c = cleanup(spool, Signer([keys["rsa"], keys["ed"]]), spool.clock, kept)
    with LogCapture() as log:
        queue_id = result(submit(c, MESSAGE, step=7))
    content = spool.contents[queue_id]
    assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert content.count(b"DKIM-Signature:") == 2
    # Message-ID and Date added by cleanup are signed too.
    assert b"h=message-id:date:from:to:subject:from;" in content.replace(b"\r\n\t", b"")
    assert dkimpy_results(content, keys["zone"]) == [True, True]
    assert kept[0] == content  # what the queue manager is handed
    assert any(f"{queue_id}: DKIM-Signature added (d=example.org s=rsa1, d=example.org s=ed1)"
               in line for line in log.lines)


def test_big_message_patched_on_disk(tmp_path: Path, keys) -> None:
    """Past the spool's spill threshold the placeholder is already in the
    tmp file: the signature is written over it there."""
    clk = clock()
    spool = Spool(str(tmp_path / "spool"), clk, InlineDiskWriter())
    spool.prepare()
    kept: list[Any] = []
    c = cleanup(spool, Signer([keys["rsa"], keys["ed"]]), clk, kept)
    body = b"".join(b"line %d with  some   spaces \r\n" % i for i in range(3 * SPILL_THRESHOLD // 30))
    queue_id = result(submit(c, MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body, step=65536))
    content = result(spool.load(queue_id)).read()
    assert len(content) > 2 * SPILL_THRESHOLD
    assert kept == [None]
    assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert dkimpy_results(content, keys["zone"]) == [True, True]


def test_other_domains_and_unsigned_listeners_are_not_signed(keys) -> None:
    spool = MemorySpool(clock())
    c = cleanup(spool, Signer([keys["rsa"]], unsigned_listeners=frozenset({"passthrough"})),
                spool.clock, [])
    sub = result(submit(c, MESSAGE.replace(b"@example.org>", b"@news.example.org>")))
    passing = result(submit(c, MESSAGE, listener="passthrough"))
    signed = result(submit(c, MESSAGE, listener="mta"))
    assert b"DKIM-Signature" not in spool.contents[sub]
    assert b"DKIM-Signature" not in spool.contents[passing]
    assert b"DKIM-Signature" in spool.contents[signed]


def test_signing_failure_is_451_and_nothing_is_queued(keys) -> None:
    class Broken:
        def sign(self, *args: object) -> bytes:
            raise RuntimeError("key vanished")

    counted: list[tuple[str, str, str]] = []
    broken = DomainKey("example.org", "bad", SigningKey("rsa-sha256", 128, 1024, Broken()))
    spool = MemorySpool(clock())
    c = cleanup(spool, Signer([broken], lambda *a: counted.append(a)),
                spool.clock, [])
    with LogCapture() as log:
        error = failure_of(submit(c, MESSAGE))
    assert isinstance(error, SMTPReply)
    assert (error.code, error.enhanced) == (451, "4.3.0")
    assert spool.contents == {}
    assert spool.aborted
    assert counted == [("example.org", "bad", "error")]
    assert any("DKIM signing failed: d=example.org s=bad: key vanished" in line
               for line in log.lines)


def test_a_new_signer_applies_to_the_next_message(keys) -> None:
    """SIGHUP replaces ``cleanup.signer``: rotation to another selector."""
    spool = MemorySpool(clock())
    c = cleanup(spool, Signer([keys["rsa"]]), spool.clock, [])
    first = result(submit(c, MESSAGE))
    c.signer = Signer([keys["ed"]])
    second = result(submit(c, MESSAGE))
    assert b"s=rsa1;" in spool.contents[first] and b"s=ed1;" not in spool.contents[first]
    assert b"s=ed1;" in spool.contents[second] and b"s=rsa1;" not in spool.contents[second]
    assert dkimpy_results(spool.contents[second], keys["zone"]) == [True]
