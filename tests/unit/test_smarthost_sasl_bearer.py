"""XOAUTH2 and OAUTHBEARER as the smarthost client speaks them (issue 19.1):
exact initial responses (Google's documented example; RFC 7628 §3.1), the
334 error challenge answered with an empty line and its JSON reason kept,
no fallback to a password mechanism, and the token never in an error text."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.config import Smarthost
from relayd.courier.smarthost.protocol import SessionError, SMTPClientProtocol
from relayd.courier.smarthost.sasl import (
    BearerRejected,
    authenticate_bearer,
    oauthbearer_response,
    xoauth2_response,
)

TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"


def connected(auth: str = "LOGIN XOAUTH2 OAUTHBEARER") -> tuple[SMTPClientProtocol, Any]:
    proto = SMTPClientProtocol(Clock(), Smarthost("smtp.gmail.com", 587))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"220 smtp.gmail.com ESMTP\r\n")
    proto.extensions = {"AUTH": auth}
    transport.clear()
    return proto, transport


def outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box
    return box[0]


def test_xoauth2_initial_response_is_googles_documented_example() -> None:
    assert xoauth2_response("someuser@example.com", TOKEN) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNr"
        b"QmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_oauthbearer_initial_response_follows_rfc7628() -> None:
    raw = base64.b64decode(oauthbearer_response("a=b,c@example.com", "smtp.gmail.com", 587, "T"))
    assert raw == b"n,a=a=3Db=2Cc@example.com,\x01host=smtp.gmail.com\x01port=587\x01auth=Bearer T\x01\x01"


def test_accepted_token() -> None:
    proto, transport = connected()
    d = Deferred.fromCoroutine(authenticate_bearer(proto, "xoauth2", "u@example.com", TOKEN))
    assert transport.value() == b"AUTH XOAUTH2 " + xoauth2_response("u@example.com", TOKEN) + b"\r\n"
    proto.dataReceived(b"235 2.7.0 Accepted\r\n")
    assert outcome(d) is None


def test_google_error_challenge_answered_with_empty_line_and_reason_kept() -> None:
    proto, transport = connected()
    d = Deferred.fromCoroutine(authenticate_bearer(proto, "OAUTHBEARER", "u@example.com", TOKEN))
    reason = {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}
    challenge = base64.b64encode(json.dumps(reason).encode())
    transport.clear()
    proto.dataReceived(b"334 " + challenge + b"\r\n")
    assert transport.value() == b"\r\n"
    proto.dataReceived(b"535-5.7.8 Username and Password not accepted. Learn more at\r\n"
                       b"535 5.7.8  https://support.google.com/mail/?p=BadCredentials\r\n")
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(BearerRejected)
    assert failure.value.reason == reason
    text = str(failure.value)
    assert "535 5.7.8" in text and '"status": "401"' in text and TOKEN not in text


def test_microsoft_535_without_challenge() -> None:
    proto, _ = connected("LOGIN XOAUTH2")
    d = Deferred.fromCoroutine(authenticate_bearer(proto, "XOAUTH2", "u@contoso.example", TOKEN))
    proto.dataReceived(b"535 5.7.3 Authentication unsuccessful [SN4PR0501CA0050.namprd05]\r\n")
    failure = outcome(d)
    assert failure.check(BearerRejected) and failure.value.reason is None
    assert "535 5.7.3 Authentication unsuccessful" in str(failure.value)


def test_never_falls_back_to_a_password_mechanism() -> None:
    proto, transport = connected("PLAIN LOGIN")
    failure = outcome(Deferred.fromCoroutine(
        authenticate_bearer(proto, "XOAUTH2", "u@example.com", TOKEN)))
    assert failure.check(SessionError) and "never falls back" in str(failure.value)
    assert transport.value() == b""
