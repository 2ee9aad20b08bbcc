"""The three token requests relayd makes (RFC 6749 §4.4 and §6, RFC 7523)
and the reading of the answer (RFC 6749 §5.1/§5.2).

Client credentials go in the form body (``client_secret_post``), as
Microsoft's and Google's documentation shows.  Pure functions: the HTTP
request itself is the token endpoint's job.
"""

from __future__ import annotations

import json
from typing import Any

import jwt

from relayd.oauth.provider import OAuthError

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Lifetime of a service-account assertion (Google's maximum: one hour).
ASSERTION_LIFETIME = 3600


def client_credentials(client_id: str, client_secret: str, scope: str) -> dict[str, str]:
    """Microsoft 365 app-only (``SMTP.SendAsApp``, scope ``.../.default``)."""
    return {"grant_type": "client_credentials", "client_id": client_id,
            "client_secret": client_secret, "scope": scope}


def refresh_token(client_id: str, token: str, client_secret: str | None = None,
                  scope: str | None = None) -> dict[str, str]:
    """Delegated Microsoft or Google user tokens."""
    form = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": token}
    if client_secret is not None:
        form["client_secret"] = client_secret
    if scope is not None:
        form["scope"] = scope
    return form


def jwt_bearer(service_account: dict[str, Any], subject: str, scope: str, token_url: str,
               now: float) -> dict[str, str]:
    """A Google service account with domain-wide delegation: an RS256
    assertion signed with its private key, ``sub`` = the mailbox to act as.

    :param service_account: the JSON key file Google issues
        (``client_email``, ``private_key``, ``private_key_id``).
    """
    issued = int(now)
    claims = {"iss": service_account["client_email"], "sub": subject, "scope": scope,
              "aud": token_url, "iat": issued, "exp": issued + ASSERTION_LIFETIME}
    headers = {"kid": service_account["private_key_id"]} \
        if service_account.get("private_key_id") else None
    assertion = jwt.encode(claims, service_account["private_key"], algorithm="RS256",
                           headers=headers)
    return {"grant_type": JWT_BEARER, "assertion": assertion}


def token_response(status: int, body: bytes) -> tuple[str, float, str | None]:
    """``(access_token, expires_in, rotated_refresh_token)`` from a token
    endpoint's answer.

    :raises OAuthError: with the RFC 6749 error code (``invalid_grant``...),
        or ``http_NNN`` when the body is not an OAuth error; the description
        is the provider's (``AADSTS70000: ...``), never a secret of ours.
    """
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise OAuthError(f"http_{status}", "the token endpoint did not answer JSON")
    if status != 200 or "error" in data:
        error = data.get("error")
        description = data.get("error_description", "")
        if not isinstance(error, str):
            raise OAuthError(f"http_{status}", "no error code in the answer")
        text = description.splitlines()[0] if isinstance(description, str) and description else ""
        raise OAuthError(error, text)
    token = data.get("access_token")
    expires_in = data.get("expires_in", 3600)
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)  # Microsoft's v1 endpoint sends a string
    if not isinstance(token, str) or not token or not isinstance(expires_in, int) \
            or isinstance(expires_in, bool) or expires_in <= 0:
        raise OAuthError("invalid_response", "no access_token or expires_in")
    rotated = data.get("refresh_token")
    return token, float(expires_in), rotated if isinstance(rotated, str) and rotated else None
