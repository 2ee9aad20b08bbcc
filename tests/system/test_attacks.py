"""Attacks on a real relayd process over raw sockets.

- SMTP smuggling (design invariant 4), on the receiving *and* the forwarding
  side: one raw session whose body hides a second transaction behind every
  end-of-data look-alike; relayd must queue one message and hand exactly one
  to the smarthost (Postfix's smtp-sink, which dumps every message it gets).
- Injection: NUL, 8-bit and random bytes, an HTTP request, a TLS ClientHello
  on a plaintext port.  Each gets error replies or a clean close; the daemon
  stays up, logs no traceback, and serves a normal client meanwhile.
- The open-relay matrix (invariant 2): address forms that route elsewhere
  after the relay decision are refused from outside ``mynetworks``.

One relay (and one sink) per group, shared by its tests, to keep this fast.
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix import Sink
from tests.relay import Relay, wait_for

QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\S+)\r?$", re.M)


# -- helpers --------------------------------------------------------------------


def start_relay(directory: Path, listeners: str, route: str) -> Relay:
    """A relayd with the given [[listener]] tables and one route "out"."""
    directory.mkdir(parents=True, exist_ok=True)
    config = f"""
[server]
hostname = "relay.test"
spool = "{directory / 'spool'}"

[http]
listen = "tcp:0:interface=127.0.0.1"

[queue]
retry = ["1h"]

{listeners}

[route.out]
{route}
"""
    relay = Relay(directory, config=config)
    relay.start()
    names = re.findall(r'^name = "(\S+)"', listeners, re.M)

    def all_bound() -> bool:
        relay.wait_listening()
        return all(n in relay.ports for n in names)

    wait_for(all_bound, what="every listener to be bound")
    return relay


def session(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send ``data`` in one write and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_eof(s)


def read_to_eof(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def reply_codes(raw: bytes) -> list[int]:
    """The code of every final reply line (multi-line replies counted once)."""
    return [int(line[:3]) for line in raw.split(b"\r\n") if line[3:4] == b" "]


def assert_healthy(relay: Relay) -> None:
    assert relay.proc is not None and relay.proc.poll() is None, relay.log()[-3000:]
    assert "Traceback" not in relay.log(), relay.log()[-6000:]


# -- SMTP smuggling ------------------------------------------------------------------

VARIANTS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CR": b"\r.\r",
    "LF.CR": b"\n.\r",
    "CRLF-NUL.CRLF": b"\r\n\x00.\r\n",
    "CRLF.LF": b"\r\n.\n",
}

SMUGGLED = (
    b"MAIL FROM:<evil@example.org>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"boo\r\n"
    b".\r\n"
)


@pytest.fixture(scope="module")
def smuggling_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relay, Sink]]:
    sink = Sink(tmp_path_factory.mktemp("sink")).start()
    relay = None
    try:
        relay = start_relay(
            tmp_path_factory.mktemp("smuggle"),
            '[[listener]]\nname = "mta"\nlisten = "tcp:0:interface=127.0.0.1"\nroute = "out"\n',
            f'smarthost = ["127.0.0.1:{sink.port}"]\ntls = "none"\n',
        )
        yield relay, sink
    finally:
        if relay is not None:
            relay.stop()
        sink.stop()


def _header_section(dump: bytes) -> bytes:
    return dump.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_smuggling_is_one_message_in_and_out(smuggling_setup, variant: str) -> None:
    """A body hiding a second transaction behind an end-of-data look-alike: relayd
    answers one 250 queued, forwards one message, and smtp-sink receives one message
    (in which the "smuggled" transaction is body text, never a message of its own)."""
    relay, sink = smuggling_setup
    before = sink.messages()
    tag = f"outer-{variant}"
    payload = (
        b"EHLO attacker.test\r\n"
        b"MAIL FROM:<app@example.org>\r\n"
        b"RCPT TO:<user@example.net>\r\n"
        b"DATA\r\n"
        + f"Subject: {tag}\r\n\r\nhello".encode()
        + VARIANTS[variant]
        + SMUGGLED
        + b"\r\n.\r\nQUIT\r\n"
    )
    raw = session(relay.smtp_port, payload)
    queued = QUEUED.findall(raw)
    assert len(queued) == 1, raw
    codes = reply_codes(raw)
    # One MAIL, one RCPT and one DATA were executed; the smuggled ones were body text.
    assert codes.count(354) == 1, raw
    assert raw.count(b"250 2.1.0 Ok") == 1 and raw.count(b"250 2.1.5 Ok") == 1, raw
    assert codes[-1] == 221, raw
    [qid] = [q.decode() for q in queued]

    # The forwarding side: exactly one delivery of that queue id, to the sink.
    wait_for(lambda: f"{qid}: to=<user@example.net>" in relay.log()
             and "status=sent" in relay.log(), timeout=30, what="delivery to smtp-sink")
    sent = re.findall(rf"^.*{qid}: to=<[^>]*> .*status=sent.*$", relay.log(), re.M)
    assert len(sent) == 1, relay.log()[-3000:]
    new = wait_for(lambda: [m for m in sink.messages() if m not in before] or None,
                   timeout=10, what="the dump at smtp-sink")
    time.sleep(0.3)  # any second message would land now
    new = [m for m in sink.messages() if m not in before]
    assert len(new) == 1, new
    [dump] = new
    headers = _header_section(dump)
    assert f"Subject: {tag}".encode() in headers, dump
    assert b"Subject: smuggled" not in headers, dump
    assert b"evil@example.org" not in headers and b"victim@example.net" not in headers, dump
    # NUL is never relayed (listener default nul = "strip"): a next hop that drops
    # NULs before looking for end-of-data would otherwise see CRLF.CRLF here.
    assert b"\x00" not in dump, dump
    # Nothing anywhere in the sink was sent by the smuggled envelope.
    for m in sink.messages():
        assert b"X-Mail-Args: <evil@example.org>" not in m, m
        assert not _header_section(m).count(b"Subject: smuggled"), m
    assert_healthy(relay)


def test_smuggling_totals(smuggling_setup) -> None:
    """After every variant: as many dumps at the sink as variants, the queue is empty."""
    relay, sink = smuggling_setup
    wait_for(lambda: relay.queued() == [], timeout=30, what="empty queue")
    dumps = sink.messages()
    outers = [m for m in dumps if b"Subject: outer-" in _header_section(m)]
    assert len(outers) == len(dumps)
    assert len({_header_section(m).split(b"Subject: ", 1)[1].split(b"\n", 1)[0]
                for m in outers}) == len(outers)
    assert len(relay.log().split("status=sent")) - 1 == len(dumps)
    assert_healthy(relay)


# -- injection and the open-relay matrix share a relay ------------------------------------

LISTENERS = """
[[listener]]
name = "mta"
listen = "tcp:0:interface=127.0.0.1"
route = "out"

[[listener]]
name = "outside"
listen = "tcp:0:interface=127.0.0.1"
route = "out"
mynetworks = ["192.0.2.0/24"]

[[listener]]
name = "nulreject"
listen = "tcp:0:interface=127.0.0.1"
route = "out"
nul = "reject"
"""


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    d = tmp_path_factory.mktemp("attacks")
    r = start_relay(d, LISTENERS, f'maildir = "{d / "outbox"}"\n')
    try:
        yield r
    finally:
        r.stop()


def _delivered_with(relay: Relay, tag: str) -> list[Path]:
    return [p for p in relay.delivered() if tag.encode() in p.read_bytes()]


class Bystander:
    """A well-behaved smtplib client whose transaction straddles an attack."""

    def __init__(self, relay: Relay, tag: str) -> None:
        self.relay = relay
        self.tag = tag
        self.smtp = relay.smtp("mta")
        self.smtp.ehlo("bystander.test")
        code, _ = self.smtp.mail("app@example.org")
        assert code == 250

    def finish(self) -> None:
        code, _ = self.smtp.rcpt("user@example.net")
        assert code == 250
        code, reply = self.smtp.data(f"Subject: {self.tag}\r\n\r\nstill here\r\n".encode())
        assert code == 250, reply
        self.smtp.quit()
        wait_for(lambda: _delivered_with(self.relay, self.tag), timeout=30,
                 what="the bystander's message")


def _client_hello() -> bytes:
    """A real TLS ClientHello (starts ``\\x16\\x03\\x01``), from ssl's memory BIOs."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:3] == b"\x16\x03\x01", hello[:8]
    return hello


def _garbage(seed: int, size: int = 4096) -> bytes:
    rng = random.Random(seed)
    alphabet = bytes(range(256)) + b"\r\n" * 20
    return bytes(rng.choice(alphabet) for _ in range(size))


INJECTIONS = {
    "nul-in-commands": (
        b"EHLO a\x00b\r\nNO\x00OP\r\nHELO x\x00\r\nMAIL FROM:<a\x00@example.org>\r\n"
        b"EHLO client.test\r\nMAIL FROM:<app@example.org>\r\n"
        b"RCPT TO:<u\x00ser@example.net>\r\nRCPT TO:<user@example.net\x00>\r\nQUIT\r\n"
    ),
    "8bit-in-commands": (
        b"EHLO client.test\r\nMAIL FROM:<\xc3\xbcser@example.org>\r\n"
        b"MAIL FROM:<\xff\xfe@example.org>\r\nMAIL FROM:<app@example.org>\r\n"
        b"RCPT TO:<\xc3\xbcser@example.net>\r\nRCPT TO:<user@ex\xe4mple.net>\r\n"
        b"VRF\xd9 x\r\n\xff\xff\xff\r\nQUIT\r\n"
    ),
    "binary-garbage": _garbage(1) + b"\r\n" + _garbage(2) + b"\r\nQUIT\r\n",
    "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", list(INJECTIONS), ids=list(INJECTIONS))
def test_injection_gets_errors_and_harms_nobody(relay: Relay, name: str) -> None:
    """Hostile bytes on the command channel: every reply after the greeting is an
    error (or a 250 for the few clean commands in the mix), nothing is queued from
    them, the process stays up without a traceback, and a concurrent client's
    transaction goes through."""
    bystander = Bystander(relay, f"bystander-{name}")
    before = len(relay.delivered())
    with socket.create_connection(("127.0.0.1", relay.ports["mta"]), timeout=20) as s:
        s.sendall(INJECTIONS[name])
        # HTTP requests do not QUIT: the client gives up (EOF) after the replies.
        s.settimeout(2)
        raw = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            s.shutdown(socket.SHUT_WR)
            s.settimeout(20)
            raw += read_to_eof(s)
        except ConnectionResetError:
            pass
    codes = reply_codes(raw)
    assert codes[0] == 220, raw
    clean = {"EHLO client.test", "MAIL FROM:<app@example.org>", "QUIT"}
    expected_ok = sum(1 for line in INJECTIONS[name].split(b"\r\n")
                      if line.decode("latin-1") in clean)
    errors = [c for c in codes[1:] if c >= 400]
    oks = [c for c in codes[1:] if c < 400]
    assert all(c >= 500 or c == 421 for c in errors), raw
    assert len(oks) <= expected_ok, raw
    assert 354 not in codes and not QUEUED.search(raw), raw
    assert errors, raw
    bystander.finish()
    assert len(relay.delivered()) == before + 1
    assert_healthy(relay)


def test_http_post_cannot_carry_smtp(relay: Relay) -> None:
    """An HTML form posted at the SMTP port by a browser inside mynetworks: the
    session must end at the HTTP request line, before any MAIL in the body."""
    before = len(relay.delivered())
    raw = session(relay.ports["mta"], (
        b"POST /submit HTTP/1.1\r\nHost: relay.test:25\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 140\r\n\r\n"
        b"MAIL FROM:<form@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"Subject: via-http-post\r\n\r\nspam\r\n.\r\nQUIT\r\n"))
    time.sleep(0.5)
    assert_healthy(relay)
    assert len(relay.delivered()) == before and not QUEUED.search(raw), raw
    assert 354 not in reply_codes(raw) and b"250 2.1.0" not in raw, raw


def test_nul_in_data_is_not_a_crash(relay: Relay) -> None:
    """NUL bytes inside DATA: either queued (as Postfix does) or refused with 5xx;
    never a traceback, and nothing else is executed from the body."""
    bystander = Bystander(relay, "bystander-nul-data")
    raw = session(relay.ports["mta"], (
        b"EHLO client.test\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<user@example.net>\r\n"
        b"DATA\r\nSubject: nul-in-body\r\n\r\na\x00b\r\n\x00\r\n\x00.\r\n.\x00\r\nRSET\x00\r\n"
        b"\r\n.\r\nQUIT\r\n"))
    codes = reply_codes(raw)
    assert codes[-1] == 221 and codes.count(354) == 1, raw
    final = codes[codes.index(354) + 1]
    assert final == 250 or 500 <= final < 600, raw
    bystander.finish()
    assert final == 250, raw  # nul = "strip" is the default
    [path] = wait_for(lambda: _delivered_with(relay, "nul-in-body"), what="the NUL message")
    delivered = path.read_bytes()
    assert b"\x00" not in delivered and b"\r\nab\r\n" in delivered.replace(b"\n", b"\r\n")
    assert_healthy(relay)


def test_nul_reject_listener_refuses_and_goes_on(relay: Relay) -> None:
    """``nul = "reject"``: the CRLF NUL . CRLF variant is read to the real end of
    the data, answered 554 5.6.0, and the session takes the next transaction."""
    before = len(relay.delivered())
    raw = session(relay.ports["nulreject"], (
        b"EHLO client.test\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<user@example.net>\r\n"
        b"DATA\r\nSubject: refused-nul\r\n\r\nhello\r\n\x00.\r\n" + SMUGGLED
        + b"\r\n.\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<user@example.net>\r\n"
        b"DATA\r\nSubject: after-nul-reject\r\n\r\nfine\r\n.\r\nQUIT\r\n"))
    assert b"554 5.6.0 Error: NUL character received\r\n" in raw, raw
    assert len(QUEUED.findall(raw)) == 1 and reply_codes(raw)[-1] == 221, raw
    wait_for(lambda: _delivered_with(relay, "after-nul-reject"), what="the clean message")
    assert not _delivered_with(relay, "refused-nul") and not _delivered_with(relay, "smuggled")
    assert len(relay.delivered()) == before + 1
    assert_healthy(relay)


def test_tls_client_hello_on_plaintext_port(relay: Relay) -> None:
    """A ClientHello where SMTP is expected: no crash, no reply but errors, and the
    connection ends cleanly when the client gives up; a real TLS client fails its
    handshake at once (the 220 is not a ServerHello)."""
    bystander = Bystander(relay, "bystander-tls")
    hello = _client_hello()
    with socket.create_connection(("127.0.0.1", relay.ports["mta"]), timeout=20) as s:
        s.sendall(hello)
        s.settimeout(1)
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except TimeoutError:
            pass
        # A ClientHello has no line end, or an over-long/unknown "line": at most
        # errors come back.  Then the client gives up.
        s.settimeout(20)
        s.sendall(b"\r\n")
        s.shutdown(socket.SHUT_WR)
        raw += read_to_eof(s)
    codes = reply_codes(raw)
    assert codes[0] == 220 and all(c >= 500 for c in codes[1:]), raw

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", relay.ports["mta"]), timeout=20) as s:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            ctx.wrap_socket(s, server_hostname="relay.test")
    bystander.finish()
    assert_healthy(relay)


# -- open relay ------------------------------------------------------------------------

RELAY_TRICKS = [
    "user%ext.example@relay.test",
    '"user@ext.example"@relay.test',
    "@relay.test:user@ext.example",
    "user@ext.example@relay.test",
    "user!ext.example@relay.test",
    "user@[192.0.2.1]",
    "USER@EXT.EXAMPLE",
    "user@ext.example.",
    "postmaster",
    "postmaster@relay.test",
]


def _rcpt_matrix(relay: Relay, listener: str) -> dict[str, tuple[int, bytes]]:
    out = {}
    with relay.smtp(listener) as s:
        s.ehlo("client.test")
        for rcpt in RELAY_TRICKS:
            code, _ = s.mail("app@example.org")
            assert code == 250
            # smtplib would quote/bracket; send the path exactly as written.
            s.putcmd("RCPT", f"TO:<{rcpt}>")
            out[rcpt] = s.getreply()
            s.rset()
    return out


def test_open_relay_matrix_from_outside_mynetworks(relay: Relay) -> None:
    """From outside mynetworks, unauthenticated: every trick is 550 5.7.1 or 501,
    never 250; then from inside mynetworks the same syntactically valid paths are 250."""
    outside = _rcpt_matrix(relay, "outside")
    for rcpt, (code, text) in outside.items():
        assert code == 501 or (code == 550 and text.startswith(b"5.7.1")), (rcpt, code, text)
    inside = _rcpt_matrix(relay, "mta")
    for rcpt, (code, text) in inside.items():
        assert code == (501 if outside[rcpt][0] == 501 else 250), (rcpt, code, text)
    # Everything is syntactically fine for relayd's lenient parser (as Postfix's).
    assert [r for r, (c, _) in outside.items() if c != 550] == []
    assert "Relay access denied" in relay.log()
    assert_healthy(relay)
