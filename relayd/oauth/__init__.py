"""OAuth 2.0 access tokens for smarthost AUTH (issue 19): the token provider
(when to refresh, one refresh at a time, back-off, errors that need a human)
the refresh-token file, and the token requests and answers (:mod:`.grants`:
client credentials, refresh token, Google service-account JWT).  The token endpoint is an interface
(:class:`~relayd.oauth.provider.ITokenEndpoint`); the HTTPS client and the
config wiring are still to come."""

from relayd.oauth.provider import (
    AccessToken,
    ITokenEndpoint,
    OAuthError,
    TokenProvider,
    refresh_margin,
)
from relayd.oauth.store import read_refresh_token, write_refresh_token

__all__ = [
    "AccessToken",
    "ITokenEndpoint",
    "OAuthError",
    "TokenProvider",
    "read_refresh_token",
    "refresh_margin",
    "write_refresh_token",
]
