"""relayd delivering to real upstreams: a private Postfix with STARTTLS, and smtp-sink."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import threading
from pathlib import Path

import pytest

from tests.certs import make_pki
from tests.postfix import PrivatePostfix, Sink
from tests.relay import Relay, config_text, wait_for


def smarthost_relay(relay_factory, port: int, route: str, queue: str = 'retry = ["1h"]') -> Relay:
    relay = relay_factory(start=False, queue=queue)
    text = config_text(relay.spool, relay.outbox, queue=queue).replace(
        f'[route.outbox]\nmaildir = "{relay.outbox}"\n',
        f'[route.outbox]\nsmarthost = ["127.0.0.1:{port}"]\n{route}\n',
    )
    relay.config_path.write_text(text)
    return relay.start()


def send(relay: Relay, subject: str, rcpt: str = "user@example.net",
         sender: str = "app@example.org") -> None:
    with relay.smtp() as s:
        s.sendmail(sender, [rcpt], f"Subject: {subject}\r\nFrom: {sender}\r\n\r\nhello\r\n")


def queue_list(relay: Relay) -> list[dict]:
    import sys

    out = subprocess.run([sys.executable, "-m", "relayd.cli", "queue", "--config",
                          str(relay.config_path), "list", "--json"], capture_output=True,
                         text=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture
def pki(tmp_path: Path):
    return make_pki(tmp_path / "pki")


@pytest.fixture
def postfix(tmp_path: Path, pki):
    server = PrivatePostfix(tmp_path / "postfix", cert=pki.server.cert, key=pki.server.key)
    server.start()
    yield server
    server.stop()


def test_delivers_through_postfix_over_verified_starttls(relay_factory, postfix, pki) -> None:
    """STARTTLS to a real Postfix, chain and name verified against the test CA."""
    relay = smarthost_relay(relay_factory, postfix.port,
                            f'tls_server_name = "smtp.test"\nca_file = "{pki.ca}"')
    send(relay, "over tls")
    [path] = wait_for(lambda: postfix.delivered, timeout=30, what="delivery at postfix")
    data = path.read_bytes()
    assert b"Subject: over tls" in data
    # Postfix records the TLS session in its Received header.
    assert re.search(rb"with ESMTPS id", data), data[:600]
    log = wait_for(lambda: "status=sent" in relay.log() and relay.log(), what="sent log line")
    assert re.search(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{postfix.port} .*status=sent \(250",
                     log)
    wait_for(lambda: relay.queued() == [], what="empty queue")


@pytest.mark.parametrize("problem", ["wrong name", "unknown CA"])
def test_verification_failure_defers_and_sends_nothing(relay_factory, postfix, pki,
                                                       problem: str) -> None:
    """A certificate that does not verify: the message stays queued and Postfix never
    sees a MAIL command, in clear or in TLS."""
    route = (f'tls_server_name = "other.test"\nca_file = "{pki.ca}"' if problem == "wrong name"
             else f'tls_server_name = "smtp.test"\nca_file = "{pki.rogue_ca}"')
    relay = smarthost_relay(relay_factory, postfix.port, route)
    send(relay, "must not leak")
    wait_for(lambda: "status=deferred" in relay.log(), timeout=30, what="deferral")
    [entry] = queue_list(relay)
    assert entry["state"] == "deferred" and entry["attempts"] >= 1
    assert postfix.delivered == []
    assert "from=<app@example.org>" not in postfix.log()
    assert "must not leak" not in postfix.log()


def test_plaintext_smarthost_refused_when_starttls_required(relay_factory, tmp_path) -> None:
    """A smarthost without STARTTLS gets nothing when the route requires TLS."""
    sink = Sink(tmp_path / "sink")
    sink.start()
    try:
        relay = smarthost_relay(relay_factory, sink.port, "")
        send(relay, "needs tls")
        wait_for(lambda: "status=deferred" in relay.log(), timeout=30, what="deferral")
        assert "TLS is required, but was not offered" in queue_list(relay)[0]["last_error"]
        assert sink.messages() == []
    finally:
        sink.stop()


def test_hard_bounce_sends_dsn_and_never_loops(relay_factory, tmp_path: Path) -> None:
    """5xx at RCPT: a DSN goes to the sender with the smarthost's reply; the DSN's own
    rejection is not bounced again."""
    sink = Sink(tmp_path / "sink", "-f", "RCPT", "-B", "550 5.1.1 No such user here").start()
    try:
        relay = smarthost_relay(relay_factory, sink.port, 'tls = "none"')
        send(relay, "to nobody", rcpt="ghost@example.net")
        log = wait_for(lambda: "bounce of a bounce" in relay.log() and relay.log(),
                       timeout=30, what="the DSN to be tried and dropped")
        assert "to=<ghost@example.net>" in log and "status=bounced (550 5.1.1 No such user" in log
        assert "sender non-delivery notification" in log
        wait_for(lambda: relay.queued() == [], what="empty queue")
    finally:
        sink.stop()


def test_soft_bounce_defers(relay_factory, tmp_path: Path) -> None:
    """4xx at RCPT: deferred with the reply, never bounced."""
    sink = Sink(tmp_path / "sink", "-r", "RCPT", "-b", "450 4.2.0 Try again later").start()
    try:
        relay = smarthost_relay(relay_factory, sink.port, 'tls = "none"')
        send(relay, "later")
        wait_for(lambda: "status=deferred" in relay.log(), timeout=30, what="deferral")
        [entry] = queue_list(relay)
        assert entry["last_error"].startswith("450 4.2.0 Try again later")
        assert "status=bounced" not in relay.log()
    finally:
        sink.stop()


def test_sigkill_during_deliveries_loses_nothing(relay_factory, tmp_path: Path) -> None:
    """SIGKILL while deliveries to smtp-sink are in flight, restart: every accepted
    message reaches the sink at least once (duplicates are counted and reported)."""
    sink = Sink(tmp_path / "sink").start()
    try:
        relay = smarthost_relay(relay_factory, sink.port, 'tls = "none"\nconcurrency = 4',
                                queue='retry = ["1s"]')
        accepted: list[str] = []
        stop = threading.Event()

        def client(n: int) -> None:
            try:
                with relay.smtp() as s:
                    for i in range(60):
                        if stop.is_set():
                            return
                        tag = f"kill-{n}-{i}"
                        s.sendmail("app@example.org", ["user@example.net"],
                                   f"Subject: {tag}\r\n\r\nx\r\n")
                        accepted.append(tag)
            except (OSError, smtplib.SMTPException):
                return

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(accepted) >= 60 and len(sink.messages()) >= 5, timeout=60,
                 what="deliveries in flight")
        relay.signal(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        relay.start()
        wait_for(lambda: relay.queued() == [], timeout=90, what="the queue to drain")
        received = [m for m in sink.messages()]
        counts = {tag: sum(1 for m in received if f"Subject: {tag}\n".encode() in m)
                  for tag in accepted}
        lost = [t for t, c in counts.items() if c == 0]
        twice = [t for t, c in counts.items() if c > 1]
        print(f"\nSIGKILL test: {len(accepted)} accepted, {len(twice)} delivered twice, "
              f"{len(lost)} lost")
        assert lost == []
    finally:
        sink.stop()
