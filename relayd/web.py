"""The HTTP side: health, readiness, status and Prometheus metrics.

Read-only views over what the running relay already knows; nothing here
changes state, so it is safe to expose to a monitoring network.  Metrics are
rendered inline (``generate_latest``) rather than through prometheus'
``MetricsResource``, which would borrow the reactor's thread pool.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relayd.metrics import Metrics

StatusSource = Callable[[], dict[str, Any]]


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, status: StatusSource) -> None:
        super().__init__()
        self._status = status


class Liveness(_Leaf):
    """200 while the reactor answers at all."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class Readiness(_Leaf):
    """503 while draining, while a listener is down or the spool cannot be
    written: the probe a load balancer or Kubernetes uses to route mail."""

    def render_GET(self, request: Request) -> bytes:
        status = self._status()
        problems = ["draining"] if status.get("draining") else []
        problems += [f"listener {x['name']} is not listening" for x in status["listeners"]
                     if not x["listening"]]
        if not status["spool"]["writable"]:
            problems.append("spool is not writable")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if problems:
            request.setResponseCode(503)
            return ("\n".join(problems) + "\n").encode()
        return b"ready\n"


class StatusJSON(_Leaf):
    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self._status(), indent=2, sort_keys=True).encode() + b"\n"


#: Seconds between the page's own reloads.
REFRESH = 10

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em 2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}th,td{padding:.25em .9em .25em 0;text-align:left;
vertical-align:top}th{font-weight:600;border-bottom:1px solid #ccc;white-space:nowrap}
time{white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555}.ok{color:#17692c}.bad{color:#b3141b;font-weight:600}.mono{font-family:monospace}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em;display:inline-block}
.reason{max-width:48em;word-break:break-word}
"""


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(when))


def _age(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3 h 12 min``, ``2 d 4 h``: enough to read at a glance."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _when(when: float | None, now: float) -> str:
    """A past moment as ``12 s ago`` with its UTC time beside it."""
    if not when:
        return "-"
    return (f'<time datetime="{_e(_iso(when))}">{_e(_age(now - when))} ago</time><br>'
            f'<span class="meta">{_e(_iso(when))}</span>')


def _table(headers: list[str], rows: list[list[str | int]], empty: str) -> str:
    """A table; string cells are HTML already (escaped by the caller), int
    cells are counts, right-aligned."""
    if not rows:
        return f'<p class="meta">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" if isinstance(c, str) else f'<td class="n">{c:d}</td>'
                         for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _count(value: Any) -> int:
    return int(value or 0)


def render_status(s: dict[str, Any]) -> str:
    """The status page for the facts of ``/status``: one self-contained HTML
    document (inline CSS, no script, no external asset) that reloads itself
    every :data:`REFRESH` seconds.  Every value from outside is escaped."""
    now = s["time"]
    listeners: list[list[str | int]] = []
    for x in s["listeners"]:
        tls = x.get("tls", "?") + (" (required)" if x.get("require_tls") else "")
        auth = x.get("auth", "?") + (f" ({x['auth_backend']})" if x.get("auth_backend") else "")
        state = '<span class="ok">up</span>' if x["listening"] else '<span class="bad">DOWN</span>'
        listeners.append([_e(x["name"]), f'<span class="mono">{_e(x["listen"])}</span>',
                          _e(x.get("address") or "-"), state, _e(tls), _e(auth),
                          _count(x.get("connections")), _e(x["route"])])
    q = s["queue"]
    oldest = _e(_age(s["queue_oldest_age_seconds"])) if sum(q.values()) else "-"
    queue: list[list[str | int]] = [
        [_count(q.get("active")), _count(q.get("deferred")), _count(q.get("held")), oldest]]
    routes: list[list[str | int]] = []
    for name, r in s["routes"].items():
        hour = r.get("last_hour") or {}
        error = _when(r.get("last_error"), now)
        reason = r.get("last_error_reason")
        routes.append([_e(name), f'<span class="mono">{_e(r["destination"])}</span>',
                       _when(r.get("last_success"), now), error,
                       f'<span class="reason">{_e(reason)}</span>' if reason else "-",
                       _count(hour.get("sent")), _count(hour.get("deferred")),
                       _count(hour.get("bounced"))])
    deferrals: list[list[str | int]] = [
        [_e(_iso(d["time"])), f'<span class="mono">{_e(d["queue_id"])}</span>',
         _e(", ".join(f"<{r}>" for r in d["recipients"])), _e(d["route"]),
         f'<span class="reason">{_e(d["reason"])}</span>']
        for d in s.get("recent_deferrals", [])
    ]
    spool = s["spool"]
    writable = ('<span class="ok">writable</span>' if spool["writable"]
                else '<span class="bad">NOT WRITABLE</span>')
    banner = ('<p class="banner"><strong>Draining</strong>: not accepting new mail; '
              "queued mail is still delivered.</p>" if s.get("draining") else "")
    title = f"relayd {s['version']} on {s['hostname']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_STYLE}</style></head><body>
<h1>{_e(title)}</h1>
<p class="meta">up {_e(_age(s["uptime_seconds"]))} (since {_e(_iso(now - s["uptime_seconds"]))})
· spool <span class="mono">{_e(spool["path"])}</span> {writable}
· as of {_e(_iso(now))}, refreshed every {REFRESH} s</p>
{banner}
<h2>Listeners</h2>
{_table(["name", "listen", "bound to", "state", "TLS", "auth", "connections", "route"],
        listeners, "No listeners.")}
<h2>Queue</h2>
{_table(["active", "deferred", "held", "oldest"], queue, "")}
<h2>Routes</h2>
{_table(["route", "destination", "last success", "last error", "reason",
         "sent (1 h)", "deferred (1 h)", "bounced (1 h)"], routes, "No routes.")}
<h2>Recent deferrals</h2>
{_table(["time", "queue id", "recipients", "route", "reason"], deferrals,
        "No deferrals since relayd started.")}
<p class="meta"><a href="/status">JSON</a> · <a href="/metrics">metrics</a></p>
</body></html>
"""


class StatusPage(_Leaf):
    """The same facts as /status, for a person with a browser."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return render_status(self._status()).encode("utf-8")


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, before: Callable[[], None]) -> None:
        super().__init__()
        self._metrics = metrics
        self._before = before

    def render_GET(self, request: Request) -> bytes:
        self._before()
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics.exposition()


class _Root(Resource):
    def __init__(self, page: Resource) -> None:
        super().__init__()
        self._page = page

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self._page
        return super().getChild(path, request)


def make_site(status: StatusSource, metrics: Metrics, refresh: Callable[[], None]) -> Site:
    """The HTTP site: ``/``, ``/status``, ``/healthz``, ``/healthz/ready``, ``/metrics``."""
    root = _Root(StatusPage(status))
    health = Liveness(status)
    health.isLeaf = False
    health.putChild(b"ready", Readiness(status))
    health.putChild(b"", Liveness(status))
    root.putChild(b"healthz", health)
    root.putChild(b"status", StatusJSON(status))
    root.putChild(b"metrics", MetricsPage(metrics, refresh))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    # Monitoring polls every few seconds; access lines would drown the mail log.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
