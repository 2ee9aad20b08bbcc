"""STARTTLS, implicit TLS and SMTP AUTH in the server protocol, driven in memory.

StringTransport (a subclass that provides ITLSTransport and records
``startTLS``), task.Clock, an in-memory auth backend: every reply is checked
exactly, as a transcript.  Real TLS handshakes are in
tests/system/test_submission_process.py.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayd.config import parse
from relayd.interfaces import IAuthBackend
from relayd.metrics import Metrics
from relayd.smtpd.authlimit import AuthFailureTracker
from relayd.smtpd.protocol import AUTH_BACKEND_TIMEOUT, AUTH_FAILURE_DELAY, SMTPServerFactory
from relayd.testing import (
    FakeAuthBackend,
    RecordingSink,
    TLSStringTransport,
    listener_toml,
    sample,
)

OK = "250 2.0.0 Ok"
MAIL_OK = "250 2.1.0 Ok"
RCPT_OK = "250 2.1.5 Ok"
QUEUED_1 = "250 2.0.0 Ok: queued as 00000000000000000001"
READY = "220 2.0.0 Ready to start TLS"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Error: authentication failed"
AUTH_TEMP = "454 4.7.0 Temporary authentication failure"
NEED_TLS = "530 5.7.0 Must issue a STARTTLS command first"
NEED_AUTH = "530 5.7.0 Authentication required"
NEED_EHLO = "503 5.5.1 Error: send HELO/EHLO first"
CANNOT_DECODE = "501 5.5.2 Cannot decode response"
ABORTED = "501 5.7.0 Authentication aborted"
BLOCKED = "421 4.7.0 relay.test Error: too many authentication failures"
OUTSIDER = "192.0.2.7"

CONTEXT = object()  # stands for the ServerTLS connection creator


def b64(text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode("utf-8")
    return base64.b64encode(text).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def submission_listener(**overrides: Any) -> Any:
    """A listener with TLS and AUTH keys (the paths are never read here)."""
    keys: dict[str, Any] = {
        "tls": "starttls",
        "tls_cert": "/nonexistent/cert.pem",
        "tls_key": "/nonexistent/key.pem",
        "auth": "optional",
        "auth_backend": "apps",
        "mynetworks": ["127.0.0.0/8"],
    }
    keys.update(overrides)
    keys = {k: v for k, v in keys.items() if v is not None}
    text = listener_toml(**keys) + '\n[auth.apps]\ntype = "htpasswd"\nfile = "/nonexistent"\n'
    return parse(text, "<test>").listeners[0]


class Session:
    """One client of a TLS/AUTH listener; several may share a factory."""

    def __init__(self, factory: SMTPServerFactory, client_ip: str = OUTSIDER) -> None:
        self.factory = factory
        peer: Any = (IPv6Address if ":" in client_ip else IPv4Address)("TCP", client_ip, 12345)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.replies()

    def send(self, data: str | bytes) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list[str]:
        raw = self.transport.value()
        self.transport.clear()
        assert not raw or raw.endswith(b"\r\n"), raw
        return raw.decode("utf-8").split("\r\n")[:-1]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def starttls(self) -> None:
        assert self.send("EHLO client.test\r\n")[-1] == "250 CHUNKING"
        assert self.send("STARTTLS\r\n") == [READY]
        assert self.transport.tls_starts == [CONTEXT]

    def ehlo(self) -> list[str]:
        return self.send("EHLO client.test\r\n")


class Env:
    """A factory (listener, backend, sink, clock, metrics) and its sessions."""

    def __init__(
        self,
        backend: FakeAuthBackend | None = None,
        with_backend: bool = True,
        context: object | None = CONTEXT,
        **overrides: Any,
    ) -> None:
        self.listener = submission_listener(**overrides)
        self.backend = backend if backend is not None else FakeAuthBackend(
            {"alice": "secret", "bob": "hunter2"}
        )
        self.sink = RecordingSink()
        self.clock = Clock()
        self.metrics = Metrics()
        self.factory = SMTPServerFactory(
            self.listener, "relay.test", self.sink, self.clock, self.metrics,
            tls=context, auth_backend=self.backend if with_backend else None,
        )

    def connect(self, client_ip: str = OUTSIDER) -> Session:
        return Session(self.factory, client_ip)

    def tls_session(self, client_ip: str = OUTSIDER) -> Session:
        s = self.connect(client_ip)
        s.starttls()
        assert s.ehlo()[0] == "250-relay.test"
        return s

    def attempts(self, result: str) -> float:
        return sample(self.metrics, "relayd_auth_attempts_total",
                      {"listener": "test", "result": result})


# -- config: TLS and AUTH listeners are accepted now ------------------------------


def test_config_accepts_tls_and_auth_listeners() -> None:
    listener = submission_listener(tls="starttls", require_tls=True, auth="required")
    assert (listener.tls, listener.require_tls, listener.auth) == ("starttls", True, "required")
    assert submission_listener(tls="implicit").tls == "implicit"


def test_config_accepts_proxy_protocol_and_rate_limits() -> None:
    config = parse(listener_toml(proxy_protocol=True, proxy_trusted=["10.0.0.0/8"],
                                 messages_per_ip="10/h"), "<test>")
    assert config.listeners[0].proxy_protocol is True


def test_fake_backend_provides_the_interface() -> None:
    assert verifyObject(IAuthBackend, FakeAuthBackend())


# -- EHLO ---------------------------------------------------------------------------


def test_ehlo_advertises_starttls_but_not_auth_before_tls() -> None:
    s = Env().connect()
    assert s.ehlo() == [
        "250-relay.test",
        "250-PIPELINING",
        "250-SIZE 26214400",
        "250-STARTTLS",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250-DSN",
        "250-SMTPUTF8",
        "250 CHUNKING",
    ]


def test_ehlo_after_starttls_advertises_auth_and_not_starttls() -> None:
    s = Env().connect()
    s.starttls()
    assert s.ehlo() == [
        "250-relay.test",
        "250-PIPELINING",
        "250-SIZE 26214400",
        "250-AUTH PLAIN LOGIN",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250-DSN",
        "250-SMTPUTF8",
        "250 CHUNKING",
    ]


def test_implicit_tls_session_starts_encrypted() -> None:
    """tls = "implicit": no STARTTLS offered, AUTH offered at once, ESMTPS."""
    env = Env(tls="implicit")
    s = env.connect()
    reply = s.ehlo()
    assert "250-STARTTLS" not in reply and "250-AUTH PLAIN LOGIN" in reply
    assert s.send("STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]
    assert s.protocol._session.protocol == "ESMTPS"
    assert s.transport.tls_starts == []


def test_no_auth_advertised_without_auth_on_the_listener() -> None:
    s = Env(auth="none", auth_backend=None).connect()
    s.starttls()
    assert not any("AUTH" in line for line in s.ehlo())
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [
        "502 5.5.2 Error: command not recognized"
    ]


def test_never_cram_md5() -> None:
    s = Env().tls_session()
    assert s.send("AUTH CRAM-MD5\r\n") == ["504 5.5.4 Unsupported authentication mechanism"]


# -- STARTTLS ---------------------------------------------------------------------------


def test_starttls_reply_goes_out_before_the_switch() -> None:
    s = Env().connect()
    s.ehlo()
    s.send("STARTTLS\r\n")
    assert s.transport.written_before_tls == b"220 2.0.0 Ready to start TLS\r\n"


def test_starttls_discards_pipelined_plaintext() -> None:
    """CVE-2011-0411: what follows STARTTLS in the same packet is never executed."""
    env = Env()
    s = env.connect()
    s.ehlo()
    assert s.send("STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<a@example.net>\r\n") == [READY]
    assert env.sink.capacity_checks == 0
    # Inside TLS: the injected MAIL was not remembered, and EHLO is needed again.
    assert s.send("MAIL FROM:<good@example.org>\r\n") == [NEED_EHLO]
    s.ehlo()
    assert s.send("MAIL FROM:<good@example.org>\r\n") == [MAIL_OK]
    assert env.sink.capacity_checks == 1


def test_starttls_discards_a_partial_line_too() -> None:
    s = Env().connect()
    s.ehlo()
    assert s.send("STARTTLS\r\nMAIL FROM:<ev") == [READY]
    assert s.send("il@x>\r\n") == ["502 5.5.2 Error: command not recognized"]


def test_starttls_resets_helo_transaction_and_auth() -> None:
    """Plaintext AUTH (loopback, plaintext_auth) and a MAIL do not survive STARTTLS."""
    env = Env(plaintext_auth=True, mynetworks=["10.0.0.0/8"])
    s = env.connect("127.0.0.1")
    assert "250-AUTH PLAIN LOGIN" in s.ehlo()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]
    assert s.send("MAIL FROM:<a@example.org>\r\n") == [MAIL_OK]
    assert s.protocol._session.user == "alice"
    assert s.send("STARTTLS\r\n") == [READY]
    session = s.protocol._session
    assert (session.helo, session.user, session.protocol) == ("", None, "SMTPS")
    assert s.send("MAIL FROM:<a@example.org>\r\n") == [NEED_EHLO]
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [NEED_EHLO]
    s.ehlo()
    assert s.protocol._session.protocol == "ESMTPS"
    # The earlier transaction is gone (no "nested MAIL") and AUTH is needed again.
    assert s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n") == [
        MAIL_OK, "550 5.7.1 <b@example.net>: Relay access denied"
    ]


def test_starttls_twice() -> None:
    s = Env().tls_session()
    assert s.send("STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]
    assert s.transport.tls_starts == [CONTEXT]


def test_starttls_with_an_argument() -> None:
    s = Env().connect()
    assert s.send("STARTTLS now\r\n") == ["501 5.5.4 Syntax: STARTTLS"]
    assert s.transport.tls_starts == []


def test_starttls_on_a_listener_without_tls() -> None:
    """Not a command there: the same 502 as any unknown verb (tests/unit/test_smtpd_protocol.py)."""
    s = Env(tls="none", tls_cert=None, tls_key=None, auth="none", auth_backend=None).connect()
    assert s.send("STARTTLS\r\n") == ["502 5.5.2 Error: command not recognized"]


def test_starttls_without_a_context_is_a_local_problem() -> None:
    s = Env(context=None).connect()
    assert s.send("STARTTLS\r\n") == ["454 4.7.0 TLS not available due to local problem"]


def test_require_tls_refuses_mail_and_auth_before_starttls() -> None:
    env = Env(require_tls=True)
    s = env.connect()
    s.ehlo()
    assert s.send(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nVRFY x\r\n"
        f"AUTH PLAIN {plain('alice', 'secret')}\r\nNOOP\r\nRSET\r\n"
    ) == [NEED_TLS] * 5 + [OK, OK]
    assert env.backend.calls == []
    s.send("STARTTLS\r\n")
    s.ehlo()
    assert s.send("MAIL FROM:<a@example.org>\r\n") == [MAIL_OK]


def test_received_protocol_names() -> None:
    """ESMTPS after STARTTLS; cleanup adds the A for ESMTPSA."""
    env = Env(mynetworks=[OUTSIDER + "/32"])
    s = env.tls_session()
    assert s.protocol._session.protocol == "ESMTPS"
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n")
    message = env.sink.messages[0]
    assert (message.session.protocol, message.session.user) == ("ESMTPS", "alice")


# -- AUTH: before TLS, plaintext_auth ------------------------------------------------------


def test_auth_before_tls() -> None:
    env = Env()
    s = env.connect()
    s.ehlo()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [NEED_TLS]
    assert s.send("AUTH LOGIN\r\n") == [NEED_TLS]
    assert env.backend.calls == []


@pytest.mark.parametrize("client", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_plaintext_auth_for_loopback_clients(client: str) -> None:
    env = Env(plaintext_auth=True)
    s = env.connect(client)
    assert "250-AUTH PLAIN LOGIN" in s.ehlo()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]


@pytest.mark.parametrize("client", [OUTSIDER, "10.0.0.1", "::ffff:192.0.2.1", "2001:db8::1"])
def test_plaintext_auth_is_loopback_only(client: str) -> None:
    env = Env(plaintext_auth=True)
    s = env.connect(client)
    assert not any("AUTH" in line for line in s.ehlo())
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [NEED_TLS]


def test_plaintext_auth_on_a_listener_without_tls() -> None:
    env = Env(tls="none", tls_cert=None, tls_key=None, plaintext_auth=True)
    assert env.connect("127.0.0.1").send(
        f"EHLO c\r\nAUTH PLAIN {plain('alice', 'secret')}\r\n"
    )[-1] == AUTH_OK
    s = env.connect(OUTSIDER)
    s.ehlo()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [
        "503 5.5.1 Error: authentication not enabled"
    ]


# -- AUTH PLAIN ----------------------------------------------------------------------------


def test_auth_plain_initial_response() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]
    assert s.protocol._session.user == "alice"
    assert env.backend.calls == [("alice", "secret")]
    assert env.attempts("success") == 1


def test_auth_plain_challenge() -> None:
    s = Env().tls_session()
    assert s.send("AUTH PLAIN\r\n") == ["334 "]
    assert s.send(plain("alice", "secret") + "\r\n") == [AUTH_OK]


def test_auth_plain_mechanism_is_case_insensitive() -> None:
    s = Env().tls_session()
    assert s.send(f"auth plain {plain('alice', 'secret')}\r\n") == [AUTH_OK]


def test_auth_plain_split_across_packets() -> None:
    s = Env().tls_session()
    line = f"AUTH PLAIN {plain('alice', 'secret')}\r\n"
    assert s.send(line[:7]) == []
    assert s.send(line[7:20]) == []
    assert s.send(line[20:]) == [AUTH_OK]
    assert s.send("AUTH PLAIN\r") == []
    assert s.send("\n") == ["503 5.5.1 Error: already authenticated"]


def test_auth_plain_challenge_response_bytewise() -> None:
    s = Env().tls_session()
    assert s.send("AUTH PLAIN\r\n") == ["334 "]
    for ch in plain("alice", "secret") + "\r":
        assert s.send(ch) == []
    assert s.send("\n") == [AUTH_OK]


def test_auth_pipelined_with_the_transaction() -> None:
    """AUTH, MAIL, RCPT, DATA in one packet: answered in order, the MAIL after 235."""
    env = Env(auth="required", mynetworks=["10.0.0.0/8"])
    s = env.tls_session()
    assert s.send(
        f"AUTH PLAIN {plain('alice', 'secret')}\r\nMAIL FROM:<alice@example.org>\r\n"
        "RCPT TO:<b@example.net>\r\nDATA\r\nhello\r\n.\r\n"
    ) == [AUTH_OK, MAIL_OK, RCPT_OK, "354 End data with <CR><LF>.<CR><LF>", QUEUED_1]
    assert env.sink.messages[0].session.user == "alice"


def test_auth_plain_wrong_password() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n") == []
    env.clock.advance(AUTH_FAILURE_DELAY)
    assert s.replies() == [AUTH_FAILED]
    assert s.protocol._session.user is None
    assert env.attempts("failure") == 1
    # The session goes on: another try.
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]


def test_auth_failure_answer_is_delayed_and_holds_input() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\nNOOP\r\n") == []
    env.clock.advance(AUTH_FAILURE_DELAY - 0.01)
    assert s.replies() == []
    env.clock.advance(0.01)
    assert s.replies() == [AUTH_FAILED, OK]


def test_auth_plain_unknown_user() -> None:
    env = Env()
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('mallory', 'secret')}\r\n")
    env.clock.advance(AUTH_FAILURE_DELAY)
    assert s.replies() == [AUTH_FAILED]


@pytest.mark.parametrize("authzid, reply", [("alice", AUTH_OK), ("bob", AUTH_FAILED)])
def test_auth_plain_authzid(authzid: str, reply: str) -> None:
    """authzid must be empty or the authcid: no acting for another user."""
    env = Env()
    s = env.tls_session()
    out = s.send(f"AUTH PLAIN {plain('alice', 'secret', authzid)}\r\n")
    env.clock.advance(AUTH_FAILURE_DELAY)
    assert out + s.replies() == [reply]
    if reply == AUTH_FAILED:
        assert env.backend.calls == []
        assert env.attempts("failure") == 1


@pytest.mark.parametrize(
    "response",
    [
        "not-base64!",
        "YWxpY2U",  # bad padding
        b64("alice\0secret"),  # one NUL
        b64("\0alice\0secret\0"),  # three NULs
        b64(b"\0\xff\xfe\0secret"),  # not UTF-8
    ],
)
def test_auth_plain_undecodable(response: str) -> None:
    env = Env()
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {response}\r\n") == [CANNOT_DECODE]
    assert s.send("AUTH PLAIN\r\n") == ["334 "]
    assert s.send(response + "\r\n") == [CANNOT_DECODE]
    assert env.backend.calls == []
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]


def test_auth_plain_empty_password_never_reaches_the_backend() -> None:
    env = Env()
    env.backend.users["empty"] = ""
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('empty', '')}\r\n")
    env.clock.advance(AUTH_FAILURE_DELAY)
    assert s.replies() == [AUTH_FAILED]
    assert env.backend.calls == []


def test_auth_cancelled() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send("AUTH PLAIN\r\n*\r\n") == ["334 ", ABORTED]
    assert s.send("AUTH LOGIN\r\n*\r\n") == ["334 VXNlcm5hbWU6", ABORTED]
    assert s.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n*\r\n") == [
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", ABORTED
    ]
    assert env.backend.calls == []
    assert s.send("NOOP\r\n") == [OK]


def test_auth_syntax() -> None:
    s = Env().tls_session()
    assert s.send("AUTH\r\n") == ["501 5.5.4 Syntax: AUTH mechanism"]
    assert s.send("AUTH PLAIN a b\r\n") == ["501 5.5.4 Syntax: AUTH mechanism"]


def test_auth_twice() -> None:
    s = Env().tls_session()
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert s.send(f"AUTH PLAIN {plain('bob', 'hunter2')}\r\n") == [
        "503 5.5.1 Error: already authenticated"
    ]
    assert s.protocol._session.user == "alice"


def test_auth_during_a_transaction() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send("MAIL FROM:<a@example.org>\r\n") == [MAIL_OK]
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [
        "503 5.5.1 Error: MAIL transaction in progress"
    ]
    assert env.backend.calls == []


def test_auth_needs_ehlo() -> None:
    env = Env(tls="implicit")
    s = env.connect()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [NEED_EHLO]


def test_auth_line_limit() -> None:
    """A 12,288-octet AUTH line is fine; a longer exchange line ends the exchange."""
    env = Env()
    s = env.tls_session()
    long_password = "p" * 9000
    env.backend.users["long"] = long_password
    line = f"AUTH PLAIN {plain('long', long_password)}\r\n"
    assert len(line) <= 12288
    assert s.send(line) == [AUTH_OK]
    s2 = env.tls_session()
    assert s2.send("AUTH PLAIN\r\n") == ["334 "]
    assert s2.send("A" * 13000 + "\r\n") == [
        "500 5.5.6 Authentication exchange line is too long"
    ]
    assert s2.send("NOOP\r\n") == [OK]


# -- AUTH LOGIN ---------------------------------------------------------------------------


def test_auth_login() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send("AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert s.send(b64("alice") + "\r\n") == ["334 UGFzc3dvcmQ6"]
    assert s.send(b64("secret") + "\r\n") == [AUTH_OK]
    assert s.protocol._session.user == "alice"


def test_auth_login_with_initial_username() -> None:
    s = Env().tls_session()
    assert s.send(f"AUTH LOGIN {b64('alice')}\r\n") == ["334 UGFzc3dvcmQ6"]
    assert s.send(b64("secret") + "\r\n") == [AUTH_OK]


def test_auth_login_pipelined_in_one_packet() -> None:
    s = Env().tls_session()
    assert s.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64('secret')}\r\nNOOP\r\n") == [
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", AUTH_OK, OK
    ]


def test_auth_login_split_across_packets() -> None:
    s = Env().tls_session()
    data = f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64('secret')}\r\n"
    out: list[str] = []
    for i in range(0, len(data), 5):
        out += s.send(data[i : i + 5])
    assert out == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", AUTH_OK]


def test_auth_login_wrong_password() -> None:
    env = Env()
    s = env.tls_session()
    assert s.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64('nope')}\r\n") == [
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"
    ]
    env.clock.advance(AUTH_FAILURE_DELAY)
    assert s.replies() == [AUTH_FAILED]


def test_auth_login_bad_base64() -> None:
    s = Env().tls_session()
    assert s.send("AUTH LOGIN\r\n!!!\r\n") == ["334 VXNlcm5hbWU6", CANNOT_DECODE]
    assert s.send(f"AUTH LOGIN {b64('alice')}\r\n%%%\r\n") == ["334 UGFzc3dvcmQ6", CANNOT_DECODE]


# -- the backend: errors, slowness, pending ----------------------------------------------


def test_backend_error_is_454_never_535() -> None:
    env = Env()
    env.backend.fail_with = OSError("LDAP server unreachable")
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_TEMP]
    assert s.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64('secret')}\r\n") == [
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", AUTH_TEMP
    ]
    assert env.attempts("error") == 2 and env.attempts("failure") == 0
    assert not env.factory.auth_limiter._recent  # not counted as brute force


def test_backend_raising_synchronously_is_454() -> None:
    env = Env()

    def boom(user: str, password: str) -> Any:
        raise RuntimeError("bug in backend")

    env.backend.authenticate = boom  # type: ignore[method-assign]
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_TEMP]


def test_sender_patterns_failure_is_454() -> None:
    env = Env()
    env.backend.senders_fail_with = OSError("senders file unreadable")
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_TEMP]
    assert s.protocol._session.user is None


def test_pending_backend_holds_pipelined_input() -> None:
    env = Env(mynetworks=["10.0.0.0/8"])
    env.backend.hold = True
    s = env.tls_session()
    assert s.send(
        f"AUTH PLAIN {plain('alice', 'secret')}\r\nMAIL FROM:<a@example.org>\r\n"
        "RCPT TO:<b@example.net>\r\n"
    ) == []
    assert env.sink.capacity_checks == 0
    env.clock.advance(AUTH_BACKEND_TIMEOUT - 1)  # no idle timeout while we owe a reply
    assert s.replies() == [] and not s.closed
    env.backend.release()
    assert s.replies() == [AUTH_OK, MAIL_OK, RCPT_OK]


def test_slow_backend_times_out_with_454() -> None:
    env = Env()
    env.backend.hold = True
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\nNOOP\r\n") == []
    env.clock.advance(AUTH_BACKEND_TIMEOUT)
    assert s.replies() == [AUTH_TEMP, OK]
    assert env.backend.pending[0][0].called  # cancelled
    assert s.protocol._session.user is None
    assert env.attempts("error") == 1


def test_backend_answer_after_disconnect_is_ignored() -> None:
    env = Env()
    env.backend.hold = True
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    s.protocol.connectionLost(None)
    env.backend.release()
    assert s.replies() == []


def test_slow_backend_is_cancelled() -> None:
    """The backend's Deferred is cancelled at the timeout (its canceller runs)."""
    env = Env()
    env.backend.hold = True
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    d = env.backend.pending[0][0]
    cancelled: list[Any] = []
    d._canceller = cancelled.append  # type: ignore[attr-defined]
    env.clock.advance(AUTH_BACKEND_TIMEOUT)
    assert cancelled == [d]
    assert s.replies() == [AUTH_TEMP]
    # A late answer after the 454 changes nothing.
    env.backend.pending.pop(0)
    assert s.protocol._session.user is None


def test_canonical_name_from_the_backend_is_the_session_user() -> None:
    env = Env()
    env.backend.users["Alice"] = "secret"
    env.backend.canonical["Alice"] = "alice"
    s = env.tls_session()
    assert s.send(f"AUTH PLAIN {plain('Alice', 'secret')}\r\n") == [AUTH_OK]
    assert s.protocol._session.user == "alice"
    assert env.backend.sender_calls == ["alice"]


# -- auth = "required", relaying ---------------------------------------------------------


def test_auth_required_refuses_mail_before_auth() -> None:
    env = Env(auth="required")
    s = env.tls_session("127.0.0.1")  # even from mynetworks
    assert s.send("MAIL FROM:<a@example.org>\r\n") == [NEED_AUTH]
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert s.send("MAIL FROM:<a@example.org>\r\n") == [MAIL_OK]


def test_authenticated_client_may_relay_from_anywhere() -> None:
    env = Env()
    s = env.tls_session(OUTSIDER)
    assert s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRSET\r\n") == [
        MAIL_OK, "550 5.7.1 <b@example.net>: Relay access denied", OK
    ]
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n") == [
        MAIL_OK, RCPT_OK
    ]


# -- per-user senders --------------------------------------------------------------------


def test_sender_patterns_limit_the_user() -> None:
    env = Env()
    env.backend.senders["alice"] = ("*@app1.example.org", "alice@example.org")
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert s.send("MAIL FROM:<bob@example.org>\r\n") == [
        "553 5.7.1 <bob@example.org>: Sender address rejected: not owned by user alice"
    ]
    assert s.send("MAIL FROM:<x@APP1.example.org>\r\nRSET\r\n") == [MAIL_OK, OK]
    assert s.send("MAIL FROM:<Alice@example.org>\r\nRSET\r\n") == [MAIL_OK, OK]
    assert s.send("MAIL FROM:<>\r\nRSET\r\n") == [MAIL_OK, OK]


def test_user_without_patterns_is_not_limited() -> None:
    env = Env()
    env.backend.senders["alice"] = ("alice@example.org",)
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('bob', 'hunter2')}\r\n")
    assert s.send("MAIL FROM:<anyone@anywhere.example>\r\n") == [MAIL_OK]


def test_sender_patterns_and_allowed_senders_both_apply() -> None:
    env = Env(allowed_senders=["*@example.org"])
    env.backend.senders["alice"] = ("*@app1.example.org", "alice@example.org")
    s = env.tls_session()
    s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert s.send("MAIL FROM:<x@app1.example.org>\r\n") == [
        "550 5.7.1 <x@app1.example.org>: Sender address rejected: not allowed"
    ]
    assert s.send("MAIL FROM:<alice@example.org>\r\n") == [MAIL_OK]


# -- brute force ----------------------------------------------------------------------------


def fail_once(env: Env, s: Session) -> list[str]:
    s.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n")
    env.clock.advance(AUTH_FAILURE_DELAY)
    return s.replies()


def test_brute_force_block_across_sessions() -> None:
    env = Env(auth_failures="3/5m", auth_block="10m")
    first = env.tls_session()
    assert fail_once(env, first) == [AUTH_FAILED]
    assert fail_once(env, first) == [AUTH_FAILED]
    second = env.tls_session()  # reconnecting does not reset the count
    assert fail_once(env, second) == [AUTH_FAILED]
    assert sample(env.metrics, "relayd_auth_blocked_total", {"listener": "test"}) == 1
    # The session in progress: 421 at its next AUTH, even with the right password.
    assert first.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [BLOCKED]
    assert first.closed
    # New connections from that address: 421 at once.
    third = env.connect()
    assert third.greeting == [BLOCKED] and third.closed
    # Others are not affected.
    other = env.connect("198.51.100.9")
    assert other.greeting == ["220 relay.test ESMTP relayd"]
    # After auth_block, the address may try again.
    env.clock.advance(600)
    fourth = env.tls_session()
    assert fourth.greeting == ["220 relay.test ESMTP relayd"]
    assert fourth.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]


def test_failures_outside_the_window_do_not_add_up() -> None:
    env = Env(auth_failures="3/5m", auth_block="10m")
    s = env.tls_session()
    fail_once(env, s)
    fail_once(env, s)
    env.clock.advance(300)
    s = env.tls_session()
    assert fail_once(env, s) == [AUTH_FAILED]
    assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]


def test_tracker_is_bounded() -> None:
    clock = Clock()
    from relayd.config import Rate

    tracker = AuthFailureTracker(clock, Rate(5, 60.0), 600.0, max_clients=10)
    for i in range(100):
        tracker.failure(f"10.0.0.{i}")
    assert len(tracker._recent) <= 11
    clock.advance(61)
    tracker.failure("10.0.1.1")
    assert list(tracker._recent) == ["10.0.1.1"]


def test_blocked_listener_without_auth_does_not_refuse() -> None:
    """The per-listener tracker only refuses on listeners that offer AUTH."""
    env = Env(auth="none", auth_backend=None)
    env.factory.auth_limiter._blocked[OUTSIDER] = env.clock.seconds() + 600
    assert env.connect().greeting == ["220 relay.test ESMTP relayd"]


def test_implicit_tls_greets_after_the_handshake() -> None:
    """Behind a TLS layer (INegotiated), the 220 waits for handshakeCompleted:
    written earlier, the TLS layer would pause us and we would pause the
    reads the handshake needs."""
    from twisted.internet.interfaces import INegotiated
    from zope.interface import alsoProvides

    env = Env(tls="implicit")
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", OUTSIDER, 1))
    alsoProvides(transport, INegotiated)
    protocol = env.factory.buildProtocol(None)
    protocol.makeConnection(transport)
    assert transport.value() == b"" and transport.producer is None
    protocol.handshakeCompleted()
    assert transport.value() == b"220 relay.test ESMTP relayd\r\n"
    assert transport.producer is protocol
    protocol.handshakeCompleted()  # again (as after STARTTLS): nothing more
    assert transport.value() == b"220 relay.test ESMTP relayd\r\n"


def test_implicit_tls_handshake_that_never_ends_times_out() -> None:
    from twisted.internet.interfaces import INegotiated
    from zope.interface import alsoProvides

    env = Env(tls="implicit", timeout=60)
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", OUTSIDER, 1))
    alsoProvides(transport, INegotiated)
    protocol = env.factory.buildProtocol(None)
    protocol.makeConnection(transport)
    env.clock.advance(60)
    assert transport.disconnecting


def test_message_rate_per_user_follows_the_user_across_sessions() -> None:
    """messages_per_user: a leaked password cannot drain the quota from many sessions."""
    env = Env(messages_per_user="2/h")
    for expected in ("250 2.1.0 Ok", "250 2.1.0 Ok",
                     "450 4.7.1 Error: too much mail from user alice"):
        s = env.tls_session()
        assert s.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n") == [AUTH_OK]
        assert s.send("MAIL FROM:<a@example.org>\r\n") == [expected]
    other = env.tls_session()
    assert other.send(f"AUTH PLAIN {plain('bob', 'hunter2')}\r\n") == [AUTH_OK]
    assert other.send("MAIL FROM:<b@example.org>\r\n") == ["250 2.1.0 Ok"]
