"""The status page at ``GET /``, rendered by a real headless Chromium.

A relayd process with three listeners, each routed to its own smtp-sink: one
that accepts, one that rejects every RCPT with 550 (bounces) and one that
answers 450 (deferrals).  Once /status says all three have happened, Chromium
loads ``/``; the test reads the rendered DOM and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import relayd
from tests.htpasswd import write_users
from tests.postfix import Sink
from tests.relay import Relay, wait_for

CHROMIUM = "/usr/bin/chromium"


def chromium_or_skip() -> str:
    """Chromium is installed by tests/run; in CI a missing one is a failure."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing (tests/run installs the Debian chromium package)")
    pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")


def chromium(binary: str, profile: Path, *args: str, timeout: float = 90) -> str:
    """Run headless Chromium once; its own process group, killed by id on timeout."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish in {timeout} s: {' '.join(cmd)}") from None
    finally:
        # Helpers it started (zygote, renderer) must not outlive the test.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode("utf-8")


class Rendered(HTMLParser):
    """The page as a reader sees it: the visible text, and each table's rows of
    cell texts under the heading before it."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.refresh: str | None = None
        self._skip = 0
        self._heading: str | None = None
        self._in_h2 = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("style", "script", "title"):
            self._skip += 1
        elif tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            self.refresh = a.get("content")
        elif tag == "h2":
            self._in_h2, self._heading = True, ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title"):
            self._skip -= 1
        elif tag == "h2":
            self._in_h2 = False
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables.setdefault(self._heading or "", []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._in_h2:
            self._heading = (self._heading or "") + data
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, heading: str, key: int = 0) -> dict[str, dict[str, str]]:
        """A table as {cell of column ``key``: {column header: cell}}."""
        header, *body = self.tables[heading]
        return {row[key]: dict(zip(header, row)) for row in body}

    @property
    def visible(self) -> str:
        return " ".join("".join(self.text).split())


def get_status(relay: Relay) -> dict[str, Any]:
    url = f"http://127.0.0.1:{relay.ports['http']}/status"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.fixture
def sinks(tmp_path: Path):
    made = {
        "upstream": Sink(tmp_path / "ok"),
        "rejecting": Sink(tmp_path / "bounce", "-f", "RCPT", "-B", "550 5.1.1 No such user here"),
        "busy": Sink(tmp_path / "busy", "-r", "RCPT", "-b", "450 4.2.0 Mailbox busy, try later"),
    }
    try:
        for sink in made.values():
            sink.start()
        yield made
    finally:
        for sink in made.values():
            sink.stop()


def status_relay(relay_factory, tmp_path: Path, sinks: dict[str, Sink]) -> Relay:
    d = tmp_path / "relay"
    d.mkdir()
    users = write_users(tmp_path / "users.htpasswd", {"app1": "secret"}, scheme="sha")
    routes = "".join(f'\n[route.{name}]\nsmarthost = ["127.0.0.1:{sink.port}"]\ntls = "none"\n'
                     for name, sink in sinks.items())
    config = f"""
[server]
hostname = "relay.test"
spool = "{d / 'spool'}"

[http]
listen = "tcp:0:interface=127.0.0.1"

[queue]
retry = ["1h"]

[[listener]]
name = "apps"
listen = "tcp:0:interface=127.0.0.1"
auth = "optional"
auth_backend = "apps"
plaintext_auth = true
route = "upstream"

[[listener]]
name = "strict"
listen = "tcp:0:interface=127.0.0.1"
route = "rejecting"

[[listener]]
name = "slow"
listen = "tcp:0:interface=127.0.0.1"
route = "busy"

[auth.apps]
type = "htpasswd"
file = "{users}"
{routes}"""
    return relay_factory("relay", config=config)  # type: ignore[no-any-return]


def send(relay: Relay, listener: str, rcpt: str, subject: str) -> None:
    with relay.smtp(listener) as s:
        s.sendmail("app@example.org", [rcpt], f"Subject: {subject}\r\n\r\nhello\r\n")


def test_status_page_in_chromium(relay_factory, tmp_path: Path, sinks) -> None:
    """The page shows version, listeners (TLS, auth, connections now), the queue, each
    route's last hour and the recent deferrals with their queue ids and reasons."""
    browser = chromium_or_skip()
    relay = status_relay(relay_factory, tmp_path, sinks)
    send(relay, "apps", "user@example.net", "delivered")
    send(relay, "strict", "ghost@example.net", "bounced")
    send(relay, "slow", "later1@example.net", "deferred one")
    send(relay, "slow", "later2@example.net", "deferred two")

    def settled() -> dict[str, Any] | None:
        s = get_status(relay)
        hour = {name: r["last_hour"] for name, r in s["routes"].items()}
        done = (hour["upstream"]["sent"] >= 1 and hour["rejecting"]["bounced"] >= 1
                and hour["busy"]["deferred"] >= 2 and s["queue"]["deferred"] >= 2)
        return s if done else None

    status = wait_for(settled, timeout=60, what="sent, bounced and deferred in /status")
    by_name = {x["name"]: x for x in status["listeners"]}
    assert {k: by_name["apps"][k] for k in ("tls", "auth", "auth_backend", "connections")} == {
        "tls": "none", "auth": "optional", "auth_backend": "apps", "connections": 0}
    assert by_name["strict"]["auth_backend"] is None
    deferred_ids = {d["queue_id"] for d in status["recent_deferrals"] if d["route"] == "busy"}
    assert len(deferred_ids) == 2
    assert {r for d in status["recent_deferrals"] for r in d["recipients"]} >= {
        "later1@example.net", "later2@example.net"}

    # One session left open on "strict": "connections now" must show it.
    idle = relay.smtp("strict")
    try:
        idle.ehlo()
        wait_for(lambda: {x["name"]: x["connections"]
                          for x in get_status(relay)["listeners"]}["strict"] == 1,
                 what="the open session in /status")
        url = f"http://127.0.0.1:{relay.ports['http']}/"
        dom = chromium(browser, tmp_path / "profile", "--dump-dom", url)
        screenshot = tmp_path / "status-page.png"
        chromium(browser, tmp_path / "profile", f"--screenshot={screenshot}",
                 "--window-size=1280,1600", "--hide-scrollbars", url)
    finally:
        idle.close()

    page = Rendered(dom)
    text = page.visible
    assert page.refresh == "10"
    assert f"relayd {relayd.__version__} on relay.test" in text
    assert "writable" in text and "NOT WRITABLE" not in text and "Draining" not in text
    listeners = page.rows("Listeners")
    assert set(listeners) == {"apps", "strict", "slow"}
    for name, row in listeners.items():
        assert row["state"] == "up" and row["TLS"] == "none"
        assert row["bound to"] == f"127.0.0.1:{relay.ports[name]}"
    assert listeners["apps"]["auth"] == "optional (apps)"
    assert listeners["strict"]["auth"] == "none"
    assert listeners["strict"]["connections"] == "1"
    assert listeners["slow"]["route"] == "busy"

    [queue] = page.rows("Queue").values()
    assert int(queue["deferred"]) >= 2
    assert queue["oldest"] != "-"

    routes = page.rows("Routes")
    assert routes["upstream"]["destination"] == f"127.0.0.1:{sinks['upstream'].port}"
    assert int(routes["upstream"]["sent (1 h)"]) >= 1
    assert routes["upstream"]["last success"].endswith("Z")
    assert "ago" in routes["upstream"]["last success"]
    assert int(routes["rejecting"]["bounced (1 h)"]) >= 1
    assert routes["rejecting"]["reason"].startswith("550 5.1.1 No such user here")
    assert int(routes["busy"]["deferred (1 h)"]) >= 2
    assert routes["busy"]["reason"].startswith("450 4.2.0 Mailbox busy")
    assert routes["busy"]["last success"] == "-"

    deferrals = page.rows("Recent deferrals", key=1)
    assert deferred_ids <= set(deferrals)
    for qid in deferred_ids:
        assert deferrals[qid]["route"] == "busy"
        assert deferrals[qid]["reason"].startswith("450 4.2.0 Mailbox busy")
        assert deferrals[qid]["recipients"] in ("<later1@example.net>", "<later2@example.net>")

    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    print(f"\nstatus page screenshot: {screenshot}")
    keep = os.environ.get("RELAYD_TEST_OUTPUT")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(screenshot, os.path.join(keep, "status-page.png"))
