"""relayd as a real process: smtplib and swaks on loopback, files on disk."""

from __future__ import annotations

import email
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import need
from tests.relay import ROOT, Relay, config_text, wait_for


def message(subject: str = "hello", body: str = "Hello from the test.\n", **headers: str) -> bytes:
    m = EmailMessage()
    m["From"] = "app@example.org"
    m["To"] = "user@example.net"
    m["Subject"] = subject
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return bytes(m)


def raw_session(port: int, data: bytes, expect_close: bool = False) -> bytes:
    """Send bytes, read every reply until the server closes (or QUIT's 221)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n221 " in out or out.startswith(b"221 "):
                break
    return out


def http_get(relay: Relay, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{relay.ports['http']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def parse_delivered(path: Path) -> email.message.Message:
    return email.message_from_bytes(path.read_bytes())


# -- the basic path -----------------------------------------------------------


def test_smtplib_message_lands_in_outbox_once(relay: Relay) -> None:
    """A message sent with smtplib is queued, delivered once, and the spool is emptied."""
    with relay.smtp() as s:
        code, banner = s.ehlo()
        assert code == 250
        for ext in (b"PIPELINING", b"SIZE", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
            assert ext in banner
        refused = s.sendmail("app@example.org", ["user@example.net"], message("first"))
        assert refused == {}
    [path] = relay.wait_delivered(1)
    m = parse_delivered(path)
    assert m["Subject"] == "first"
    assert m["Return-Path"] == "<app@example.org>"
    assert m["X-Original-To"] == "<user@example.net>"
    assert "by relay.test (relayd) with ESMTP id" in m["Received"]
    assert b"\r\n" not in path.read_bytes(), "maildir files use LF line ends"
    wait_for(lambda: relay.queued() == [], what="spool to empty")
    log = relay.log()
    qid = path.name.split(".")[1][1:]
    assert f"{qid}: from=<app@example.org>" in log
    assert f"{qid}: to=<user@example.net> route=outbox" in log and "status=sent" in log


def test_message_id_and_date_added_only_when_missing(relay: Relay) -> None:
    """Printers omit Message-ID and Date: relayd adds them; present ones are kept."""
    bare = b"Subject: from a printer\r\n\r\nscan attached\r\n"
    kept = message("has ids", Message_ID="<abc@example.org>", Date="Mon, 02 Jan 2006 15:04:05 +0000")
    with relay.smtp() as s:
        s.sendmail("printer@example.org", ["a@example.net"], bare)
        s.sendmail("app@example.org", ["b@example.net"], kept)
    paths = relay.wait_delivered(2)
    by_subject = {parse_delivered(p)["Subject"]: parse_delivered(p) for p in paths}
    printer = by_subject["from a printer"]
    assert printer["Message-ID"].endswith("@relay.test>")
    assert printer["Date"]
    assert printer.get_payload().strip() == "scan attached"
    ids = by_subject["has ids"]
    assert ids.get_all("Message-ID") == ["<abc@example.org>"]
    assert ids.get_all("Date") == ["Mon, 02 Jan 2006 15:04:05 +0000"]


def test_swaks_with_pipelining(relay: Relay) -> None:
    """swaks, pipelined, gets 250 queued and the message arrives."""
    swaks = need("swaks")
    out = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(relay.smtp_port), "--from", "a@example.org",
         "--to", "b@example.net,c@example.net", "--pipeline", "--header", "Subject: via swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    [path] = relay.wait_delivered(1)
    m = parse_delivered(path)
    assert m["Subject"] == "via swaks"
    assert m.get_all("X-Original-To") == ["<b@example.net>", "<c@example.net>"]


def test_smtputf8_address_kept_exactly(relay: Relay) -> None:
    """An SMTPUTF8 transaction keeps UTF-8 addresses byte for byte."""
    with relay.smtp() as s:
        s.ehlo()
        s.sendmail("dépôt@exemple.fr", ["用户@例子.中国"], message("utf8"),
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        code, _ = s.mail("dépôt@exemple.fr")
        assert code == 553
    [path] = relay.wait_delivered(1)
    data = path.read_bytes()
    assert "Return-Path: <dépôt@exemple.fr>".encode() in data
    assert "X-Original-To: <用户@例子.中国>".encode() in data
    assert b"with UTF8SMTP id" in data


def test_size_limits(relay_factory) -> None:
    """Declared SIZE over the limit gets 552 at MAIL; actual size over it, 552 after DATA."""
    relay = relay_factory(listener_extra='max_message_size = "10KB"')
    with relay.smtp() as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "10240"
        code, text = s.mail("a@example.org", ["SIZE=20000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        s.rset()
        # No SIZE declared: the data itself is counted.
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("b@example.net")[0] == 250
        code, text = s.data(b"x" * 20000)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert s.noop()[0] == 250
        s.sendmail("a@example.org", ["b@example.net"], message("small"))
    relay.wait_delivered(1)


def test_max_recipients(relay_factory) -> None:
    """RCPTs past max_recipients get 452 4.5.3; the accepted ones are delivered."""
    relay = relay_factory(listener_extra="max_recipients = 2")
    with relay.smtp() as s:
        s.ehlo()
        s.mail("a@example.org")
        assert s.rcpt("r1@example.net")[0] == 250
        assert s.rcpt("r2@example.net")[0] == 250
        code, text = s.rcpt("r3@example.net")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert s.data(message("two"))[0] == 250
    [path] = relay.wait_delivered(1)
    assert parse_delivered(path).get_all("X-Original-To") == ["<r1@example.net>", "<r2@example.net>"]


# -- relay policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    ["user@example.net", "user%elsewhere.example@example.net", '"user@elsewhere"@example.net',
     "@hop.example:user@example.net", "user@[192.0.2.1]", "postmaster", "user@example.net."],
)
def test_outsider_cannot_relay_any_address_form(relay_factory, recipient: str) -> None:
    """A client outside mynetworks, unauthenticated, gets 550 5.7.1 for every form."""
    relay = relay_factory(listener_extra='mynetworks = ["192.0.2.0/24"]')
    with relay.smtp() as s:
        s.ehlo()
        assert s.mail("<>")[0] == 250  # the null sender is accepted
        code, text = s.docmd(f"RCPT TO:<{recipient}>")
        assert code == 550 and text.startswith(b"5.7.1"), (code, text)
        assert b"Relay access denied" in text
        assert s.docmd("DATA")[0] == 554
    assert relay.queued() == [] and relay.delivered() == []
    assert re.search(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 550 5\.7\.1 <(\S+)>: "
                     r"Relay access denied; from=<> to=<\1> proto=ESMTP helo=<", relay.log())


def test_allowed_lists_narrow_but_never_open(relay_factory) -> None:
    """allowed_senders/recipients restrict trusted clients and open nothing to others."""
    narrow = relay_factory(
        "narrow",
        listener_extra='allowed_senders = ["*@example.org"]\nallowed_recipients = ["*@example.net"]',
    )
    with narrow.smtp() as s:
        s.ehlo()
        code, text = s.mail("app@other.example")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert s.mail("app@EXAMPLE.org")[0] == 250
        assert s.rcpt("someone@elsewhere.example")[0] == 550
        assert s.rcpt("user%elsewhere.example@example.net")[0] == 550
        assert s.rcpt("someone@example.net")[0] == 250
    outsider = relay_factory(
        "outsider",
        listener_extra='mynetworks = ["192.0.2.0/24"]\nallowed_recipients = ["*@example.net"]',
    )
    with outsider.smtp() as s:
        s.ehlo()
        s.mail("app@example.org")
        code, text = s.rcpt("someone@example.net")
        assert code == 550 and b"Relay access denied" in text


def test_mail_loop_is_refused(relay: Relay) -> None:
    """More than max_hops (50) Received headers: 554 5.4.6, nothing queued."""
    hops = b"".join(b"Received: from hop%d.example by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                    for i in range(51))
    with relay.smtp() as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@example.org", ["b@example.net"], hops + b"Subject: loop\r\n\r\nx\r\n")
        assert e.value.smtp_code == 554 and e.value.smtp_error.startswith(b"5.4.6")
        ok = hops[: hops.index(b"Received: from hop50")]
        s.sendmail("a@example.org", ["b@example.net"], ok + b"Subject: fifty\r\n\r\nx\r\n")
    [path] = relay.wait_delivered(1)
    assert parse_delivered(path)["Subject"] == "fifty"


# -- protocol hardening over a real socket ---------------------------------------


def test_smuggling_attempt_is_one_message(relay: Relay) -> None:
    """<LF>.<LF> does not end DATA: the 'smuggled' transaction is message content."""
    data = (
        b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        b"Subject: outer\r\n\r\nhello\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<victim@example.net>\n"
        b"DATA\nSubject: smuggled\n\nboo\n.\r\n.\r\nQUIT\r\n"
    )
    replies = raw_session(relay.smtp_port, data)
    assert replies.count(b"250 2.0.0 Ok: queued as") == 1, replies
    [path] = relay.wait_delivered(1)
    content = path.read_bytes()
    assert b"MAIL FROM:<evil@example.org>" in content
    assert parse_delivered(path)["Subject"] == "outer"


def test_long_command_line_and_session_continues(relay: Relay) -> None:
    """A 600-octet command gets 500 5.5.2 and the session goes on."""
    data = b"EHLO c.test\r\nNOOP " + b"x" * 600 + b"\r\nNOOP\r\nQUIT\r\n"
    replies = raw_session(relay.smtp_port, data)
    assert b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n221" in replies


def test_long_data_lines_are_split_at_998(relay: Relay) -> None:
    """A 5000-octet body line is accepted and stored as lines of at most 998."""
    body = b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\nend\r\n"
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], body)
    [path] = relay.wait_delivered(1)
    lines = path.read_bytes().split(b"\n")
    assert max(len(line) for line in lines) <= 998
    assert b"".join(line for line in lines if set(line) == {ord("y")}) == b"y" * 5000


def test_bare_newline_reject_mode(relay_factory) -> None:
    """bare_newline = "reject": 554 5.6.0 after the dot; a clean message still passes."""
    relay = relay_factory(listener_extra='bare_newline = "reject"')
    data = (b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbare\nline\r\n.\r\nQUIT\r\n")
    assert b"554 5.6.0" in raw_session(relay.smtp_port, data)
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: clean\r\n\r\nok\r\n")
    [path] = relay.wait_delivered(1)
    assert parse_delivered(path)["Subject"] == "clean"


# -- HTTP -------------------------------------------------------------------------


def test_http_health_status_and_metrics(relay: Relay) -> None:
    """/healthz, /healthz/ready, /status, / and /metrics answer with what they promise."""
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], message())
    relay.wait_delivered(1)
    assert http_get(relay, "/healthz") == (200, b"ok\n")
    assert http_get(relay, "/healthz/ready")[0] == 200
    code, body = http_get(relay, "/status")
    status = json.loads(body)
    assert code == 200 and status["hostname"] == "relay.test"
    [listener] = status["listeners"]
    assert listener["name"] == "mta" and listener["listening"] is True
    assert listener["address"] == f"127.0.0.1:{relay.smtp_port}"
    assert set(status["queue"]) == {"active", "deferred", "held"}
    assert status["routes"]["outbox"]["last_success"] > 0
    code, page = http_get(relay, "/")
    assert code == 200 and b"<h1>relayd" in page
    code, metrics = http_get(relay, "/metrics")
    text = metrics.decode()
    assert 'relayd_messages_received_total{listener="mta"} 1.0' in text
    assert 'relayd_smtp_connections_total{listener="mta"}' in text
    assert 'relayd_deliveries_total{result="sent",route="outbox"} 1.0' in text
    for name in ("relayd_smtp_connections_active", "relayd_queue_messages",
                 "relayd_queue_oldest_age_seconds", "relayd_delivery_seconds_bucket"):
        assert name in text


def test_ready_is_503_when_spool_unwritable(relay: Relay) -> None:
    """Readiness fails while the spool cannot be written, and recovers."""
    tmp = relay.spool / "tmp"
    tmp.rename(relay.spool / "tmp.away")
    try:
        code, body = http_get(relay, "/healthz/ready")
        assert code == 503 and b"spool is not writable" in body
        assert http_get(relay, "/healthz")[0] == 200
    finally:
        (relay.spool / "tmp.away").rename(tmp)
    assert http_get(relay, "/healthz/ready")[0] == 200


# -- the queue ------------------------------------------------------------------------


def test_unwritable_maildir_keeps_message_queued_and_retries(relay_factory) -> None:
    """If the maildir cannot be written the message stays queued and is delivered later."""
    relay = relay_factory(start=False, queue='retry = ["1s"]')
    relay.outbox.write_text("not a directory")
    relay.start()
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], message("patient"))
    wait_for(lambda: "status=deferred" in relay.log(), what="a deferral")
    assert len(relay.queued()) == 1
    status = json.loads(http_get(relay, "/status")[1])
    assert status["queue"]["deferred"] + status["queue"]["active"] == 1
    assert "cannot write to maildir" in status["routes"]["outbox"]["last_error_reason"]
    relay.outbox.unlink()
    [path] = relay.wait_delivered(1)
    assert parse_delivered(path)["Subject"] == "patient"
    wait_for(lambda: relay.queued() == [], what="spool to empty")


def test_restart_recovers_queue_and_removes_partial_files(relay_factory) -> None:
    """Queued mail survives a restart; leftovers in tmp/ are removed; ids are not reused."""
    relay = relay_factory(start=False, queue='retry = ["1h"]')
    relay.outbox.write_text("blocked")
    relay.start()
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], message("survivor"))
    wait_for(lambda: "status=deferred" in relay.log(), what="a deferral")
    [first_id] = relay.queued()
    wait_for(lambda: (relay.spool / "state" / f"{first_id}.json").exists(), what="retry state")
    relay.signal(signal.SIGKILL)
    partial = relay.spool / "tmp" / "0123456789ABCDEF0123"
    partial.write_bytes(b'{"v":1}\npartial')
    relay.outbox.unlink()
    relay.start()
    # Recovery runs on the disk thread after the listeners are up.
    wait_for(lambda: "recovered 1 queued messages" in relay.new_log(), what="spool recovery")
    assert not partial.exists()
    # The deferral's back-off (1h) survives the restart: nothing is tried yet.
    assert relay.queued() == [first_id]
    status = json.loads(http_get(relay, "/status")[1])
    assert status["queue"]["deferred"] == 1
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], message("second"))
    [path] = relay.wait_delivered(1)
    assert path.name.split(".")[1] != "R" + first_id
    wait_for(lambda: relay.queued() == [first_id], what="the new message to leave the spool")


def test_sigkill_under_load_loses_and_duplicates_nothing(relay_factory) -> None:
    """200 messages from 4 clients, SIGKILL mid-way, restart: every 250 is in the outbox once."""
    relay = relay_factory()
    acked: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10_000))
    killed = threading.Event()

    def client(n: int) -> None:
        while not killed.is_set():
            try:
                with relay.smtp() as s:
                    while True:
                        with lock:
                            i = next(counter)
                        if i >= 200:
                            return
                        tag = f"msg-{i}"
                        s.sendmail("a@example.org", ["b@example.net"], message(tag))
                        with lock:
                            acked.append(tag)
            except (OSError, smtplib.SMTPException):
                # The relay was killed: what was not acknowledged may be lost.
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 80, what="80 acknowledged messages")
    relay.signal(signal.SIGKILL)
    killed.set()
    for t in threads:
        t.join(timeout=60)
    before = set(acked)
    relay.start()
    # Send the rest after the restart, so the run covers 200 messages.
    with relay.smtp() as s:
        for i in range(200 - len(before)):
            tag = f"after-{i}"
            s.sendmail("a@example.org", ["b@example.net"], message(tag))
            acked.append(tag)
    wait_for(lambda: len(relay.delivered()) >= len(acked) and relay.queued() == [],
             timeout=60, what="every acknowledged message delivered")
    subjects = [parse_delivered(p)["Subject"] for p in relay.delivered()]
    for tag in acked:
        assert subjects.count(tag) == 1, tag
    assert len(subjects) == len(set(subjects)), "no duplicates"


# -- the command --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relayd(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize(
    "snippet, key",
    [
        ('[[listener]]\nname = "x"\nlisten = "tcp:{port}"\nroute = "nowhere"\n', "route"),
        ('[[listener]]\nname = "x"\nlisten = "tcp:{port}"\nmynetworks = ["10.0.0.300/8"]\n'
         '[route.default]\nmaildir = "o"\n', "mynetworks"),
        ('[[listener]]\nname = "x"\nlisten = "tcp:{port}"\nbogus = 1\n[route.default]\n'
         'maildir = "o"\n', "bogus"),
    ],
)
def test_bad_config_exits_1_and_listens_nowhere(tmp_path: Path, snippet: str, key: str) -> None:
    """A bad config: exit 1, 'FILE: key: reason' on stderr, nothing bound."""
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text(snippet.format(port=port))
    for args in (["run", "--config", str(path)], ["check-config", "--config", str(path)],
                 ["--config", str(path)]):
        out = relayd(*args, cwd=tmp_path)
        assert out.returncode == 1
        first = out.stderr.strip().splitlines()[0]
        assert first.startswith(f"{path}: ") and key in first.split(": ")[1], out.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_missing_config_file(tmp_path: Path) -> None:
    out = relayd("check-config", "--config", str(tmp_path / "nope.toml"))
    assert out.returncode == 1
    assert out.stderr.startswith(f"{tmp_path / 'nope.toml'}: -: cannot read")


def test_check_config_prints_effective_config(tmp_path: Path) -> None:
    """check-config prints every value, defaults included, and exits 0."""
    path = tmp_path / "ok.toml"
    path.write_text(config_text(tmp_path / "s", tmp_path / "o"))
    out = relayd("check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert 'max_message_size = "25MB"' in out.stdout
    assert 'mynetworks = ["127.0.0.0/8", "::1/128"]' in out.stdout


def test_shipped_sample_config_is_valid() -> None:
    out = relayd("check-config", "--config", str(ROOT / "etc" / "relayd" / "relayd.toml"))
    assert out.returncode == 0, out.stderr


def test_version() -> None:
    import relayd as package

    out = relayd("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"relayd {package.__version__}"


def test_port_in_use_exits_nonzero(tmp_path: Path) -> None:
    """A listener that cannot bind stops the start with an error."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "c.toml"
        path.write_text(config_text(tmp_path / "s", tmp_path / "o").replace(
            'listen = "tcp:0:interface=127.0.0.1"\nroute', f'listen = "tcp:{port}:interface=127.0.0.1"\nroute'))
        out = relayd("run", "--config", str(path))
        assert out.returncode != 0
        assert "Address already in use" in out.stdout + out.stderr


def test_twistd_plugin_runs_relayd(relay_factory) -> None:
    """`twistd -n relayd --config FILE` finds the plugin and relays mail."""
    # twistd's own entry point, under this interpreter (Debian names the
    # script twistd3, a venv twistd).
    twistd = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
    relay = relay_factory(start=False)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env_path}" if env_path else str(ROOT)
    try:
        relay.start([sys.executable, *twistd, "-n", "--pidfile=", "relayd", "--config",
                     str(relay.config_path)])
    finally:
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            del os.environ["PYTHONPATH"]
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], message("plugin"))
    relay.wait_delivered(1)


def test_embedded_default_config(tmp_path: Path) -> None:
    """With no config, relayd serves 127.0.0.1:1025 into ./relayd-data/outbox."""
    for port in (1025, 8025):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use on this machine")
    relay = Relay(tmp_path, config="")
    env = dict(os.environ)
    env.pop("RELAYD_CONFIG", None)
    try:
        relay.start([sys.executable, "-m", "relayd.cli"])
        assert relay.ports == {"default": 1025, "http": 8025}
        assert "embedded default" in relay.log()
        with smtplib.SMTP("127.0.0.1", 1025, timeout=30) as s:
            s.sendmail("a@example.org", ["b@example.net"], message("default"))
        new = tmp_path / "relayd-data" / "outbox" / "new"
        wait_for(lambda: new.is_dir() and any(new.iterdir()), what="delivery to ./relayd-data")
    finally:
        relay.stop()


@pytest.mark.parametrize("how", ["config", "option"])
def test_json_log_format(relay_factory, how) -> None:
    """log_format = "json" or ``relayd run --log-format json``: every line is
    JSON, mail events carry their fields."""
    relay = relay_factory(start=False)
    if how == "config":
        text = relay.config_path.read_text().replace(
            'hostname = "relay.test"', 'hostname = "relay.test"\nlog_format = "json"')
        relay.config_path.write_text(text)
        relay.start()
    else:
        relay.start([sys.executable, "-m", "relayd.cli", "run", "--config",
                     str(relay.config_path), "--log-format", "json"])
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], message("json"))
    relay.wait_delivered(1)
    events = wait_for(
        lambda: (ev := [json.loads(line) for line in relay.log().splitlines() if line.strip()])
        and any(e.get("status") == "sent" for e in ev) and ev,
        what="the sent event")
    sent = next(e for e in events if e.get("status") == "sent")
    assert sent["namespace"] == "relayd.mail" and sent["rcpt"] == "b@example.net"
    assert sent["message"].startswith(f"{sent['queue_id']}: to=<b@example.net>")
    received = next(e for e in events if e.get("message", "").endswith("client=[127.0.0.1]"))
    assert received["queue_id"] == sent["queue_id"] and received["sender"] == "a@example.org"


def test_tcp_listeners_get_a_deep_listen_queue() -> None:
    """TCP listeners default to backlog=1024 (Twisted's 50 dropped SYNs under bursts)."""
    from relayd.tap import with_backlog

    assert with_backlog("tcp:25") == "tcp:25:backlog=1024"
    assert with_backlog("tcp:0:interface=127.0.0.1") == "tcp:0:interface=127.0.0.1:backlog=1024"
    assert with_backlog("tcp:25:backlog=10") == "tcp:25:backlog=10"
    assert with_backlog("unix:/x/control.sock:mode=600") == "unix:/x/control.sock:mode=600"
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
