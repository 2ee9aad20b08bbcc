"""SMTP AUTH (RFC 4954) as a client: the mechanisms relayd speaks to a
smarthost, in one place so a new one (OAuth) is added beside the others and
not inside the session code.  Called only over TLS (or with ``tls = "none"``,
which check-config warns about); a refusal is a
:class:`~relayd.courier.smarthost.protocol.SessionError` (defer, never
bounce: a wrong password is our fault, not the message's)."""

from __future__ import annotations

import base64
import binascii
import json

from relayd.config import RouteConfig
from relayd.courier.smarthost.protocol import (
    COMMAND_TIMEOUT,
    SessionError,
    SMTPClientProtocol,
)

_CRLF = b"\r\n"
_PHASE = "sending AUTH"


async def authenticate(proto: SMTPClientProtocol, route: RouteConfig) -> None:
    """Log in as ``route.username`` with PLAIN (preferred) or LOGIN."""
    assert route.username is not None and route.password is not None
    mechanisms = set(proto.extensions.get("AUTH", "").upper().split())
    if not mechanisms and "AUTH" not in proto.extensions:
        raise SessionError(
            f"SASL authentication is required, but AUTH was not offered by host {proto.name}"
        )
    user = route.username.encode("utf-8")
    password = route.password.encode("utf-8")
    if "PLAIN" in mechanisms:
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        reply = await proto.command(b"AUTH PLAIN " + token + _CRLF, COMMAND_TIMEOUT, _PHASE)
    elif "LOGIN" in mechanisms:
        reply = await proto.command(b"AUTH LOGIN\r\n", COMMAND_TIMEOUT, _PHASE)
        if reply.code == 334:
            reply = await proto.command(base64.b64encode(user) + _CRLF, COMMAND_TIMEOUT, _PHASE)
        if reply.code == 334:
            reply = await proto.command(
                base64.b64encode(password) + _CRLF, COMMAND_TIMEOUT, _PHASE
            )
    else:
        offered = " ".join(sorted(mechanisms)) or "none"
        raise SessionError(
            f"no supported SASL mechanism offered by host {proto.name} "
            f"(offered: {offered}; relayd speaks PLAIN and LOGIN)"
        )
    if reply.code != 235:
        raise SessionError(f"host {proto.name} said: {reply} (in reply to AUTH command)")


# -- OAuth 2.0 bearer tokens (issue 19: Microsoft 365, Gmail) -----------------
#
# The mechanisms only; getting and refreshing the token is the token
# provider's job (not yet wired to the config: see issue 19).


class BearerRejected(SessionError):
    """The server refused the bearer token (535, or a 334 error challenge).

    ``reason`` is the provider's JSON error (``{"status": "401", ...}`` from
    Google, ``{"status":"invalid_token"}`` style from RFC 7628 servers), or
    None; the caller marks the token bad and refreshes before the next try.
    The token itself is never part of the text.
    """

    def __init__(self, text: str, reason: dict[str, object] | None) -> None:
        super().__init__(text)
        self.reason = reason


def xoauth2_response(user: str, token: str) -> bytes:
    """The XOAUTH2 initial response (Google's and Microsoft's documented
    format): ``user=U^Aauth=Bearer T^A^A``, base64."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)


def oauthbearer_response(user: str, host: str, port: int, token: str) -> bytes:
    """The OAUTHBEARER initial response (RFC 7628 §3.1): a GS2 header with
    the authorization identity (``,`` and ``=`` escaped as RFC 5801 asks),
    then host, port and the bearer token, ``^A``-separated, base64."""
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    raw = f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode())


def _error_reason(challenge: str) -> dict[str, object] | None:
    try:
        value = json.loads(base64.b64decode(challenge, validate=True))
    except (ValueError, binascii.Error):
        return None
    return value if isinstance(value, dict) else None


async def authenticate_bearer(
    proto: SMTPClientProtocol, mechanism: str, user: str, token: str
) -> None:
    """AUTH XOAUTH2 or OAUTHBEARER with ``token``; never falls back to any
    other mechanism (a password must not go where OAuth was configured).

    A ``334`` error challenge (base64 JSON) is answered with an empty line,
    as RFC 7628 §3.2.3 and Google's XOAUTH2 document ask, and the server then
    ends the exchange with its failure reply: :class:`BearerRejected`
    carries the decoded JSON reason.
    """
    mechanism = mechanism.upper()
    offered = set(proto.extensions.get("AUTH", "").upper().split())
    if mechanism not in offered:
        names = " ".join(sorted(offered)) or "none"
        raise SessionError(
            f"{mechanism} is configured, but host {proto.name} offers AUTH {names}"
            " (relayd never falls back to a password)"
        )
    if mechanism == "XOAUTH2":
        initial = xoauth2_response(user, token)
    else:
        initial = oauthbearer_response(user, proto.smarthost.host, proto.smarthost.port, token)
    reply = await proto.command(b"AUTH " + mechanism.encode() + b" " + initial + _CRLF,
                                COMMAND_TIMEOUT, _PHASE)
    reason: dict[str, object] | None = None
    if reply.code == 334:
        reason = _error_reason(reply.lines[0] if reply.lines else "")
        reply = await proto.command(_CRLF, COMMAND_TIMEOUT, _PHASE)
    if reply.code != 235:
        why = f" ({json.dumps(reason, sort_keys=True)})" if reason is not None else ""
        raise BearerRejected(
            f"host {proto.name} said: {reply} (in reply to AUTH {mechanism} command){why}",
            reason,
        )
