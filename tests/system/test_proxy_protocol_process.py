"""PROXY protocol on relayd as a process: the client address from the header
reaches policy and the Received line, in clear, with implicit TLS and STARTTLS."""

from __future__ import annotations

import email
import smtplib
import socket
import ssl
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.certs import issue, make_ca
from tests.relay import Relay, wait_for
from tests.unit.test_proxy_protocol import CLIENT, OUTSIDER, tlv, v1, v2


def message() -> bytes:
    m = EmailMessage()
    m["From"] = "app@example.org"
    m["To"] = "user@example.net"
    m["Subject"] = "through the balancer"
    m.set_content("Hello.\n")
    return bytes(m)


def received(path: Path) -> str:
    """The Received header relayd added (the first one)."""
    value = email.message_from_bytes(path.read_bytes())["Received"]
    assert value is not None
    return str(value)


def smtp_after_header(sock: socket.socket) -> smtplib.SMTP:
    """smtplib on a socket that already carried the PROXY header."""
    s = smtplib.SMTP(local_hostname="client.test", timeout=30)
    s.sock = sock
    s._host = "127.0.0.1"  # type: ignore[attr-defined]  # for starttls's server_hostname
    code, banner = s.getreply()
    assert code == 220, banner
    return s


PROXY_LISTENER = ('proxy_protocol = true\nproxy_trusted = ["127.0.0.0/8"]\n'
                  'mynetworks = ["192.0.2.0/24"]\n')


def test_relayd_takes_the_client_address_from_a_v2_header(relay_factory) -> None:
    relay: Relay = relay_factory(listener_extra=PROXY_LISTENER)
    port = relay.smtp_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(v2(CLIENT, "127.0.0.1", 40000, port, tlvs=tlv(0x04, b"\0" * 3)))
    with smtp_after_header(sock) as s:
        assert s.sendmail("app@example.org", ["user@example.net"], message()) == {}
    [path] = relay.wait_delivered(1)
    assert "([192.0.2.7])" in received(path)

    # The same balancer forwarding a client outside mynetworks.
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(v1(src=OUTSIDER, dport=port).rstrip(b"\n") + b"\n" + b"EHLO client.test\r\n")
    with smtp_after_header(sock) as s:
        s.getreply()  # the pipelined EHLO's reply
        assert s.mail("app@example.org")[0] == 250
        code, text = s.rcpt("user@example.net")
        assert (code, text) == (550, b"5.7.1 <user@example.net>: Relay access denied")

    # A client talking SMTP straight to the port gets nothing.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"EHLO client.test\r\n")
        assert raw.recv(100) == b""
    wait_for(lambda: "bad PROXY protocol header" in relay.log(), what="the refusal logged")


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_relayd_tls_behind_proxy_header(relay_factory, tmp_path: Path, tls: str) -> None:
    """The header comes first, in clear; then (implicit) the TLS handshake and
    the 220, or (STARTTLS) the 220 and TLS under the header's client address."""
    (tmp_path / "pki").mkdir()
    ca, ca_cert, ca_key = make_ca(tmp_path / "pki", "proxy-test-ca")
    server = issue(tmp_path / "pki", "server", "smtp.test", ca_cert, ca_key, dns=("smtp.test",),
                   ips=("127.0.0.1",))
    relay: Relay = relay_factory(
        listener_extra=PROXY_LISTENER + f'tls = "{tls}"\n',
        extra=f'[tls]\ncert = "{server.cert}"\nkey = "{server.key}"\n',
    )
    port = relay.smtp_port
    ctx = ssl.create_default_context(cafile=str(ca))
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(v2(CLIENT, "127.0.0.1", 40000, port))
    if tls == "implicit":
        sock = ctx.wrap_socket(sock, server_hostname="smtp.test")
    with smtp_after_header(sock) as s:
        if tls == "starttls":
            assert s.starttls(context=ctx)[0] == 220
        assert s.sendmail("app@example.org", ["user@example.net"], message()) == {}
    [path] = relay.wait_delivered(1)
    assert "([192.0.2.7])" in received(path)
    assert "ESMTPS" in received(path)
