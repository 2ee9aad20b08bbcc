"""/metrics after a scripted mix of traffic, end to end.

A relayd process with four listeners takes real clients (smtplib, Python's
ssl, raw sockets): plain messages of known sizes, a relay attempt from
outside mynetworks, STARTTLS and implicit TLS sessions (TLS 1.3 and 1.2),
handshakes that fail (a client that rejects our certificate, a TLS 1.1-only
client, plaintext where TLS was due), AUTH that fails in several ways and
AUTH that succeeds.  Then GET /metrics is
parsed with prometheus-client's own parser and every counter is compared
with what the script did, exactly, label set by label set.

Message sizes are the bytes the client sent in DATA (after dot-unstuffing;
relayd's Received: header is not counted), so they equal ``len()`` of what
``sendmail`` was given when that has CRLF line ends and no leading dots.
"""

from __future__ import annotations

import base64
import math
import os
import smtplib
import socket
import ssl
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd import __version__
from tests.certs import make_pki
from tests.htpasswd import write_users
from tests.relay import Relay, wait_for

pytest.importorskip("relayd.auth")

Labels = frozenset[tuple[str, str]]


def scrape(relay: Relay) -> dict[str, dict[Labels, float]]:
    """sample name -> {labels: value}; ``_created`` series (which older
    prometheus-client versions always add to counters) are left out."""
    url = f"http://127.0.0.1:{relay.ports['http']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def series(metrics: dict[str, dict[Labels, float]], name: str, *keys: str) -> dict[tuple, float]:
    """The samples of ``name`` keyed by the values of ``keys``, zeros left out."""
    out = {}
    for labels, value in metrics.get(name, {}).items():
        d = dict(labels)
        if value:
            out[tuple(d[k] for k in keys)] = value
    return out


def value(metrics: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(frozenset(labels.items()), 0.0)


def raw_message(n: int, subject: str) -> bytes:
    """A message of exactly ``n`` bytes: CRLF lines, none starting with a dot."""
    head = f"From: a@example.org\r\nTo: b@example.net\r\nSubject: {subject}\r\n\r\n".encode()
    full, rest = divmod(n - len(head), 78)
    if rest == 1:
        full, rest = full - 1, rest + 78
    msg = head + (b"x" * 76 + b"\r\n") * full + (b"y" * (rest - 2) + b"\r\n" if rest else b"")
    assert len(msg) == n and b"\r\n." not in msg
    return msg


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_plain(user: str, password: str) -> str:
    return "PLAIN " + b64(f"\0{user}\0{password}")


@pytest.fixture
def relay(tmp_path: Path, relay_factory) -> tuple[Relay, Any]:
    pki = make_pki(tmp_path / "pki")
    users = tmp_path / "users.htpasswd"
    write_users(users, {"alice": "alice-pw"})
    d = tmp_path / "relay"
    config = f"""
[server]
hostname = "relay.test"
spool = "{d / 'spool'}"

[http]
listen = "tcp:0:interface=127.0.0.1"

[tls]
cert = "{pki.server.cert}"
key = "{pki.server.key}"

[[listener]]
name = "mta"
listen = "tcp:0:interface=127.0.0.1"
tls = "none"
route = "outbox"

[[listener]]
name = "outside"
listen = "tcp:0:interface=127.0.0.1"
tls = "none"
auth = "optional"
auth_backend = "users"
plaintext_auth = true
mynetworks = ["192.0.2.0/24"]
auth_failures = "1/5m"
route = "outbox"

[[listener]]
name = "submission"
listen = "tcp:0:interface=127.0.0.1"
tls = "starttls"
require_tls = true
auth = "required"
auth_backend = "users"
mynetworks = ["192.0.2.0/24"]
route = "outbox"

[[listener]]
name = "smtps"
listen = "tcp:0:interface=127.0.0.1"
tls = "implicit"
auth = "required"
auth_backend = "users"
mynetworks = ["192.0.2.0/24"]
route = "outbox"

[auth.users]
type = "htpasswd"
file = "{users}"

[route.outbox]
maildir = "{d / 'outbox'}"
"""
    r = relay_factory("relay", config=config)
    wait_for(lambda: (r.wait_listening(), len(r.ports) == 5)[1], what="five listeners")
    return r, pki


def smtp(relay: Relay, listener: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", relay.ports[listener], local_hostname="client.test",
                        timeout=30)


def capped_context(version: ssl.TLSVersion, cafile: Path) -> ssl.SSLContext:
    """A client that speaks TLS up to ``version`` (down to TLS 1.0, as an
    old printer does)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def read_reply(f: Any) -> bytes:
    while True:
        line = f.readline()
        assert line, "connection closed"
        if line[3:4] != b"-":
            return line


def test_metrics_after_a_scripted_mix_of_traffic(relay: tuple[Relay, Any]) -> None:
    r, pki = relay
    good_tls = ssl.create_default_context(cafile=str(pki.ca))
    rogue_tls = ssl.create_default_context(cafile=str(pki.rogue_ca))
    sizes: dict[str, list[int]] = {"mta": [300, 3000, 20000], "submission": [1500],
                                   "smtps": [70000]}

    # mta: trusted by mynetworks, three messages in one session.
    with smtp(r, "mta") as c:
        for i, n in enumerate(sizes["mta"]):
            assert c.sendmail("a@example.org", ["b@example.net"], raw_message(n, f"m{i}")) == {}

    # outside: 127.0.0.1 is not in its mynetworks: relaying is refused;
    # one wrong password blocks the address (auth_failures = "1/5m").
    with smtp(r, "outside") as c:
        c.ehlo()
        assert c.mail("a@example.org")[0] == 250
        assert c.rcpt("b@example.net") == (550, b"5.7.1 <b@example.net>: Relay access denied")
    c = smtp(r, "outside")
    c.ehlo()
    assert c.docmd("AUTH", auth_plain("alice", "wrong"))[0] == 535
    assert c.docmd("AUTH", auth_plain("alice", "alice-pw"))[0] == 421
    c.close()
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtp(r, "outside")
    assert refused.value.smtp_code == 421

    # submission: AUTH before STARTTLS, then TLS, two wrong passwords, an
    # unknown mechanism, the right password and a message.
    with smtp(r, "submission") as c:
        c.ehlo()
        assert c.docmd("AUTH", auth_plain("alice", "alice-pw"))[0] == 530
        c.starttls(context=good_tls)
        c.ehlo()
        for _ in range(2):
            assert c.docmd("AUTH", auth_plain("alice", "wrong"))[0] == 535
        assert c.docmd("AUTH", "CRAM-MD5")[0] == 504
        assert c.login("alice", "alice-pw")[0] == 235
        assert c.sendmail("alice@example.org", ["b@example.net"],
                          raw_message(sizes["submission"][0], "sub")) == {}
    # Two more clean STARTTLS sessions.
    for _ in range(2):
        with smtp(r, "submission") as c:
            c.starttls(context=good_tls)
            c.ehlo()
    # A client that does not trust our certificate.
    c = smtp(r, "submission")
    with pytest.raises(ssl.SSLCertVerificationError):
        c.starttls(context=rogue_tls)
    c.close()
    # Plaintext after the 220 to STARTTLS.
    with socket.create_connection(("127.0.0.1", r.ports["submission"])) as s:
        f = s.makefile("rb")
        assert read_reply(f).startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        assert read_reply(f).startswith(b"250 ")
        s.sendall(b"STARTTLS\r\n")
        assert read_reply(f).startswith(b"220 2.0.0")
        s.sendall(b"EHLO client.test\r\n")
        read_until_closed(s)

    # smtps: a TLS 1.2 client, a TLS 1.1 one (below tls_min_version), a
    # TLS 1.3 client that sends a message, a plaintext client.
    with smtplib.SMTP_SSL("127.0.0.1", r.ports["smtps"], local_hostname="client.test",
                          context=capped_context(ssl.TLSVersion.TLSv1_2, pki.ca),
                          timeout=30) as c:
        c.ehlo()
    with pytest.raises(ssl.SSLError):
        smtplib.SMTP_SSL("127.0.0.1", r.ports["smtps"], local_hostname="client.test",
                         context=capped_context(ssl.TLSVersion.TLSv1_1, pki.ca), timeout=30)
    with smtplib.SMTP_SSL("127.0.0.1", r.ports["smtps"], local_hostname="client.test",
                          context=good_tls, timeout=30) as c:
        assert c.login("alice", "alice-pw")[0] == 235
        assert c.sendmail("alice@example.org", ["b@example.net"],
                          raw_message(sizes["smtps"][0], "smtps")) == {}
    with socket.create_connection(("127.0.0.1", r.ports["smtps"])) as s:
        s.sendall(b"EHLO client.test\r\n")
        read_until_closed(s)

    accepted = sum(len(v) for v in sizes.values())

    def settled() -> Any:
        m = scrape(r)
        active = series(m, "relayd_smtp_connections_active", "listener")
        sent = value(m, "relayd_deliveries_total", route="outbox", result="sent")
        queued = sum(series(m, "relayd_queue_messages", "state").values())
        return m if not active and sent == accepted and not queued else None

    m = wait_for(settled, timeout=30, what="sessions closed and mail delivered")

    assert series(m, "relayd_smtp_connections_total", "listener") == {
        ("mta",): 1, ("outside",): 3, ("submission",): 5, ("smtps",): 4,
    }
    assert series(m, "relayd_messages_received_total", "listener") == {
        ("mta",): 3, ("submission",): 1, ("smtps",): 1,
    }
    assert series(m, "relayd_smtp_rejects_total", "listener", "code", "status") == {
        ("outside", "550", "5.7.1"): 1,  # relay access denied
        ("outside", "535", "5.7.8"): 1,
        ("outside", "421", "4.7.0"): 2,  # AUTH while blocked, then the next connection
        ("submission", "530", "5.7.0"): 1,  # AUTH before STARTTLS
        ("submission", "535", "5.7.8"): 2,
        ("submission", "504", "5.5.4"): 1,
    }
    assert series(m, "relayd_auth_attempts_total", "listener", "result") == {
        ("outside", "failure"): 1,
        ("submission", "failure"): 2,
        ("submission", "success"): 1,
        ("smtps", "success"): 1,
    }
    assert series(m, "relayd_auth_failures_total", "listener", "reason") == {
        ("outside", "bad_credentials"): 1,
        ("outside", "blocked"): 1,
        ("submission", "tls_required"): 1,
        ("submission", "bad_credentials"): 2,
        ("submission", "mechanism"): 1,
    }
    assert series(m, "relayd_auth_blocked_total", "listener") == {("outside",): 1}
    assert series(m, "relayd_tls_handshakes_total", "listener", "result") == {
        ("submission", "success"): 3,
        ("submission", "failure"): 2,
        ("smtps", "success"): 2,
        ("smtps", "failure"): 2,
    }
    assert series(m, "relayd_tls_handshake_failures_total", "listener", "reason") == {
        ("submission", "certificate_rejected"): 1,
        ("submission", "not_tls"): 1,
        ("smtps", "protocol_version"): 1,
        ("smtps", "not_tls"): 1,
    }
    assert series(m, "relayd_tls_sessions_total", "listener", "version") == {
        ("submission", "TLSv1.3"): 3,
        ("smtps", "TLSv1.2"): 1,
        ("smtps", "TLSv1.3"): 1,
    }

    # Message sizes: count, exact sum and the buckets.
    for listener, ns in sizes.items():
        assert value(m, "relayd_message_size_bytes_count", listener=listener) == len(ns)
        assert value(m, "relayd_message_size_bytes_sum", listener=listener) == sum(ns)
        for le, in_bucket in (("1024.0", 1), ("4096.0", 4), ("16384.0", 16), ("65536.0", 64),
                              ("+Inf", math.inf)):
            expected = sum(1 for n in ns if n <= in_bucket * 1024)
            assert value(m, "relayd_message_size_bytes_bucket",
                         listener=listener, le=le) == expected, (listener, le)
    assert "outside" not in {dict(k)["listener"]
                             for k in m["relayd_message_size_bytes_count"]}

    # Delivery and the queue.
    assert series(m, "relayd_deliveries_total", "route", "result") == {
        ("outbox", "sent"): accepted
    }
    assert value(m, "relayd_delivery_seconds_count", route="outbox") == accepted
    assert series(m, "relayd_queue_messages", "state") == {}
    assert {dict(k)["state"] for k in m["relayd_queue_messages"]} == {
        "active", "deferred", "held"
    }
    assert value(m, "relayd_queue_oldest_age_seconds") == 0
    assert len(r.delivered()) == accepted

    # The spool's file system, read at scrape time.
    st = os.statvfs(r.spool)
    free = value(m, "relayd_spool_free_bytes")
    assert free > 0
    assert abs(free - st.f_bavail * st.f_frsize) < 512 * 1024 * 1024
    assert value(m, "relayd_spool_free_inodes") > 0

    [(build, one)] = m["relayd_build_info"].items()
    assert one == 1 and dict(build)["version"] == __version__
    assert value(m, "process_open_fds") > 0
