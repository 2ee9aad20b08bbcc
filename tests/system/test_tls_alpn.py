"""Clients that offer ALPN get TLS on relayd's STARTTLS and implicit-TLS
listeners, with no protocol selected (issue 14.1; Postfix does the same):
Python's ssl with ``set_alpn_protocols`` and ``openssl s_client -alpn``, over
TCP against relayd as a process (in memory: tests/unit/test_tls_alpn.py)."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.certs import PKI, make_pki
from tests.conftest import need
from tests.relay import Relay, wait_for

OFFERS = [["smtp"], ["h2", "http/1.1"]]


@pytest.fixture
def tls_relay(relay_factory, tmp_path: Path) -> tuple[Relay, PKI]:
    """relayd with two listeners on one certificate: ``mta`` (STARTTLS, the
    default with [tls]) and ``smtps`` (implicit TLS)."""
    pki = make_pki(tmp_path / "pki")
    relay: Relay = relay_factory(extra=(
        f'[tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n\n'
        '[[listener]]\nname = "smtps"\nlisten = "tcp:0:interface=127.0.0.1"\n'
        'tls = "implicit"\nroute = "outbox"\n'
    ))

    def both_listening() -> bool:
        relay.wait_listening()
        return {"mta", "smtps"} <= relay.ports.keys()

    wait_for(both_listening, what="both listeners")
    return relay, pki


def message(subject: str) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "app@example.org", "user@example.net", subject
    m.set_content("ALPN offered, ignored.\n")
    return bytes(m)


def quit_and_see_closed(s: smtplib.SMTP) -> None:
    """QUIT gets 221 and then the server closes the TLS session (close_notify
    and FIN: the read sees the end), not only when the idle timeout fires."""
    assert s.docmd("QUIT")[0] == 221
    assert s.sock is not None
    s.sock.settimeout(30)
    assert s.sock.recv(1) == b""
    s.close()


@pytest.mark.parametrize("offer", OFFERS, ids=",".join)
def test_python_ssl_with_alpn_on_starttls_and_implicit_tls(tls_relay, offer: list[str]) -> None:
    relay, pki = tls_relay
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(offer)
    s = relay.smtp("mta")
    assert s.starttls(context=ctx)[0] == 220
    assert isinstance(s.sock, ssl.SSLSocket) and s.sock.selected_alpn_protocol() is None
    assert s.sendmail("app@example.org", ["user@example.net"], message("starttls")) == {}
    quit_and_see_closed(s)
    s = smtplib.SMTP_SSL("127.0.0.1", relay.ports["smtps"], local_hostname="client.test",
                         context=ctx, timeout=30)
    assert isinstance(s.sock, ssl.SSLSocket) and s.sock.selected_alpn_protocol() is None
    assert s.sendmail("app@example.org", ["user@example.net"], message("implicit")) == {}
    quit_and_see_closed(s)
    assert len(relay.wait_delivered(2)) == 2


@pytest.mark.parametrize("offer", OFFERS, ids=",".join)
@pytest.mark.parametrize("listener", ["mta", "smtps"])
def test_openssl_s_client_with_alpn(tls_relay, offer: list[str], listener: str) -> None:
    relay, pki = tls_relay
    openssl = need("openssl")
    args = [openssl, "s_client", "-connect", f"127.0.0.1:{relay.ports[listener]}",
            "-servername", "smtp.test", "-CAfile", str(pki.ca), "-verify_return_error",
            "-nocommands", "-ign_eof", "-alpn", ",".join(offer)]
    if listener == "mta":
        args[2:2] = ["-starttls", "smtp"]
    # s_client sends the lines it reads once the handshake is done (no
    # command letters, stdin's end ignored): it exits when relayd closes the
    # session after the 221, which shows the SMTP session went on over TLS.
    out = subprocess.run(args, input=b"QUIT\r\n", capture_output=True, timeout=60)
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    assert out.returncode == 0, text
    assert "alert" not in text, text
    assert "No ALPN negotiated" in text, text
    assert "Verify return code: 0 (ok)" in text, text
    assert "221 " in text, text
