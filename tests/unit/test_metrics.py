"""relayd/metrics.py and the counters the SMTP server keeps, in memory.

The same counters are checked end to end, over real sockets and a real
/metrics scrape, in tests/system/test_metrics_scrape.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import INegotiated
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from relayd import __version__
from relayd.metrics import AUTH_FAILURE_REASONS, TLS_FAILURE_REASONS, Metrics
from relayd.testing import Conversation, FakeAuthBackend, TLSStringTransport, sample
from relayd.tls import handshake_failure_reason, tls_version
from tests.unit.test_smtpd_tls_auth import OUTSIDER, Env, b64, plain

# design.md §1 "Metrics": names fixed (prometheus-client adds _total to counters).
CONTRACT = {
    "relayd_smtp_connections_total": "counter",
    "relayd_smtp_connections_active": "gauge",
    "relayd_messages_received_total": "counter",
    "relayd_smtp_rejects_total": "counter",
    "relayd_auth_attempts_total": "counter",
    "relayd_queue_messages": "gauge",
    "relayd_queue_oldest_age_seconds": "gauge",
    "relayd_deliveries_total": "counter",
    "relayd_delivery_seconds": "histogram",
}
ADDED = {
    "relayd_auth_failures_total": "counter",
    "relayd_auth_blocked_total": "counter",
    "relayd_tls_handshakes_total": "counter",
    "relayd_tls_handshake_failures_total": "counter",
    "relayd_tls_sessions_total": "counter",
    "relayd_tls_certificate_expiry_seconds": "gauge",
    "relayd_message_size_bytes": "histogram",
    "relayd_spool_free_bytes": "gauge",
    "relayd_spool_free_inodes": "gauge",
    "relayd_build_info": "gauge",
}


def families(metrics: Metrics) -> dict[str, Any]:
    """Family name as Prometheus sees it (counters with ``_total``) -> family."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family
    return out


def test_every_contract_name_is_exported_with_its_type() -> None:
    found = families(Metrics())
    for name, kind in {**CONTRACT, **ADDED}.items():
        assert name in found, name
        assert found[name].type == kind, name
        assert found[name].documentation, name


def test_labels_are_the_documented_ones() -> None:
    m = Metrics()
    labels = {
        m.smtp_connections: ("listener",),
        m.smtp_rejects: ("listener", "code", "status"),
        m.auth_attempts: ("listener", "result"),
        m.auth_failures: ("listener", "reason"),
        m.tls_handshakes: ("listener", "result"),
        m.tls_handshake_failures: ("listener", "reason"),
        m.tls_sessions: ("listener", "version"),
        m.message_size: ("listener",),
        m.deliveries: ("route", "result"),
        m.delivery_seconds: ("route",),
        m.queue_messages: ("state",),
    }
    for metric, names in labels.items():
        assert metric._labelnames == names, metric


def test_build_info_and_process_metrics() -> None:
    m = Metrics()
    [sample_] = [s for s in families(m)["relayd_build_info"].samples]
    assert sample_.labels["version"] == __version__
    assert sample_.value == 1
    if Path("/proc/self/stat").exists():
        assert sample(m, "process_open_fds") > 0
        assert sample(m, "process_start_time_seconds") > 0


def test_spool_free_space_is_read_at_scrape_time(tmp_path: Path) -> None:
    m = Metrics()
    # Not watched yet: unknown, never a misleading 0.
    assert math.isnan(sample(m, "relayd_spool_free_bytes"))
    m.watch_spool(str(tmp_path))
    st = os.statvfs(tmp_path)
    free = sample(m, "relayd_spool_free_bytes")
    assert free > 0
    assert abs(free - st.f_bavail * st.f_frsize) < 256 * 1024 * 1024
    assert sample(m, "relayd_spool_free_inodes") > 0 or st.f_favail == 0


def test_spool_that_cannot_be_read_is_nan_not_a_broken_scrape(tmp_path: Path) -> None:
    m = Metrics()
    m.watch_spool(str(tmp_path / "missing"))
    text = m.exposition().decode()
    assert "relayd_spool_free_bytes NaN" in text
    assert "relayd_spool_free_inodes NaN" in text


# -- naming TLS outcomes ----------------------------------------------------------


def ssl_failure(*reasons: str) -> Failure:
    try:
        raise SSL.Error([("SSL routines", "", r) for r in reasons])
    except SSL.Error:
        return Failure()


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        # What OpenSSL 3 said in tests/system/test_metrics_scrape.py's cases.
        (("tlsv1 alert unknown ca",), "certificate_rejected"),
        (("sslv3 alert bad certificate",), "certificate_rejected"),
        (("tls alert bad certificate",), "certificate_rejected"),
        (("wrong version number",), "not_tls"),
        (("http request",), "not_tls"),
        (("unsupported protocol",), "protocol_version"),
        (("tlsv1 alert protocol version",), "protocol_version"),
        (("no shared cipher",), "no_shared_cipher"),
        (("unexpected eof while reading",), "closed"),
        (("something new",), "other"),
        ((), "other"),
    ],
)
def test_handshake_failure_reasons(reasons: tuple[str, ...], expected: str) -> None:
    assert handshake_failure_reason(ssl_failure(*reasons)) == expected
    assert expected in TLS_FAILURE_REASONS


def test_handshake_failure_reason_of_a_plain_disconnect() -> None:
    assert handshake_failure_reason(Failure(ConnectionDone())) == "closed"
    assert handshake_failure_reason(Failure(ConnectionLost())) == "closed"
    assert handshake_failure_reason(None) == "closed"
    assert handshake_failure_reason(Failure(SSL.Error("text, not a list"))) == "other"


class _Handle:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_protocol_version_name(self) -> str:
        return self.name


class _Transport:
    def __init__(self, name: str) -> None:
        self.handle = _Handle(name)

    def getHandle(self) -> _Handle:
        return self.handle


@pytest.mark.parametrize(
    ("name", "label"),
    [("TLSv1.3", "TLSv1.3"), ("TLSv1.2", "TLSv1.2"), ("TLSv1.1", "TLSv1.1"), ("TLSv1", "TLSv1"),
     ("SSLv3", "other"), ("Unknown", "other"), ("x" * 200, "other")],
)
def test_tls_version_labels_are_bounded(name: str, label: str) -> None:
    assert tls_version(_Transport(name)) == label


def test_tls_version_without_a_tls_handle() -> None:
    assert tls_version(object()) == "other"


# -- the SMTP server's counters ---------------------------------------------------


class VersionedTLSTransport(TLSStringTransport):
    """A TLSStringTransport whose handle names a TLS version."""

    version = "TLSv1.2"

    def getHandle(self) -> _Handle:
        return _Handle(self.version)


def handshakes(env: Env, result: str) -> float:
    return sample(env.metrics, "relayd_tls_handshakes_total",
                  {"listener": "test", "result": result})


def tls_failures(env: Env, reason: str) -> float:
    return sample(env.metrics, "relayd_tls_handshake_failures_total",
                  {"listener": "test", "reason": reason})


def auth_failures(env: Env) -> dict[str, float]:
    out = {}
    for reason in AUTH_FAILURE_REASONS:
        value = sample(env.metrics, "relayd_auth_failures_total",
                       {"listener": "test", "reason": reason})
        if value:
            out[reason] = value
    return out


def test_starttls_handshake_success_and_version() -> None:
    env = Env()
    s = env.connect()
    s.transport.__class__ = VersionedTLSTransport
    s.starttls()
    assert handshakes(env, "success") == handshakes(env, "failure") == 0
    s.protocol.handshakeCompleted()
    s.protocol.handshakeCompleted()  # counted once
    assert handshakes(env, "success") == 1
    assert sample(env.metrics, "relayd_tls_sessions_total",
                  {"listener": "test", "version": "TLSv1.2"}) == 1
    s.protocol.connectionLost(Failure(ConnectionDone()))
    assert handshakes(env, "failure") == 0


def test_starttls_handshake_failure_is_counted_with_its_reason() -> None:
    env = Env()
    s = env.connect()
    s.starttls()
    s.protocol.connectionLost(ssl_failure("tlsv1 alert unknown ca"))
    assert handshakes(env, "success") == 0
    assert handshakes(env, "failure") == 1
    assert tls_failures(env, "certificate_rejected") == 1


def test_no_handshake_no_tls_metrics() -> None:
    env = Env()
    s = env.connect()
    s.send("EHLO client.test\r\nQUIT\r\n")
    s.protocol.connectionLost(Failure(ConnectionDone()))
    assert handshakes(env, "success") == handshakes(env, "failure") == 0


def implicit_session(env: Env) -> tuple[Any, TLSStringTransport]:
    transport = VersionedTLSTransport(peerAddress=IPv4Address("TCP", OUTSIDER, 1))
    transport.version = "TLSv1.3"
    alsoProvides(transport, INegotiated)
    protocol = env.factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol, transport


def test_implicit_tls_handshake_success() -> None:
    env = Env(tls="implicit")
    protocol, transport = implicit_session(env)
    protocol.handshakeCompleted()
    assert handshakes(env, "success") == 1
    assert sample(env.metrics, "relayd_tls_sessions_total",
                  {"listener": "test", "version": "TLSv1.3"}) == 1


def test_implicit_tls_plaintext_client() -> None:
    env = Env(tls="implicit")
    protocol, transport = implicit_session(env)
    protocol.connectionLost(ssl_failure("wrong version number"))
    assert handshakes(env, "failure") == 1
    assert tls_failures(env, "not_tls") == 1


def test_implicit_tls_handshake_timeout_is_counted_once() -> None:
    env = Env(tls="implicit", timeout=60)
    protocol, transport = implicit_session(env)
    env.clock.advance(60)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert handshakes(env, "failure") == 1
    assert tls_failures(env, "timeout") == 1
    assert tls_failures(env, "closed") == 0


def test_auth_failure_reasons() -> None:
    env = Env(tls="starttls", require_tls=False)
    s = env.connect()
    s.ehlo()
    assert s.send("AUTH PLAIN\r\n")[0].startswith("530")
    assert auth_failures(env) == {"tls_required": 1}

    s = env.tls_session()
    expected = {"tls_required": 1}
    for line, code, reason in [
        ("AUTH CRAM-MD5\r\n", "504", "mechanism"),
        ("AUTH\r\n", "501", "malformed"),
        ("AUTH PLAIN !!!\r\n", "501", "malformed"),
        ("AUTH LOGIN !!!\r\n", "501", "malformed"),
        (f"AUTH PLAIN {plain('alice', 'wrong')}\r\n", None, "bad_credentials"),
        (f"AUTH PLAIN {plain('alice', 'secret', authzid='bob')}\r\n", None, "bad_credentials"),
        (f"AUTH PLAIN {plain('alice', '')}\r\n", None, "bad_credentials"),
    ]:
        replies = s.send(line)
        if code is None:
            env.clock.advance(1)
            replies = s.replies()
            assert replies == ["535 5.7.8 Error: authentication failed"], line
        else:
            assert replies[0].startswith(code), (line, replies)
        expected[reason] = expected.get(reason, 0) + 1
        assert auth_failures(env) == expected, line
    assert s.send("AUTH PLAIN\r\n") == ["334 "]
    assert s.send("*\r\n") == ["501 5.7.0 Authentication aborted"]
    assert s.send("AUTH PLAIN\r\n") == ["334 "]
    assert s.send("%%%\r\n") == ["501 5.5.2 Cannot decode response"]
    assert s.send("AUTH LOGIN\r\n") == [f"334 {b64('Username:')}"]
    assert s.send(b64("alice") + "\r\n") == [f"334 {b64('Password:')}"]
    assert s.send("x" * 13000 + "\r\n")[0].startswith("500")
    expected["aborted"] = 1
    expected["malformed"] += 2
    assert auth_failures(env) == expected
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [
        "235 2.7.0 Authentication successful"
    ]
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")[0].startswith("503")
    expected["sequence"] = 1
    assert auth_failures(env) == expected
    # 535s are the failures of relayd_auth_attempts_total; the rest never
    # reached the backend.
    assert env.attempts("failure") == 3
    assert env.attempts("success") == 1


def test_auth_sequence_errors() -> None:
    env = Env()
    s = env.connect()
    s.starttls()  # no EHLO after STARTTLS yet
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")[0].startswith("503")
    s.ehlo()
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")[0].startswith("503")
    assert auth_failures(env) == {"sequence": 2}


def test_auth_backend_error_and_timeout() -> None:
    backend = FakeAuthBackend({"alice": "secret"})
    env = Env(backend=backend)
    s = env.tls_session()
    backend.fail_with = RuntimeError("ldap down")
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [
        "454 4.7.0 Temporary authentication failure"
    ]
    backend.fail_with = None
    backend.hold = True
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    env.clock.advance(env.factory.auth_timeout)
    assert s.replies() == ["454 4.7.0 Temporary authentication failure"]
    assert auth_failures(env) == {"backend_error": 1, "backend_timeout": 1}
    assert env.attempts("error") == 2


def test_auth_blocked() -> None:
    env = Env(auth_failures="1/5m")
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n")
    env.clock.advance(1)
    assert s.replies() == ["535 5.7.8 Error: authentication failed"]
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [
        "421 4.7.0 relay.test Error: too many authentication failures"
    ]
    assert auth_failures(env) == {"bad_credentials": 1, "blocked": 1}
    assert sample(env.metrics, "relayd_auth_blocked_total", {"listener": "test"}) == 1


def test_message_size_histogram() -> None:
    c = Conversation()
    bodies = [b"Subject: a\r\n\r\nhi\r\n", b"Subject: b\r\n\r\n" + b"x" * 5000 + b"\r\n"]
    for body in bodies:
        c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        # A leading dot is unstuffed: the size is what the message holds.
        assert c.send(body + b"..dot\r\n.\r\n")[-1].startswith("250 2.0.0 Ok: queued")
    labels = {"listener": "test"}
    sizes = [len(b) + len(b".dot\r\n") for b in bodies]
    assert sample(c.metrics, "relayd_message_size_bytes_count", labels) == 2
    assert sample(c.metrics, "relayd_message_size_bytes_sum", labels) == sum(sizes)
    assert sample(c.metrics, "relayd_message_size_bytes_bucket", {**labels, "le": "1024.0"}) == 1
    assert sample(c.metrics, "relayd_message_size_bytes_bucket", {**labels, "le": "16384.0"}) == 2
    assert [m.content for m in c.sink.messages] == [b + b".dot\r\n" for b in bodies]


def test_refused_message_is_not_observed() -> None:
    c = Conversation(max_message_size=100)
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert c.send(b"x" * 200 + b"\r\n.\r\n")[-1].startswith("552")
    assert sample(c.metrics, "relayd_message_size_bytes_count", {"listener": "test"}) == 0
