"""The status page's HTML from a status dict: escaping, self-containment, the
banners and the empty cases (tests/system/test_status_page.py renders it in Chromium)."""

from __future__ import annotations

import html
import re
from typing import Any

from twisted.web.test.requesthelper import DummyRequest

from relayd.web import REFRESH, StatusPage, render_status

NOW = 1_700_000_000.0
EVIL = '<script>alert("x")</script>&'


def status(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": "1.2.3", "draining": False, "hostname": "relay.test", "time": NOW,
        "uptime_seconds": 3 * 3600 + 120,
        "listeners": [{
            "name": "submission", "listen": "tcp:587", "address": "0.0.0.0:587",
            "listening": True, "route": "default", "tls": "starttls", "require_tls": True,
            "auth": "required", "auth_backend": "apps", "connections": 7,
        }],
        "spool": {"path": "/var/spool/relayd", "writable": True},
        "queue": {"active": 1, "deferred": 2, "held": 0},
        "queue_oldest_age_seconds": 90.0,
        "routes": {"default": {
            "destination": "smtp.example.org:587", "last_success": NOW - 5,
            "last_error": NOW - 600, "last_error_reason": "451 4.3.0 try later",
            "last_hour": {"sent": 12, "deferred": 3, "bounced": 1},
        }},
        "recent_deferrals": [{
            "time": NOW - 600, "queue_id": "0123456789ABCDEF0123",
            "recipients": ["b@example.net"], "route": "default", "relay": "",
            "reason": "451 4.3.0 try later",
        }],
    }
    base.update(overrides)
    return base


def text(page: str) -> str:
    """Roughly what a reader sees (tests/system/test_status_page.py asks a real browser)."""
    body = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    body = re.sub(r"</?(strong|span|time)\b[^>]*>", "", body)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_page_shows_the_facts() -> None:
    page = render_status(status())
    t = text(page)
    assert "relayd 1.2.3 on relay.test" in t
    assert "up 3 h 2 min" in t and "(since 2023-11-14 19:11:20Z)" in t
    assert "submission tcp:587 0.0.0.0:587 up starttls (required) required (apps) 7 default" in t
    assert "1 2 0 1 min" in t  # active deferred held oldest
    assert ("default smtp.example.org:587 5 s ago 2023-11-14 22:13:15Z 10 min ago "
            "2023-11-14 22:03:20Z 451 4.3.0 try later 12 3 1") in t
    assert "2023-11-14 22:03:20Z 0123456789ABCDEF0123 <b@example.net> default 451 4.3.0" in t
    assert "Draining" not in t and "NOT WRITABLE" not in t


def test_page_is_self_contained_and_refreshes() -> None:
    """Inline CSS only: no script, no stylesheet or image to fetch; a meta refresh."""
    page = render_status(status())
    assert f'<meta http-equiv="refresh" content="{REFRESH}">' in page
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert "src=" not in page and "url(" not in page and "@import" not in page
    assert re.findall(r'href="([^"]*)"', page) == ["/status", "/metrics"]


def test_every_value_is_escaped() -> None:
    listener = {**status()["listeners"][0], "name": EVIL, "listen": EVIL, "address": EVIL,
                "route": EVIL, "auth_backend": EVIL}
    page = render_status(status(
        hostname=EVIL, version=EVIL, listeners=[listener],
        spool={"path": EVIL, "writable": True},
        routes={EVIL: {"destination": EVIL, "last_error": NOW, "last_error_reason": EVIL,
                       "last_hour": {"sent": 0, "deferred": 0, "bounced": 0}}},
        recent_deferrals=[{"time": NOW, "queue_id": EVIL, "recipients": [EVIL], "route": EVIL,
                           "relay": EVIL, "reason": EVIL}],
    ))
    assert "<script" not in page and 'alert("x")' not in page
    assert page.count("&lt;script&gt;") >= 10


def test_draining_unwritable_down_and_empty() -> None:
    listener = {**status()["listeners"][0], "listening": False, "address": None,
                "tls": "none", "require_tls": False, "auth": "none", "auth_backend": None,
                "connections": 0}
    page = render_status(status(
        draining=True, spool={"path": "/s", "writable": False}, listeners=[listener],
        queue={"active": 0, "deferred": 0, "held": 0}, queue_oldest_age_seconds=0.0,
        routes={"default": {"destination": "maildir:/out",
                            "last_hour": {"sent": 0, "deferred": 0, "bounced": 0}}},
        recent_deferrals=[],
    ))
    t = text(page)
    assert "Draining: not accepting new mail" in t and "NOT WRITABLE" in t
    assert "submission tcp:587 - DOWN none none 0 default" in t
    assert "0 0 0 -" in t
    assert "default maildir:/out - - - 0 0 0" in t
    assert "No deferrals since relayd started." in t


def test_resource_serves_html_uncached() -> None:
    request = DummyRequest([b""])
    body = StatusPage(lambda: status()).render_GET(request)  # type: ignore[arg-type]
    assert body.startswith(b"<!doctype html>")
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-store"]
