"""Token requests and answers (issue 19.2): the three grants' form bodies
(client_secret_post), a Google service-account assertion checked with a real
JWT library against the key's public half, and Microsoft's and Google's real
error bodies turned into OAuthError codes."""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relayd.oauth import OAuthError
from relayd.oauth.grants import (
    JWT_BEARER,
    client_credentials,
    jwt_bearer,
    refresh_token,
    token_response,
)

GOOGLE = "https://oauth2.googleapis.com/token"


def test_client_credentials_and_refresh_forms() -> None:
    assert client_credentials("app", "sec", "https://outlook.office365.com/.default") == {
        "grant_type": "client_credentials", "client_id": "app", "client_secret": "sec",
        "scope": "https://outlook.office365.com/.default"}
    assert refresh_token("app", "rt") == {
        "grant_type": "refresh_token", "client_id": "app", "refresh_token": "rt"}
    assert refresh_token("app", "rt", "sec", "https://mail.google.com/")["client_secret"] == "sec"


def test_jwt_bearer_assertion_verifies_with_the_public_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    account = {"client_email": "relay@proj.iam.gserviceaccount.com", "private_key": pem,
               "private_key_id": "k1"}
    form = jwt_bearer(account, "printer@example.org", "https://mail.google.com/", GOOGLE,
                      now=1_700_000_000)
    assert form["grant_type"] == JWT_BEARER
    claims = jwt.decode(form["assertion"], key.public_key(), algorithms=["RS256"],
                        audience=GOOGLE, options={"verify_exp": False})
    assert claims == {"iss": "relay@proj.iam.gserviceaccount.com", "sub": "printer@example.org",
                      "scope": "https://mail.google.com/", "aud": GOOGLE,
                      "iat": 1_700_000_000, "exp": 1_700_003_600}
    assert jwt.get_unverified_header(form["assertion"])["kid"] == "k1"


def test_success_with_rotated_refresh_token() -> None:
    body = json.dumps({"token_type": "Bearer", "expires_in": 3599, "access_token": "at",
                       "refresh_token": "rt-2"}).encode()
    assert token_response(200, body) == ("at", 3599.0, "rt-2")
    assert token_response(200, b'{"access_token": "at", "expires_in": "3600"}') == (
        "at", 3600.0, None)


@pytest.mark.parametrize("status, body, error", [
    (400, {"error": "invalid_grant", "error_description":
           "AADSTS70000: The provided value for the 'code' parameter is not valid.\r\n"
           "Trace ID: 0000", "error_codes": [70000]}, "invalid_grant"),
    (401, {"error": "invalid_client", "error_description":
           "AADSTS7000215: Invalid client secret provided."}, "invalid_client"),
    (400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
     "invalid_grant"),
    (503, "<html>Service Unavailable</html>", "http_503"),
])
def test_provider_errors(status: int, body: object, error: str) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    with pytest.raises(OAuthError) as e:
        token_response(status, raw)
    assert e.value.error == error
    assert "Trace ID" not in str(e.value)
    assert e.value.permanent == (error in ("invalid_grant", "invalid_client"))
