"""SMTP AUTH (RFC 4954) as a client: the mechanisms relayd speaks to a
smarthost, in one place so a new one (OAuth) is added beside the others and
not inside the session code.  Called only over TLS (or with ``tls = "none"``,
which check-config warns about); a refusal is a
:class:`~relayd.courier.smarthost.protocol.SessionError` (defer, never
bounce: a wrong password is our fault, not the message's)."""

from __future__ import annotations

import base64

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
