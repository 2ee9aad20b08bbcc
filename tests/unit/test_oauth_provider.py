"""The OAuth token provider and refresh-token file (issue 19.2), on a Clock
and an in-memory token endpoint: refresh margin min(5 min, 20%), one refresh
for many callers, exponential back-off, invalid_grant kept for the status
page, a 535'd token refreshed, and the atomic 0600 token file."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd.oauth import (
    OAuthError,
    TokenProvider,
    read_refresh_token,
    refresh_margin,
    write_refresh_token,
)
from relayd.testing.oauth import FakeTokenEndpoint


def outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def setup() -> tuple[Clock, FakeTokenEndpoint, TokenProvider, list[str]]:
    clock, endpoint, results = Clock(), FakeTokenEndpoint(), []
    return clock, endpoint, TokenProvider("m365", endpoint, clock, results.append), results


def test_refresh_margin() -> None:
    assert refresh_margin(3600) == 300
    assert refresh_margin(10) == 2


def test_twenty_callers_share_one_refresh() -> None:
    clock, endpoint, provider, results = setup()
    waiting = [provider.token() for _ in range(20)]
    assert endpoint.fetches == 1 and not any(d.called for d in waiting)
    endpoint.grant("tok-1", 3600)
    tokens = {outcome(d).token for d in waiting}
    assert tokens == {"tok-1"} and results == ["success"]
    assert provider.state == "valid"


def test_token_reused_until_the_margin_then_refreshed_once() -> None:
    clock, endpoint, provider, _ = setup()
    d = provider.token()
    endpoint.grant("short", 10)
    assert outcome(d).token == "short"
    clock.advance(7.9)  # 2.1 s left > margin of 2 s: reused
    assert outcome(provider.token()).token == "short" and endpoint.fetches == 1
    clock.advance(0.2)  # inside the margin: one refresh
    a, b = provider.token(), provider.token()
    assert endpoint.fetches == 2
    endpoint.grant("next", 10)
    assert outcome(a).token == outcome(b).token == "next"


def test_endpoint_errors_back_off_exponentially() -> None:
    clock, endpoint, provider, results = setup()
    d = provider.token()
    endpoint.refuse("http_503", "Service Unavailable")
    assert outcome(d).check(OAuthError)
    # Within the back-off: fails at once, no new request.
    assert outcome(provider.token()).check(OAuthError) and endpoint.fetches == 1
    clock.advance(1.0)
    provider.token()
    endpoint.refuse("network", "connection refused")
    clock.advance(1.9)
    assert outcome(provider.token()).check(OAuthError) and endpoint.fetches == 2
    clock.advance(0.1)  # 2 s after the second failure
    d = provider.token()
    assert endpoint.fetches == 3
    endpoint.grant("back", 3600)
    assert outcome(d).token == "back" and results == ["error", "error", "success"]


def test_invalid_grant_is_reported_and_not_retried_in_a_storm() -> None:
    clock, endpoint, provider, results = setup()
    d = provider.token()
    endpoint.refuse("invalid_grant", "AADSTS70000: The provided grant is invalid")
    failure = outcome(d)
    assert failure.value.permanent and results == ["invalid_grant"]
    assert provider.state == "error: invalid_grant"
    clock.advance(299)
    for _ in range(50):
        provider.token()
    assert endpoint.fetches == 1


def test_refused_token_is_refreshed_before_the_next_use() -> None:
    clock, endpoint, provider, _ = setup()
    d = provider.token()
    endpoint.grant("bad", 3600)
    provider.invalidate(outcome(d))
    provider.token()
    assert endpoint.fetches == 2


def test_token_never_in_repr_or_state() -> None:
    clock, endpoint, provider, _ = setup()
    d = provider.token()
    endpoint.grant("s3cret-token", 3600)
    assert "s3cret-token" not in repr(outcome(d)) + provider.state


def test_refresh_token_file_atomic_and_0600(tmp_path: Path) -> None:
    path = str(tmp_path / "m365.json")
    assert read_refresh_token(path) is None
    write_refresh_token(path, "rt-1")
    write_refresh_token(path, "rt-2")
    assert read_refresh_token(path) == "rt-2"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["m365.json"]  # no temp file left
    (tmp_path / "plain").write_text("rt-by-hand\n")
    assert read_refresh_token(str(tmp_path / "plain")) == "rt-by-hand"
    (tmp_path / "broken").write_text('{"access_token": "x"}')
    with pytest.raises(ValueError, match="refresh_token"):
        read_refresh_token(str(tmp_path / "broken"))
