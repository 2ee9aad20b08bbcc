"""The spool on real files, and the group-commit disk writer on a real thread."""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import pytest
from attrs import evolve
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from relayd import diskio
from relayd.content import IN_MEMORY_LIMIT
from relayd.diskio import DiskWriter, InlineDiskWriter
from relayd.envelope import Envelope, QueuedMessage, is_queue_id, new_queue_id
from relayd.queue import spool as spool_module
from relayd.queue.spool import Spool
from relayd.testing import result_of as result


def envelope(**kw) -> Envelope:
    base = dict(sender="a@example.org", recipients=("b@example.net", "ç@exemple.fr"),
                route="outbox", arrival=1_700_000_000.5, listener="mta",
                client_address="127.0.0.1", helo="c.test", smtputf8=True, body="8BITMIME")
    base.update(kw)
    return Envelope(**base)


def make_spool(tmp_path: Path, clock: Clock | None = None) -> Spool:
    clock = clock or Clock()
    clock.advance(1_700_000_000)
    s = Spool(str(tmp_path / "spool"), clock, InlineDiskWriter())
    s.prepare()
    return s




def commit(spool: Spool, content: bytes, env: Envelope | None = None) -> QueuedMessage:
    w = spool.open_message(env or envelope())
    for i in range(0, len(content), 7000):
        w.write(content[i : i + 7000])
    return result(w.commit())


def test_queue_ids_are_long_unique_and_valid() -> None:
    """Queue ids carry 80 bits (time + random) and never repeat in a burst."""
    ids = {new_queue_id(1_700_000_000.0) for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(is_queue_id(i) for i in ids)
    assert not is_queue_id("../../etc/passwd")


def test_commit_writes_one_file_with_envelope_and_content(tmp_path: Path) -> None:
    """A committed message is one file: JSON envelope line, then the exact content."""
    spool = make_spool(tmp_path)
    content = b"Subject: x\r\n\r\n" + b"line\r\n" * 3000
    msg = commit(spool, content)
    path = Path(spool.path("messages", msg.queue_id))
    head, _, body = path.read_bytes().partition(b"\n")
    assert body == content
    assert json.loads(head)["envelope"]["recipients"] == ["b@example.net", "ç@exemple.fr"]
    assert msg.envelope.size == len(content)
    assert os.listdir(spool.path("tmp")) == []
    assert result(spool.load(msg.queue_id)).read() == content
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_durability_order_fsync_rename_dirsync(tmp_path: Path, monkeypatch) -> None:
    """The file is fsynced before the rename, and the directory after it, before success."""
    spool = make_spool(tmp_path)
    events: list[str] = []
    real_fsync, real_rename, real_dirsync = os.fsync, os.rename, diskio.fsync_dir
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), real_rename(a, b))[1])
    monkeypatch.setattr(diskio, "fsync_dir",
                        lambda p: (events.append(f"dirsync:{os.path.basename(p)}"), real_dirsync(p))[1])
    w = spool.open_message(envelope())
    w.write(b"hello\r\n")
    d = w.commit()
    d.addCallback(lambda _: events.append("acknowledged"))
    result(d)
    # (fsync_dir's own os.fsync shows as the second "fsync")
    assert events == ["fsync", "rename", "dirsync:messages", "fsync", "acknowledged"]


def test_large_message_spills_to_tmp_then_commits(tmp_path: Path) -> None:
    """Past the spill threshold content goes to tmp/ as it comes; commit completes it."""
    spool = make_spool(tmp_path)
    w = spool.open_message(envelope())
    chunk = b"z" * 65536
    for _ in range(20):
        w.write(chunk)
    assert os.listdir(spool.path("tmp")) == [w.queue_id]
    assert os.listdir(spool.path("messages")) == []
    msg = result(w.commit())
    assert result(spool.load(msg.queue_id)).read() == chunk * 20
    assert os.listdir(spool.path("tmp")) == []


def test_load_keeps_big_content_in_its_file(tmp_path: Path) -> None:
    """Up to IN_MEMORY_LIMIT load() reads the content; past it, it names the region of
    the queue file after the envelope line and reads nothing of it."""
    spool = make_spool(tmp_path)
    small = result(spool.load(commit(spool, b"s" * IN_MEMORY_LIMIT).queue_id))
    assert small.in_memory and small.read() == b"s" * IN_MEMORY_LIMIT
    big = commit(spool, b"b" * (IN_MEMORY_LIMIT + 1))
    loaded = result(spool.load(big.queue_id))
    path = spool.path("messages", big.queue_id)
    envelope_line = Path(path).read_bytes().index(b"\n") + 1
    assert not loaded.in_memory
    assert (loaded.path, loaded.offset, loaded.size) == (path, envelope_line, IN_MEMORY_LIMIT + 1)
    assert loaded.read() == b"b" * (IN_MEMORY_LIMIT + 1)


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    """An aborted message leaves no file behind, spilled or not."""
    spool = make_spool(tmp_path)
    for size in (10, 3 * 1024 * 1024):
        w = spool.open_message(envelope())
        w.write(b"q" * size)
        w.abort()
    assert os.listdir(spool.path("tmp")) == []
    assert os.listdir(spool.path("messages")) == []


def test_queue_id_collision_fails_instead_of_overwriting(tmp_path: Path, monkeypatch) -> None:
    """An existing queue file is never replaced by a new message."""
    spool = make_spool(tmp_path)
    first = commit(spool, b"first\r\n")
    monkeypatch.setattr(spool_module, "new_queue_id", lambda now: first.queue_id)
    w = spool.open_message(envelope())
    w.write(b"second\r\n")
    with pytest.raises(OSError):
        result(w.commit())
    assert result(spool.load(first.queue_id)).read() == b"first\r\n"
    assert os.listdir(spool.path("tmp")) == []


def test_recover_lists_messages_with_state_and_cleans_up(tmp_path: Path) -> None:
    """Recovery removes partial files and orphan state, keeps state, quarantines junk."""
    spool = make_spool(tmp_path)
    old = commit(spool, b"old\r\n", envelope(arrival=100.0))
    new = commit(spool, b"new\r\n", envelope(arrival=200.0))
    from attrs import evolve

    result(spool.defer(evolve(new, attempts=3, next_attempt=999.0, last_error="451 try later")))
    Path(spool.path("tmp", "0123456789ABCDEF0123")).write_bytes(b"partial")
    Path(spool.path("state", "FFFFFFFFFFFFFFFFFFFF.json")).write_text("{}")
    Path(spool.path("messages", "AAAAAAAAAAAAAAAAAAAA")).write_bytes(b"not json\nxx")
    found = result(spool.recover())
    assert [m.queue_id for m in found] == [old.queue_id, new.queue_id]
    assert found[0].attempts == 0
    assert (found[1].attempts, found[1].next_attempt, found[1].last_error) == (3, 999.0, "451 try later")
    assert found[1].envelope.recipients == ("b@example.net", "ç@exemple.fr")
    assert found[1].envelope.size == len(b"new\r\n")
    assert os.listdir(spool.path("tmp")) == []
    assert os.listdir(spool.path("state")) == [f"{new.queue_id}.json"]
    assert os.listdir(spool.path("corrupt")) == ["AAAAAAAAAAAAAAAAAAAA"]


def test_remove_deletes_message_and_state(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = commit(spool, b"x\r\n")
    result(spool.defer(msg))
    result(spool.remove(msg.queue_id))
    assert os.listdir(spool.path("messages")) == [] and os.listdir(spool.path("state")) == []


def test_remove_after_restart_deletes_the_state_found_at_recovery(tmp_path: Path) -> None:
    """remove() skips the state unlink only for messages known to have none:
    a state file written by an earlier run is found by recover() and goes too."""
    spool = make_spool(tmp_path)
    deferred = commit(spool, b"x\r\n")
    plain = commit(spool, b"y\r\n")
    result(spool.defer(deferred))
    restarted = make_spool(tmp_path)
    assert len(result(restarted.recover())) == 2
    result(restarted.remove(deferred.queue_id))
    result(restarted.remove(plain.queue_id))
    assert os.listdir(spool.path("messages")) == [] and os.listdir(spool.path("state")) == []


def test_writable_probe(tmp_path: Path) -> None:
    """Readiness asks the file system, not the permission bits."""
    spool = make_spool(tmp_path)
    assert spool.writable()
    os.rename(spool.path("tmp"), spool.path("elsewhere"))
    assert not spool.writable()


class ThreadReactor:
    """Just what DiskWriter needs from a reactor: results come back through
    ``callFromThread``; the test runs them in its own thread, as the reactor
    thread would."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args) -> None:
        self.calls.put((f, args))

    def run_until(self, *deferreds, timeout: float = 10.0) -> list:
        results: list = [None] * len(deferreds)
        done = [False] * len(deferreds)
        for i, d in enumerate(deferreds):
            def store(value, i=i):
                results[i], done[i] = value, True
            d.addBoth(store)
        while not all(done):
            f, args = self.calls.get(timeout=timeout)
            f(*args)
        return results


@pytest.fixture
def disk_writer():
    fake = ThreadReactor()
    writer = DiskWriter(fake)
    writer.start()
    yield fake, writer
    stopped = writer.stop()
    while not stopped.called:
        f, args = fake.calls.get(timeout=10)
        f(*args)


def test_disk_jobs_run_in_order_in_batches_off_the_caller_thread(disk_writer) -> None:
    """Jobs submitted together share batches and run in submission order, on the worker."""
    fake, writer = disk_writer
    seen: list[int] = []
    threads: set[str] = set()

    def job(i):
        def run(batch):
            seen.append(i)
            threads.add(threading.current_thread().name)
            return i * 2
        return run

    results = fake.run_until(*[writer.submit(job(i)) for i in range(50)])
    assert results == [i * 2 for i in range(50)]
    assert seen == list(range(50))
    assert threading.current_thread().name not in threads
    assert writer.batches < 50


def test_disk_job_failure_is_per_job(disk_writer) -> None:
    """One failing job fails alone."""
    fake, writer = disk_writer

    def bad(batch):
        raise OSError(28, "No space left on device")

    ok, failing, after = fake.run_until(
        writer.submit(lambda batch: "fine"), writer.submit(bad), writer.submit(lambda b: "also")
    )
    assert (ok, after) == ("fine", "also")
    assert isinstance(failing, Failure) and failing.check(OSError)


def test_directory_fsync_failure_fails_its_jobs(disk_writer) -> None:
    """A job whose directory cannot be fsynced is not acknowledged."""
    fake, writer = disk_writer

    def needs_missing_dir(batch):
        batch.sync_dir("/nonexistent/relayd-test")
        return "renamed"

    [outcome] = fake.run_until(writer.submit(needs_missing_dir))
    assert isinstance(outcome, Failure) and outcome.check(OSError)


def test_history_journal_rotates_and_finds_the_newest(tmp_path: Path) -> None:
    """history.log turns into history.log.1 past its limit (the one before is
    dropped); a lookup reads both, the newest line of an id first; a line that
    cannot be read is skipped; an older release's spool has no journal at all."""
    from relayd.queue import journal

    j = journal.Journal(str(tmp_path), limit=400)
    assert j.find("A" * 20) is None
    envelope = Envelope("a@example.org", ("b@example.net",), "default", 1_700_000_000.0)
    first = QueuedMessage("A" * 20, envelope, attempts=1)
    j.append(journal.line(first))
    j.append(b"B" * 20 + b" {not json\n")
    j.append(journal.line(QueuedMessage("C" * 20, envelope)))
    j.append(journal.line(QueuedMessage("D" * 20, envelope)))
    j.append(journal.line(evolve(first, attempts=2)))
    assert (tmp_path / "history.log.1").exists()
    assert all(len(p.read_bytes()) <= 400 for p in tmp_path.glob("history.log*"))
    assert j.find("A" * 20) == evolve(first, attempts=2)
    assert j.find("B" * 20) is None
    assert j.find("D" * 20) == QueuedMessage("D" * 20, envelope)
