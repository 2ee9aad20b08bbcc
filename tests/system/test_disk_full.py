"""The spool on a tiny file system: full disks answer 4xx and lose nothing."""

from __future__ import annotations

import os
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.relay import config_text, wait_for


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 2 MB tmpfs (needs root), unmounted after the test."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def start(relay_factory, spool: Path, queue: str):
    relay = relay_factory(start=False)
    relay.config_path.write_text(config_text(spool, relay.outbox, queue=queue))
    relay.spool = spool
    return relay.start()


def test_enospc_while_writing_is_451_and_leaves_no_partial_file(relay_factory, tiny_fs) -> None:
    """A message bigger than the free space: 451 4.3.0, tmp/ cleaned, the daemon goes on."""
    relay = start(relay_factory, tiny_fs / "spool", "min_free_disk = 0")
    big = b"Subject: too big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3000  # ~3 MB
    with relay.smtp() as s:
        s.ehlo()
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("b@example.net")[0] == 250
        code, text = s.data(big)
        assert (code, text[:5]) == (451, b"4.3.0")
        # the session goes on, and a small message fits
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: small\r\n\r\nok\r\n")
    wait_for(lambda: os.listdir(tiny_fs / "spool" / "tmp") == [], what="tmp/ cleaned")
    [path] = relay.wait_delivered(1)
    assert b"Subject: small" in path.read_bytes()
    assert relay.proc is not None and relay.proc.poll() is None


def test_low_free_space_is_452_at_mail(relay_factory, tiny_fs) -> None:
    """Less than min_free_disk left: 452 4.3.1 at MAIL, before any data is sent."""
    relay = start(relay_factory, tiny_fs / "spool", 'min_free_disk = "4MB"')
    with relay.smtp() as s:
        s.ehlo()
        code, text = s.mail("a@example.org")
        assert (code, text[:5]) == (452, b"4.3.1")
    with pytest.raises(smtplib.SMTPSenderRefused):
        with relay.smtp() as s:
            s.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")


def test_max_messages_is_452_at_mail(relay_factory, tmp_path: Path) -> None:
    """More than queue.max_messages queued: 452 4.3.1 at MAIL."""
    relay = relay_factory(start=False, queue='max_messages = 1\nretry = ["1h"]')
    relay.outbox.write_text("blocked: keep mail queued")
    relay.start()
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: one\r\n\r\nx\r\n")
        code, text = s.mail("a@example.org")
        assert (code, text[:5]) == (452, b"4.3.1")
