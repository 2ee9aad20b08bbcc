"""`relayd queue ...` against a running relayd and on a stopped one's spool."""

from __future__ import annotations

import email
import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from relayd.admin import history_line, print_show
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


def test_drain_cancel_listens_again_and_turns_readiness_back_on(relay_factory) -> None:
    """relayd drain --cancel, without a restart: /healthz/ready 200 again, the SMTP
    port accepts connections again, and mail sent then is delivered."""
    import socket
    import urllib.error
    import urllib.request

    relay = relay_factory()
    url = f"http://127.0.0.1:{relay.ports['http']}/healthz/ready"

    def drain(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relayd.cli", "drain", "--config",
                               str(relay.config_path), *args],
                              capture_output=True, text=True, timeout=60)

    assert drain().returncode == 0
    try:
        urllib.request.urlopen(url, timeout=10)
        raise AssertionError("ready while draining")
    except urllib.error.HTTPError as e:
        assert e.code == 503
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", relay.smtp_port)) != 0
    out = drain("--cancel")
    assert out.returncode == 0 and "accepting mail again" in out.stdout, out.stderr
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
    send(relay, "app@example.org", "after the drain")
    [path] = relay.wait_delivered(1)
    assert b"after the drain" in path.read_bytes()
    assert drain("--cancel").returncode == 0  # not draining: nothing to undo


def test_drain_without_daemon_fails(relay_factory) -> None:
    relay = blocked_relay(relay_factory)
    relay.stop()
    out = subprocess.run([sys.executable, "-m", "relayd.cli", "drain", "--config",
                          str(relay.config_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not running" in out.stderr


# -- relayd queue show: the message's history -------------------------------------------


def test_show_prints_envelope_and_history_online_and_offline(relay_factory) -> None:
    """A message deferred twice: `queue show` prints its envelope, then its arrival and
    both deferrals, with the daemon running and from the spool after it stopped."""
    relay = relay_factory(start=False, queue='retry = ["1s"]')
    relay.outbox.write_text("blocked")
    relay.start()
    send(relay, "app@example.org", "history")
    entries = wait_for(lambda: (e := listing(relay)) and e[0]["attempts"] >= 2 and e,
                       what="two deferrals")
    qid = entries[0]["id"]
    deferral = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ deferred to=<rcpt@example\.net> route=outbox "
        r"\(.*cannot write to maildir.*\)$", re.M)

    def check(out: subprocess.CompletedProcess) -> list[str]:
        assert out.returncode == 0, out.stderr
        head, _, history = out.stdout.partition("\n\n")
        assert re.search(rf"^queue id: +{qid}$", head, re.M)
        assert re.search(r"^sender: +<app@example\.org>$", head, re.M)
        assert re.search(r"^recipients: +<rcpt@example\.net>$", head, re.M)
        assert re.search(r"^listener: +mta$", head, re.M)
        assert re.search(r"^client: +127\.0\.0\.1$", head, re.M)
        assert re.search(r"^helo: +client\.test$", head, re.M)
        lines = history.splitlines()
        assert re.match(r"^\S+Z received from=<app@example\.org> size=\d+ nrcpt=1 "
                        r"listener=mta client=127\.0\.0\.1 helo=client\.test$", lines[0])
        assert len(deferral.findall(history)) >= 2, history
        times = [line.split()[0] for line in lines]
        assert times == sorted(times)
        return lines

    online = check(queue(relay, "show", qid))
    shown = json.loads(queue(relay, "show", qid, "--json").stdout)
    assert [e["event"] for e in shown["history"]][:3] == ["received", "deferred", "deferred"]
    assert shown["history"][1]["recipients"] == ["rcpt@example.net"]
    relay.signal(signal.SIGTERM)
    offline = check(queue(relay, "show", qid))
    assert len(offline) >= len(online) - 1  # a last deferral may not have reached the disk


def test_show_of_a_delivered_message_prints_its_history(relay_factory) -> None:
    """Delivered and gone from the queue, a message is still shown (state removed,
    the sent event with its route and relay), by the daemon and from the spool."""
    relay = relay_factory()
    send(relay, "app@example.org", "delivered")
    [path] = relay.wait_delivered(1)
    qid = re.search(r"\.R([0-9A-F]{20})\.", path.name).group(1)
    sent = re.compile(r"^\S+Z sent to=<rcpt@example\.net> route=outbox relay=maildir:\S+ "
                      r"\(.+\)$", re.M)

    def shown() -> str:
        out = queue(relay, "show", qid)
        assert out.returncode == 0, out.stderr
        assert re.search(r"^state: +removed \(attempts: 0\)$", out.stdout, re.M), out.stdout
        assert re.search(r"^recipients: +<rcpt@example\.net> \(done\)$", out.stdout, re.M)
        assert sent.search(out.stdout), out.stdout
        return re.sub(r"\(\w+ ago\)", "", out.stdout)

    online = wait_for(lambda: queue(relay, "show", qid).returncode == 0 and shown(),
                      what="the delivered message's history")
    relay.signal(signal.SIGTERM)
    assert shown() == online
    missing = queue(relay, "show", "0" * 20)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_hold_and_release_offline_are_in_the_history(relay_factory) -> None:
    relay = blocked_relay(relay_factory)
    send(relay, "app@example.org", "held")
    [qid] = deferred_ids(relay, 1)
    relay.signal(signal.SIGTERM)
    assert queue(relay, "hold", qid).returncode == 0
    assert queue(relay, "release", qid).returncode == 0
    events = [e["event"] for e in json.loads(queue(relay, "show", qid, "--json").stdout)
              ["history"]]
    assert events == ["received", "deferred", "held", "released"]


def test_history_lines_format() -> None:
    """Postfix-log-like lines; recipients beyond those named are counted; a gap in a
    long history is said."""
    out = io.StringIO()
    entry = {
        "id": "0123456789ABCDEF0123", "state": "deferred", "arrival": 1_700_000_000.0,
        "age": 120.0, "size": 1234, "sender": "a@x.test", "recipients": ["c@y.test"],
        "all_recipients": ["b@y.test", "c@y.test"], "attempts": 7, "next_attempt": None,
        "last_error": "451 4.3.0 try later", "route": "default", "listener": "submission",
        "client_address": "192.0.2.1", "helo": "c.test", "user": "app1", "history_omitted": 4,
        "history": [
            {"time": 1_700_000_000.0, "event": "received", "from": "a@x.test", "size": 1234,
             "nrcpt": 2, "listener": "submission", "client": "192.0.2.1", "helo": "c.test",
             "user": "app1"},
            {"time": 1_700_000_001.0, "event": "sent", "recipients": ["b@y.test"],
             "route": "default", "relay": "smtp.x[1.2.3.4]:587", "reply": "250 2.0.0 Ok"},
            {"time": 1_700_000_300.0, "event": "deferred", "recipients": ["c@y.test"],
             "more": 3, "route": "default", "relay": "smtp.x[1.2.3.4]:587",
             "reply": "451 4.3.0 try later"},
            {"time": 1_700_000_400.0, "event": "held"},
        ],
    }
    print_show(entry, out, as_json=False)
    head, _, history = out.getvalue().partition("\n\n")
    assert "recipients:  <b@y.test> (done), <c@y.test>" in head
    assert "user:        app1" in head and "last error:  451 4.3.0 try later" in head
    assert history.splitlines() == [
        "2023-11-14T22:13:20Z received from=<a@x.test> size=1234 nrcpt=2 listener=submission "
        "client=192.0.2.1 helo=c.test user=app1",
        "2023-11-14T22:13:21Z sent to=<b@y.test> route=default relay=smtp.x[1.2.3.4]:587 "
        "(250 2.0.0 Ok)",
        "... 4 more events not kept ...",
        "2023-11-14T22:18:20Z deferred to=<c@y.test> (+3 more) route=default "
        "relay=smtp.x[1.2.3.4]:587 (451 4.3.0 try later)",
        "2023-11-14T22:20:00Z held",
    ]
    assert history_line({"time": 0.0, "event": "released"}) == "1970-01-01T00:00:00Z released"
