"""DKIM through a real relayd process: signed in cleanup, delivered to a smarthost,
verified there by dkimpy, OpenDKIM (C) and Perl Mail::DKIM, reading the records
``relayd dkim keygen`` printed.  Also: retries never re-sign (even after a key
rotation by SIGHUP), and a 50 MB signed message keeps RSS growth under 10 MB."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dkimtools import dkimpy_results, keygen, mail_dkim_results, opendkim_results
from tests.postfix import Sink
from tests.relay import Relay, wait_for
from tests.system.test_big_message import (
    _RECEIVED,
    MB,
    RSS_BUDGET,
    RecordingServer,
    RSSSampler,
    headers,
    idle_rss,
    send,
    smarthost_relay,
)


def dkim_tables(*entries: tuple[str, str, Path]) -> str:
    return "".join(f'[[dkim]]\ndomain = "{d}"\nselector = "{s}"\nkey_file = "{k}"\n'
                   for d, s, k in entries)


PASS_LISTENER = """
[[listener]]
name = "pass"
listen = "tcp:0:interface=127.0.0.1"
route = "outbox"
dkim = false
"""


def message(subject: str, sender: str = "app@example.org", body: bytes = b"Hello.\r\n") -> bytes:
    return (f"From: App <{sender}>\r\nTo: user@example.net,\r\n\tsecond@example.net\r\n"
            f"Subject: {subject}\r\n  folded onto a second line\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.test>\r\n"
            "Date: Thu, 03 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\n").encode() + body


BODY = (b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln,   with  spaces \t\r\n"
        b".a line that smtplib dot-stuffs\r\n..two dots\r\n.\r\n\r\n"
        b"and no final CRLF")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("dkimkeys")
    return {s: keygen(d, "example.org", s, a) for s, a in
            (("rsa2026", "rsa"), ("ed2026", "ed25519"), ("rsa2027", "rsa"))}


def verdicts(data: bytes, zone: list[str], tmp_path: Path) -> dict[str, object]:
    return {"dkimpy": dkimpy_results(data, zone), "opendkim": opendkim_results(data, zone, tmp_path),
            "mail_dkim": mail_dkim_results(data, zone, tmp_path)}


def test_signed_relayed_and_verified_by_three_verifiers(relay_factory, tmp_path: Path,
                                                         keys) -> None:
    server = RecordingServer()
    try:
        relay = smarthost_relay(relay_factory, server.port, dkim_tables(
            ("example.org", "rsa2026", keys["rsa2026"][0]),
            ("example.org", "ed2026", keys["ed2026"][0])) + PASS_LISTENER)
        zone = [keys["rsa2026"][1], keys["ed2026"][1]]
        original = message("dual signed", body=BODY)
        send(relay, original)
        wait_for(lambda: server.messages, timeout=30, what="the signed message")
        [data] = server.messages
        # Byte-identical apart from what relayd put on top: two signatures, one
        # Received (and the final CRLF the client's message lacked).
        assert data.endswith(original + b"\r\n")
        top, received = data[: len(data) - len(original) - 2].split(b"Received: ", 1)
        assert top.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        assert top.count(b"DKIM-Signature:") == 2 and b"a=ed25519-sha256" in top
        assert _RECEIVED.match(b"Received: " + received)
        assert verdicts(data, zone, tmp_path) == {
            "dkimpy": [True, True],
            "opendkim": {"rsa2026": "pass", "ed2026": "pass"},
            # Debian 12's Mail::DKIM has no Ed25519: it says so, and passes RSA.
            "mail_dkim": {"rsa2026": "pass", "ed2026": "invalid"},
        }
        # A From: added after signing breaks both signatures (From is oversigned).
        forged = b"From: ceo@example.org\r\n" + data
        assert verdicts(forged, zone, tmp_path) == {
            "dkimpy": [False, False],
            "opendkim": {"rsa2026": "fail", "ed2026": "fail"},
            "mail_dkim": {"rsa2026": "fail", "ed2026": "invalid"},
        }
        assert "DKIM-Signature added (d=example.org s=rsa2026, d=example.org s=ed2026)" \
            in relay.log()

        # A subdomain is another domain; a dkim = false listener never signs.
        send(relay, message("subdomain", sender="app@mail.example.org"))
        with smtplib.SMTP("127.0.0.1", relay.ports["pass"], local_hostname="client.test",
                          timeout=30) as s:
            s.sendmail("app@example.org", ["user@example.net"], message("passing through"))
        wait_for(lambda: len(server.messages) == 3, timeout=30, what="two unsigned messages")
        assert all(b"DKIM-Signature" not in m for m in server.messages[1:])
        metrics = wait_for(lambda: _metrics(relay), what="metrics")
        assert 'relayd_dkim_signatures_total{domain="example.org",result="signed",' \
               'selector="rsa2026"} 1.0' in metrics
    finally:
        server.stop()


def _metrics(relay: Relay) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{relay.ports['http']}/metrics",
                                timeout=10) as r:
        return r.read().decode()


def test_a_retry_never_resigns_even_after_rotation(relay_factory, tmp_path: Path, keys) -> None:
    """Deferred at a 450-answering sink, then SIGHUP rotates to a new selector and
    points the route at an accepting smarthost: the message goes out with the
    signature it was queued with, once, and new mail gets the new selector."""
    deferring = Sink(tmp_path / "sink", "-r", "RCPT", "-b", "450 4.2.0 Try again later").start()
    server = RecordingServer()
    try:
        relay = smarthost_relay(relay_factory, deferring.port,
                                dkim_tables(("example.org", "rsa2026", keys["rsa2026"][0])))
        send(relay, message("queued before rotation"))
        wait_for(lambda: "status=deferred" in relay.log(), timeout=30, what="a deferral")
        [queued] = relay.queued()
        spooled = (relay.spool / "messages" / queued).read_bytes().split(b"\n", 1)[1]
        assert spooled.count(b"DKIM-Signature:") == 1

        relay.config_path.write_text(
            relay.config_path.read_text()
            .replace(f"127.0.0.1:{deferring.port}", f"127.0.0.1:{server.port}")
            .replace(f'selector = "rsa2026"\nkey_file = "{keys["rsa2026"][0]}"',
                     f'selector = "rsa2027"\nkey_file = "{keys["rsa2027"][0]}"'))
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done" in relay.log(), what="the reload")
        subprocess.run([sys.executable, "-m", "relayd.cli", "queue", "--config",
                        str(relay.config_path), "flush"], check=True, capture_output=True,
                       timeout=60)
        wait_for(lambda: server.messages, timeout=30, what="the retried message")
        [retried] = server.messages
        assert retried == spooled
        assert b"s=rsa2026;" in retried and b"s=rsa2027;" not in retried
        zone = [keys["rsa2026"][1], keys["rsa2027"][1]]
        assert dkimpy_results(retried, zone) == [True]

        send(relay, message("after rotation"))
        wait_for(lambda: len(server.messages) == 2, timeout=30, what="the new message")
        assert b"s=rsa2027;" in server.messages[1] and b"s=rsa2026;" not in server.messages[1]
        assert opendkim_results(server.messages[1], zone, tmp_path) == {"rsa2027": "pass"}
    finally:
        deferring.stop()
        server.stop()


def test_50mb_signed_message_keeps_memory_flat(relay_factory, tmp_path: Path, keys) -> None:
    """Signing streams: RSS growth under 10 MB for 50 MB, as without DKIM
    (tests/system/test_big_message.py), and the signature verifies at the other end."""
    server = RecordingServer()
    try:
        relay = smarthost_relay(relay_factory, server.port, dkim_tables(
            ("example.org", "rsa2026", keys["rsa2026"][0]),
            ("example.org", "ed2026", keys["ed2026"][0])))
        assert relay.proc is not None
        send(relay, headers("warm up") + b"small\r\n")
        wait_for(lambda: server.messages, timeout=30, what="the warm-up message")
        idle = idle_rss(relay.proc.pid)
        line = b"0123456789abcdefghijklmnopqrstuvwxyz  ABCDEFGHIJKLMNOPQRSTUVWXYZ-.+/0123 \r\n"
        big = headers("big") + line * (50 * MB // len(line)) + b".dot line\r\n"
        started = time.monotonic()
        with RSSSampler(relay.proc.pid) as sampler:
            send(relay, big)
            wait_for(lambda: len(server.messages) == 2, timeout=180, what="the 50 MB message")
        growth = max(sampler.samples) - idle
        print(f"\n50 MB signed message: RSS growth {growth / MB:.1f} MB, "
              f"{time.monotonic() - started:.1f} s in and out")
        assert growth < RSS_BUDGET, f"RSS grew by {growth / MB:.1f} MB"
        data = server.messages[1]
        server.messages.clear()
        assert data.endswith(big.split(b"\r\n\r\n", 1)[1])
        assert opendkim_results(data, [keys["rsa2026"][1], keys["ed2026"][1]], tmp_path) == {
            "rsa2026": "pass", "ed2026": "pass"}
    finally:
        server.stop()
