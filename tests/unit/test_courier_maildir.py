"""The maildir courier on real directories in tmp_path (InlineDiskWriter: no thread)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayd import diskio
from relayd.courier import maildir as maildir_module
from relayd.courier.maildir import MaildirCourier
from relayd.diskio import InlineDiskWriter
from relayd.envelope import DeliveryResult, Envelope
from relayd.errors import TransientDeliveryError
from relayd.interfaces import ICourier
from relayd.testing import failure_of
from relayd.testing import result_of as result

QID = "0A24181E40001DE47822"
ARRIVAL = 1_700_000_000.75
CONTENT = b"Received: from x\r\n\tby y\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"
NAME = f"1700000000.R{QID}.mx.test"


def envelope(**kw: Any) -> Envelope:
    base: dict[str, Any] = dict(sender="s@example.org", recipients=("a@example.net", "b@example.net"),
                                route="outbox", arrival=ARRIVAL)
    base.update(kw)
    return Envelope(**base)






def courier(tmp_path: Path, host: str = "mx.test") -> tuple[MaildirCourier, Path]:
    directory = tmp_path / "outbox"
    return MaildirCourier(str(directory), InlineDiskWriter(), host), directory


def listing(directory: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(directory / sub)) for sub in ("tmp", "new", "cur")}


def test_provides_icourier(tmp_path: Path) -> None:
    """MaildirCourier is an ICourier the queue manager can drive."""
    assert verifyObject(ICourier, courier(tmp_path)[0])


def test_delivers_one_file_into_new(tmp_path: Path) -> None:
    """First delivery makes tmp/new/cur and one file new/<arrival>.R<qid>.<host>."""
    c, directory = courier(tmp_path)
    outcome = result(c.deliver(QID, envelope(), CONTENT))
    assert listing(directory) == {"tmp": [], "new": [NAME], "cur": []}
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((directory / sub).stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "new" / NAME).stat().st_mode) == 0o600
    assert outcome == DeliveryResult(f"maildir:{directory}", f"250 2.0.0 Ok: delivered as {NAME}")
    assert c.relay == f"maildir:{directory}"


def test_file_has_trace_lines_and_lf_endings(tmp_path: Path) -> None:
    """Return-Path and one X-Original-To per recipient come first; every CRLF becomes LF."""
    c, directory = courier(tmp_path)
    result(c.deliver(QID, envelope(), CONTENT))
    data = (directory / "new" / NAME).read_bytes()
    assert data == (
        b"Return-Path: <s@example.org>\n"
        b"X-Original-To: <a@example.net>\n"
        b"X-Original-To: <b@example.net>\n"
        b"Received: from x\n\tby y\nSubject: hi\n\nline one\nline two\n"
    )
    assert b"\r" not in data


def test_null_sender_and_utf8(tmp_path: Path) -> None:
    """A bounce shows Return-Path: <>; UTF-8 addresses are written as UTF-8."""
    c, directory = courier(tmp_path)
    result(c.deliver(QID, envelope(sender="", recipients=("ç@exemple.fr",), smtputf8=True),
                     b"\r\n"))
    assert (directory / "new" / NAME).read_bytes() == (
        "Return-Path: <>\nX-Original-To: <ç@exemple.fr>\n\n".encode())


def test_same_queue_id_twice_is_one_file(tmp_path: Path) -> None:
    """Delivering a message again (crash before dequeue) leaves one copy, not two."""
    c, directory = courier(tmp_path)
    result(c.deliver(QID, envelope(), CONTENT))
    again = result(c.deliver(QID, envelope(), b"Subject: different\r\n\r\n"))
    assert "already delivered" in again.reply
    assert listing(directory) == {"tmp": [], "new": [NAME], "cur": []}
    assert (directory / "new" / NAME).read_bytes().endswith(b"line two\n")
    fresh = MaildirCourier(str(directory), InlineDiskWriter(), "mx.test")  # after a restart
    result(fresh.deliver(QID, envelope(), CONTENT))
    assert listing(directory)["new"] == [NAME]


def test_already_read_copy_in_cur_counts(tmp_path: Path) -> None:
    """A copy the reader moved to cur/ as NAME:2, is not delivered a second time."""
    c, directory = courier(tmp_path)
    result(c.deliver(QID, envelope(), CONTENT))
    os.rename(directory / "new" / NAME, directory / "cur" / f"{NAME}:2,")
    result(c.deliver(QID, envelope(), CONTENT))
    assert listing(directory) == {"tmp": [], "new": [], "cur": [f"{NAME}:2,"]}


def test_flagged_copy_in_cur_counts(tmp_path: Path) -> None:
    """A copy already read and flagged Seen (cur/NAME:2,S) is not delivered a second time."""
    c, directory = courier(tmp_path)
    result(c.deliver(QID, envelope(), CONTENT))
    os.rename(directory / "new" / NAME, directory / "cur" / f"{NAME}:2,S")
    result(c.deliver(QID, envelope(), CONTENT))
    assert listing(directory) == {"tmp": [], "new": [], "cur": [f"{NAME}:2,S"]}


def test_start_time_comes_from_the_injected_clock(tmp_path: Path) -> None:
    """Only mail older than the process's start (its clock) is looked for in cur/:
    a courier started before the message arrived writes it, one started after does not."""
    directory = tmp_path / "m"
    started_before, started_after = Clock(), Clock()
    started_before.advance(ARRIVAL - 10)
    started_after.advance(ARRIVAL + 10)
    before = MaildirCourier(str(directory), InlineDiskWriter(), "mx.test", clock=started_before)
    result(before.deliver(QID, envelope(), CONTENT))
    os.rename(directory / "new" / NAME, directory / "cur" / f"{NAME}:2,S")
    after = MaildirCourier(str(directory), InlineDiskWriter(), "mx.test", clock=started_after)
    assert "already delivered" in result(after.deliver(QID, envelope(), CONTENT)).reply
    assert listing(directory)["new"] == []
    result(before.deliver(QID, envelope(), CONTENT))
    assert listing(directory)["new"] == [NAME]


def test_different_messages_get_different_files(tmp_path: Path) -> None:
    """Two queue ids arriving in the same second are two files."""
    c, directory = courier(tmp_path)
    other = "0A24181E40001DE4FFFF"
    result(c.deliver(QID, envelope(), CONTENT))
    result(c.deliver(other, envelope(), CONTENT))
    assert listing(directory)["new"] == sorted([NAME, f"1700000000.R{other}.mx.test"])


def test_unwritable_maildir_is_transient_then_recovers(tmp_path: Path) -> None:
    """A maildir path that is a regular file fails transiently; once fixed, delivery works."""
    c, directory = courier(tmp_path)
    directory.write_bytes(b"not a directory")
    error = failure_of(c.deliver(QID, envelope(), CONTENT))
    assert isinstance(error, TransientDeliveryError)
    assert not error.permanent
    assert str(directory) in error.reply
    directory.unlink()
    result(c.deliver(QID, envelope(), CONTENT))
    assert listing(directory)["new"] == [NAME]


def test_maildir_removed_after_first_delivery(tmp_path: Path) -> None:
    """If the maildir disappears, one attempt fails transiently and the next recreates it."""
    c, directory = courier(tmp_path)
    result(c.deliver(QID, envelope(), CONTENT))
    for sub in ("tmp", "new", "cur"):
        for name in os.listdir(directory / sub):
            os.unlink(directory / sub / name)
        os.rmdir(directory / sub)
    os.rmdir(directory)
    assert isinstance(failure_of(c.deliver(QID, envelope(), CONTENT)), TransientDeliveryError)
    result(c.deliver(QID, envelope(), CONTENT))
    assert listing(directory) == {"tmp": [], "new": [NAME], "cur": []}


@pytest.mark.parametrize(
    ("host", "escaped"),
    [("a/b", "a\\057b"), ("host:2525", "host\\0722525"), ("x/y:z", "x\\057y\\072z")],
)
def test_host_name_escaped(tmp_path: Path, host: str, escaped: str) -> None:
    """'/' and ':' in the host name are escaped as the maildir spec asks (\\057, \\072)."""
    c, directory = courier(tmp_path, host)
    result(c.deliver(QID, envelope(), CONTENT))
    assert listing(directory)["new"] == [f"1700000000.R{QID}.{escaped}"]


def test_default_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a host name the courier uses the machine's, escaped."""
    monkeypatch.setattr(maildir_module.socket, "gethostname", lambda: "box:1")
    c = MaildirCourier(str(tmp_path / "m"), InlineDiskWriter())
    assert c.file_name(QID, envelope()) == f"1700000000.R{QID}.box\\0721"


def test_fsync_file_and_new_before_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is fsynced, renamed into new/, and new/ fsynced, all before the result fires."""
    c, directory = courier(tmp_path)
    events: list[str] = []
    real_fsync, real_rename, real_dirsync = os.fsync, os.rename, diskio.fsync_dir

    def fsync(fd: int) -> None:
        events.append("fsync " + os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), directory))
        real_fsync(fd)

    def rename(a: Any, b: Any) -> None:
        events.append(f"rename {os.path.relpath(a, directory)} {os.path.relpath(b, directory)}")
        real_rename(a, b)

    def dirsync(path: str) -> None:
        events.append("dirsync " + os.path.relpath(path, directory))
        real_dirsync(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(diskio, "fsync_dir", dirsync)
    d = c.deliver(QID, envelope(), CONTENT)
    d.addCallback(lambda r: events.append("result") or r)
    result(d)
    # (fsync_dir's own os.fsync of new/ shows as "fsync new")
    assert events == [
        f"fsync tmp/{NAME}",
        f"rename tmp/{NAME} new/{NAME}",
        "dirsync new",
        "fsync new",
        "result",
    ]


def test_failed_directory_fsync_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If new/ cannot be fsynced the delivery is not acknowledged (transient failure)."""
    c, directory = courier(tmp_path)

    def broken(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(diskio, "fsync_dir", broken)
    assert isinstance(failure_of(c.deliver(QID, envelope(), CONTENT)), TransientDeliveryError)


def test_retry_after_failed_directory_fsync_still_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry after a failed fsync of new/ fsyncs new/ before it reports success."""
    c, directory = courier(tmp_path)
    real_dirsync = diskio.fsync_dir

    def broken(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(diskio, "fsync_dir", broken)
    assert isinstance(failure_of(c.deliver(QID, envelope(), CONTENT)), TransientDeliveryError)
    synced: list[str] = []
    monkeypatch.setattr(diskio, "fsync_dir",
                        lambda path: (synced.append(os.path.basename(path)), real_dirsync(path)))
    result(c.deliver(QID, envelope(), CONTENT))
    assert synced == ["new"]
