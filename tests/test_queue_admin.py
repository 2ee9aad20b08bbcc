"""`relayd queue ...` against a running relayd and on a stopped one's spool."""

from __future__ import annotations

import email
import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.relay import Relay, wait_for


def queue(relay: Relay, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relayd.cli", "queue", "--config", str(relay.config_path), *args],
        capture_output=True, text=True, timeout=60, cwd=relay.dir,
    )


def listing(relay: Relay) -> list[dict]:
    out = queue(relay, "list", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def blocked_relay(relay_factory) -> Relay:
    """A relay whose maildir cannot be written: everything stays queued (retry in 1h)."""
    relay = relay_factory(start=False, queue='retry = ["1h"]')
    relay.outbox.write_text("blocked")
    relay.start()
    return relay


def send(relay: Relay, sender: str, subject: str) -> None:
    with relay.smtp() as s:
        s.sendmail(sender, ["rcpt@example.net"], f"Subject: {subject}\r\n\r\nbody\r\n")


def deferred_ids(relay: Relay, count: int) -> list[str]:
    def ready():
        entries = listing(relay)
        return len(entries) == count and all(e["state"] == "deferred" for e in entries) and entries

    return [e["id"] for e in wait_for(ready, what=f"{count} deferred messages")]


def test_list_show_hold_release_flush_online(relay_factory) -> None:
    """With the daemon running: list shows the fields, hold keeps a message back,
    release + flush deliver it."""
    relay = blocked_relay(relay_factory)
    send(relay, "app@example.org", "one")
    [qid] = deferred_ids(relay, 1)
    [entry] = listing(relay)
    assert entry["sender"] == "app@example.org" and entry["recipients"] == ["rcpt@example.net"]
    assert entry["attempts"] == 1 and entry["next_attempt"] > entry["arrival"]
    assert "cannot write to maildir" in entry["last_error"]
    human = queue(relay, "list").stdout
    assert qid in human and "<app@example.org>" in human and "1 message(s)" in human
    shown = json.loads(queue(relay, "show", qid, "--json").stdout)
    assert shown["id"] == qid

    assert queue(relay, "hold", qid).returncode == 0
    assert listing(relay)[0]["state"] == "held"
    relay.outbox.unlink()
    assert queue(relay, "flush").returncode == 0
    # flush does not release a held message
    assert listing(relay)[0]["state"] == "held" and relay.delivered() == []
    assert queue(relay, "release", qid).returncode == 0
    [path] = relay.wait_delivered(1)
    assert email.message_from_bytes(path.read_bytes())["Subject"] == "one"
    wait_for(lambda: listing(relay) == [], what="empty queue")


def test_flush_delivers_deferred_now(relay_factory) -> None:
    relay = blocked_relay(relay_factory)
    send(relay, "app@example.org", "later")
    deferred_ids(relay, 1)
    relay.outbox.unlink()
    assert queue(relay, "flush").returncode == 0
    relay.wait_delivered(1)


def test_bounce_by_sender_sends_dsn_and_delete_all(relay_factory) -> None:
    """bounce --sender returns matching mail to its sender; delete --all empties the queue."""
    relay = blocked_relay(relay_factory)
    send(relay, "app@example.org", "keep")
    send(relay, "noisy@example.org", "return me")
    deferred_ids(relay, 2)
    out = queue(relay, "bounce", "--sender", "noisy@*")
    assert out.returncode == 0 and out.stdout.count(": bounce") == 1
    entries = wait_for(lambda: (e := listing(relay)) and any(x["sender"] == "" for x in e) and e,
                       what="the DSN in the queue")
    dsn = [e for e in entries if e["sender"] == ""]
    assert [d["recipients"] for d in dsn] == [["noisy@example.org"]]
    assert {e["sender"] for e in entries} == {"", "app@example.org"}
    relay.outbox.unlink()
    queue(relay, "flush")
    paths = relay.wait_delivered(2)
    subjects = sorted(email.message_from_bytes(p.read_bytes())["Subject"] for p in paths)
    assert subjects == ["Undelivered Mail Returned to Sender", "keep"]
    dsn_file = next(p for p in paths if b"multipart/report" in p.read_bytes())
    assert b"Subject: return me" in dsn_file.read_bytes()


def test_offline_commands_work_on_the_spool(relay_factory) -> None:
    """With no daemon, the commands act on the files; the daemon then honours them."""
    relay = blocked_relay(relay_factory)
    for i in range(3):
        send(relay, f"s{i}@example.org", f"m{i}")
    ids = deferred_ids(relay, 3)
    relay.signal(signal.SIGTERM)
    out = queue(relay, "list")
    assert "relayd is not running" in out.stdout and all(i in out.stdout for i in ids)
    by_sender = {e["sender"]: e["id"] for e in listing(relay)}
    assert queue(relay, "hold", by_sender["s0@example.org"]).returncode == 0
    assert queue(relay, "delete", by_sender["s1@example.org"]).returncode == 0
    assert queue(relay, "flush").returncode == 0
    missing = queue(relay, "delete", "0000000000000000AAAA")
    assert missing.returncode == 1 and "no such message" in missing.stderr
    relay.outbox.unlink()
    relay.start()
    [path] = relay.wait_delivered(1)
    assert email.message_from_bytes(path.read_bytes())["Subject"] == "m2"
    [held] = listing(relay)
    assert held["state"] == "held" and held["sender"] == "s0@example.org"


def test_bad_queue_id_and_usage(relay: Relay, tmp_path: Path) -> None:
    assert queue(relay, "hold").returncode == 2
    out = queue(relay, "show", "../../etc/passwd")
    assert out.returncode == 1


def test_drain_turns_readiness_off_and_keeps_delivering(relay_factory) -> None:
    """relayd drain: /healthz/ready 503, no new SMTP connections, queued mail still goes out."""
    import socket
    import urllib.error
    import urllib.request

    relay = blocked_relay(relay_factory)
    send(relay, "app@example.org", "queued before drain")
    deferred_ids(relay, 1)
    out = subprocess.run([sys.executable, "-m", "relayd.cli", "drain", "--config",
                          str(relay.config_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    url = f"http://127.0.0.1:{relay.ports['http']}/healthz/ready"
    try:
        urllib.request.urlopen(url, timeout=10)
        raise AssertionError("ready while draining")
    except urllib.error.HTTPError as e:
        assert e.code == 503 and b"draining" in e.read()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", relay.smtp_port)) != 0
    relay.outbox.unlink()
    assert queue(relay, "flush").returncode == 0
    [path] = relay.wait_delivered(1)
    assert b"queued before drain" in path.read_bytes()


def test_drain_without_daemon_fails(relay_factory) -> None:
    relay = blocked_relay(relay_factory)
    relay.stop()
    out = subprocess.run([sys.executable, "-m", "relayd.cli", "drain", "--config",
                          str(relay.config_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not running" in out.stderr
