"""Submission end to end: relayd as a process, real TLS, a real htpasswd backend.

The certificates come from a throwaway test CA (tests/certs.py); the
clients are Python's smtplib with an ssl context trusting that CA, and
swaks (STARTTLS and implicit TLS, AUTH PLAIN and LOGIN).
"""

from __future__ import annotations

import signal
import smtplib
import ssl
import subprocess
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.certs import issue, make_ca
from tests.conftest import need
from tests.htpasswd import write_users
from tests.relay import Relay, wait_for

pytest.importorskip("relayd.auth")


@dataclass
class Certs:
    ca: Path
    a: tuple[Path, Path]  # the [tls] certificate: smtp.test, 127.0.0.1
    b: tuple[Path, Path]  # tenant B's own certificate: tenant-b.test, 127.0.0.1
    renewed: tuple[Path, Path]  # a replacement for a: renewed.test, 127.0.0.1


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_cert, ca_key = make_ca(directory, "submission-test-ca")
    out = {}
    for stem, name in (("a", "smtp.test"), ("b", "tenant-b.test"), ("renewed", "renewed.test")):
        issued = issue(directory, stem, name, ca_cert, ca_key, dns=(name,), ips=("127.0.0.1",))
        out[stem] = (issued.cert, issued.key)
    return Certs(ca, out["a"], out["b"], out["renewed"])


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def peer_subject(smtp: smtplib.SMTP) -> str:
    cert = smtp.sock.getpeercert()  # type: ignore[union-attr]
    return dict(x[0] for x in cert["subject"])["commonName"]


def message(sender: str, rcpt: str, subject: str = "submission test") -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = rcpt
    m["Subject"] = subject
    m.set_content("hello over TLS\n")
    return m


@pytest.fixture
def setup(tmp_path: Path, relay_factory):
    """A relay with three listeners:

    - ``submission``: STARTTLS, require_tls, auth required, htpasswd A
      (alice), route ``outbox_a``; the [tls] certificate.
    - ``smtps``: implicit TLS, auth required, htpasswd A, route ``outbox_a``.
    - ``tenant_b``: STARTTLS with its own certificate, auth required,
      htpasswd B (bob), route ``outbox_b``.
    """
    certs = make_certs(tmp_path / "pki")
    users_a = write_users(tmp_path / "a.htpasswd", {"alice": "alice-pw"})
    users_b = write_users(tmp_path / "b.htpasswd", {"bob": "bob-pw"})
    d = tmp_path / "relay"
    config = f"""
[server]
hostname = "relay.test"
spool = "{d / 'spool'}"

[http]
listen = "tcp:0:interface=127.0.0.1"

[tls]
cert = "{certs.a[0]}"
key = "{certs.a[1]}"

[[listener]]
name = "submission"
listen = "tcp:0:interface=127.0.0.1"
tls = "starttls"
require_tls = true
auth = "required"
auth_backend = "a"
mynetworks = ["192.0.2.0/24"]
route = "outbox_a"

[[listener]]
name = "smtps"
listen = "tcp:0:interface=127.0.0.1"
tls = "implicit"
auth = "required"
auth_backend = "a"
mynetworks = ["192.0.2.0/24"]
route = "outbox_a"

[[listener]]
name = "tenant_b"
listen = "tcp:0:interface=127.0.0.1"
tls = "starttls"
tls_cert = "{certs.b[0]}"
tls_key = "{certs.b[1]}"
require_tls = true
auth = "required"
auth_backend = "b"
mynetworks = ["192.0.2.0/24"]
route = "outbox_b"

[auth.a]
type = "htpasswd"
file = "{users_a}"

[auth.b]
type = "htpasswd"
file = "{users_b}"

[route.outbox_a]
maildir = "{d / 'outbox_a'}"

[route.outbox_b]
maildir = "{d / 'outbox_b'}"
"""
    relay = relay_factory("relay", config=config)
    return relay, certs, d


def connect(relay: Relay, listener: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", relay.ports[listener], local_hostname="client.test",
                        timeout=30)


def maildir(d: Path, name: str) -> list[Path]:
    new = d / name / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_submission_needs_starttls_then_auth(setup) -> None:
    relay, certs, d = setup
    with connect(relay, "submission") as smtp:
        code, text = smtp.ehlo()
        assert code == 250 and b"STARTTLS" in text and b"AUTH" not in text
        assert smtp.mail("alice@example.org") == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXB3") == (
            530, b"5.7.0 Must issue a STARTTLS command first"
        )
        smtp.starttls(context=client_context(certs))
        assert peer_subject(smtp) == "smtp.test"
        code, text = smtp.ehlo()
        assert b"AUTH PLAIN LOGIN" in text and b"STARTTLS" not in text
        assert smtp.mail("alice@example.org") == (530, b"5.7.0 Authentication required")
        smtp.rset()
        assert smtp.login("alice", "alice-pw")[0] == 235
        smtp.send_message(message("alice@example.org", "someone@example.net"))
    [path] = wait_for(lambda: maildir(d, "outbox_a"), what="delivery")
    content = path.read_bytes()
    assert b"with ESMTPSA id" in content
    wait_for(lambda: "user=alice" in relay.log(), what="the mail log line with user=alice")


def test_wrong_password_is_535(setup) -> None:
    relay, certs, d = setup
    with connect(relay, "submission") as smtp:
        smtp.starttls(context=client_context(certs))
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            smtp.login("alice", "wrong")
        assert e.value.smtp_code == 535


def test_implicit_tls_listener(setup) -> None:
    relay, certs, d = setup
    with smtplib.SMTP_SSL("127.0.0.1", relay.ports["smtps"], local_hostname="client.test",
                          context=client_context(certs), timeout=30) as smtp:
        assert peer_subject(smtp) == "smtp.test"
        code, text = smtp.ehlo()
        assert b"STARTTLS" not in text and b"AUTH PLAIN LOGIN" in text
        smtp.login("alice", "alice-pw")
        smtp.send_message(message("alice@example.org", "someone@example.net"))
    [path] = wait_for(lambda: maildir(d, "outbox_a"), what="delivery")
    assert b"with ESMTPSA id" in path.read_bytes()


def test_per_listener_certificate_and_tenants(setup) -> None:
    """Tenant B is served its own certificate, knows only its own users, and
    its mail takes its own route."""
    relay, certs, d = setup
    with connect(relay, "tenant_b") as smtp:
        smtp.starttls(context=client_context(certs))
        assert peer_subject(smtp) == "tenant-b.test"
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            smtp.login("alice", "alice-pw")  # tenant A's user
        assert e.value.smtp_code == 535
        smtp.login("bob", "bob-pw")
        smtp.send_message(message("bob@b.example", "someone@example.net", "from tenant b"))
    with connect(relay, "submission") as smtp:
        smtp.starttls(context=client_context(certs))
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("bob", "bob-pw")  # tenant B's user
        smtp.login("alice", "alice-pw")
        smtp.send_message(message("alice@example.org", "someone@example.net", "from tenant a"))
    [b] = wait_for(lambda: maildir(d, "outbox_b"), what="tenant b's delivery")
    [a] = wait_for(lambda: maildir(d, "outbox_a"), what="tenant a's delivery")
    assert b"from tenant b" in b.read_bytes() and b"from tenant a" in a.read_bytes()


def test_sighup_reloads_the_certificate(setup) -> None:
    relay, certs, d = setup
    cert, key = certs.a
    # A broken replacement: logged, the old certificate stays.
    cert.write_bytes(b"not a certificate\n")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in relay.log(), what="reload error")
    with connect(relay, "submission") as smtp:
        smtp.starttls(context=client_context(certs))
        assert peer_subject(smtp) == "smtp.test"
    # A good one: new connections get it.
    cert.write_bytes(certs.renewed[0].read_bytes())
    key.write_bytes(certs.renewed[1].read_bytes())
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "(renewed.test)" in relay.log(), what="the renewed certificate")
    with connect(relay, "submission") as smtp:
        smtp.starttls(context=client_context(certs))
        assert peer_subject(smtp) == "renewed.test"
    with smtplib.SMTP_SSL("127.0.0.1", relay.ports["smtps"], context=client_context(certs),
                          timeout=30) as smtp:
        assert peer_subject(smtp) == "renewed.test"
    # Tenant B's own certificate is untouched.
    with connect(relay, "tenant_b") as smtp:
        smtp.starttls(context=client_context(certs))
        assert peer_subject(smtp) == "tenant-b.test"
    assert relay.proc.poll() is None


def test_certificate_expiry_metric(setup) -> None:
    import urllib.request

    relay, certs, d = setup
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.ports['http']}/metrics") as r:
        text = r.read().decode()
    lines = [line for line in text.splitlines()
             if line.startswith("relayd_tls_certificate_expiry_seconds{")]
    assert len(lines) == 3
    assert all(float(line.split()[-1]) > 1e9 for line in lines)


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    tool = need("swaks")
    support = subprocess.run([tool, "--support"], capture_output=True, text=True)
    if "TLS supported" not in support.stdout + support.stderr:
        pytest.skip("swaks without TLS support (install libnet-ssleay-perl)")
    return subprocess.run([tool, "--helo", "client.test", *args], capture_output=True,
                          text=True, timeout=60)


def test_swaks_starttls_auth_plain(setup) -> None:
    relay, certs, d = setup
    r = swaks("--server", "127.0.0.1", "--port", str(relay.ports["submission"]), "--tls",
              "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "alice-pw",
              "--from", "alice@example.org", "--to", "someone@example.net")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in r.stdout
    [path] = wait_for(lambda: maildir(d, "outbox_a"), what="delivery")
    assert b"with ESMTPSA id" in path.read_bytes()


def test_swaks_implicit_tls_auth_login(setup) -> None:
    relay, certs, d = setup
    r = swaks("--server", "127.0.0.1", "--port", str(relay.ports["smtps"]), "--tlsc",
              "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "alice-pw",
              "--from", "alice@example.org", "--to", "someone@example.net")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "334 VXNlcm5hbWU6" in r.stdout and "235 2.7.0 Authentication successful" in r.stdout
    wait_for(lambda: maildir(d, "outbox_a"), what="delivery")


def test_swaks_wrong_password(setup) -> None:
    relay, certs, d = setup
    r = swaks("--server", "127.0.0.1", "--port", str(relay.ports["submission"]), "--tls",
              "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "nope",
              "--from", "alice@example.org", "--to", "someone@example.net")
    assert r.returncode != 0
    assert "535 5.7.8 Error: authentication failed" in r.stdout


def test_msmtp_starttls_auth(setup, tmp_path: Path) -> None:
    """msmtp (sendmail-compatible) submits over STARTTLS with AUTH PLAIN, verified."""
    msmtp = need("msmtp")
    relay, certs, d = setup
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\n"
        "account relayd\n"
        "host 127.0.0.1\n"
        f"port {relay.ports['submission']}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {certs.ca}\n"
        "tls_host_override smtp.test\n"
        "auth plain\nuser alice\npassword alice-pw\n"
        "from app@example.org\n"
        "account default : relayd\n"
    )
    rc.chmod(0o600)
    out = subprocess.run(
        [msmtp, "-C", str(rc), "-t"],
        input="To: user@example.net\nSubject: via msmtp\n\nhello from msmtp\n",
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [path] = wait_for(lambda: maildir(d, "outbox_a"), what="msmtp's message")
    data = path.read_bytes()
    assert b"Subject: via msmtp" in data and b"with ESMTPSA" in data


def test_postfix_null_client_relays_through_relayd(setup, tmp_path: Path) -> None:
    """A real Postfix null client (relayhost = relayd, SASL, smtp_tls_security_level =
    encrypt): mail handed to it arrives through relayd."""
    from tests.postfix import PrivatePostfix

    relay, certs, d = setup
    if not any(Path(p).glob("libplain.so*") for p in ("/usr/lib/x86_64-linux-gnu/sasl2",
                                                      "/usr/lib/sasl2")):
        pytest.skip("libsasl2-modules (PLAIN) is not installed")
    client = PrivatePostfix(tmp_path / "nullclient", hostname="app-server.test", extra={
        "relayhost": f"[127.0.0.1]:{relay.ports['submission']}",
        "virtual_mailbox_domains": None, "virtual_mailbox_base": None,
        "virtual_mailbox_maps": None, "virtual_uid_maps": None, "virtual_gid_maps": None,
        "virtual_minimum_uid": None,
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": "static:alice:alice-pw",
        "smtp_sasl_security_options": "noanonymous",
        "smtp_tls_security_level": "encrypt",
        "smtp_tls_CAfile": certs.ca,
    })
    client.start()
    try:
        with smtplib.SMTP("127.0.0.1", client.port, timeout=30) as s:
            s.sendmail("app@example.org", ["user@example.net"],
                       "Subject: via postfix\r\n\r\nhello from a null client\r\n")
        [path] = wait_for(lambda: maildir(d, "outbox_a"), timeout=60,
                          what="the null client's message")
        data = path.read_bytes()
        assert b"Subject: via postfix" in data and b"with ESMTPSA" in data
        assert "user=alice" in relay.log()
        log = wait_for(lambda: "status=sent" in client.log() and client.log(), what="sent")
        assert "TLS" in log or "Trusted TLS" in log or "relay=127.0.0.1" in log
    finally:
        client.stop()
