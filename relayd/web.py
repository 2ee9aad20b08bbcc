"""The HTTP side: health, readiness, status and Prometheus metrics.

Read-only views over what the running relay already knows; nothing here
changes state, so it is safe to expose to a monitoring network.  Metrics are
rendered inline (``generate_latest``) rather than through prometheus'
``MetricsResource``, which would borrow the reactor's thread pool.
"""

from __future__ import annotations

import html
import json
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


class StatusPage(_Leaf):
    """The same facts as /status, for a person with a browser."""

    def render_GET(self, request: Request) -> bytes:
        s = self._status()
        e = html.escape
        rows = "".join(
            f"<tr><td>{e(x['name'])}</td><td>{e(x['listen'])}</td>"
            f"<td>{e(str(x.get('address') or '-'))}</td>"
            f"<td>{'up' if x['listening'] else 'DOWN'}</td><td>{e(x['route'])}</td></tr>"
            for x in s["listeners"]
        )
        queue = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in s["queue"].items())
        routes = "".join(
            f"<tr><td>{e(name)}</td><td>{e(r['destination'])}</td>"
            f"<td>{e(str(r.get('last_success') or '-'))}</td>"
            f"<td>{e(str(r.get('last_error_reason') or '-'))}</td></tr>"
            for name, r in s["routes"].items()
        )
        body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>relayd on {e(s['hostname'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}</style>
</head><body>
<h1>relayd {e(s['version'])} on {e(s['hostname'])}</h1>
<p>up {s['uptime_seconds']:.0f} s · spool {e(s['spool']['path'])}
({'writable' if s['spool']['writable'] else 'NOT WRITABLE'})</p>
<h2>Listeners</h2><table><tr><th>name</th><th>listen</th><th>bound</th><th>state</th>
<th>route</th></tr>{rows}</table>
<h2>Queue</h2><table>{queue}<tr><td>oldest</td><td>{s['queue_oldest_age_seconds']:.0f} s</td>
</tr></table>
<h2>Routes</h2><table><tr><th>name</th><th>destination</th><th>last success</th>
<th>last error</th></tr>{routes}</table>
<p><a href="/status">JSON</a> · <a href="/metrics">metrics</a></p>
</body></html>
"""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return body.encode("utf-8")


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
