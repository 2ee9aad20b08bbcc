"""SIGHUP (config reload) and SIGTERM (graceful stop) on a real relayd process.

What an operator does with ``systemctl reload``/``stop``: the reload applies
listeners, policy, routes and credentials live or refuses the whole change
and keeps running; the stop lets a client that is mid-transaction finish and
get its 250, and never loses a message it acknowledged.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import time
from pathlib import Path

import pytest

from tests.htpasswd import htpasswd_tool
from tests.relay import _LISTENING, Relay, config_text, wait_for

#: twistd exits by re-raising the signal that stopped it; systemd counts a
#: SIGTERM death as a clean stop.
CLEAN_EXIT = (0, -signal.SIGTERM)
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n\r\nbody\r\n"


def write_config(relay: Relay, **kwargs: str) -> None:
    relay.config_path.write_text(config_text(relay.spool, relay.outbox, **kwargs))


def reload(relay: Relay) -> str:
    """SIGHUP, then the log lines the reload wrote (done or refused)."""
    assert relay.proc is not None
    before = len(relay.log())
    relay.proc.send_signal(signal.SIGHUP)

    def finished() -> str | None:
        text = relay.log()[before:]
        return text if ("reload done" in text or "reload refused" in text) else None

    return wait_for(finished, what="the reload to finish")


def ports(relay: Relay) -> dict[str, int]:
    """Every listener's port, the latest line per name winning."""
    found = {}
    for m in _LISTENING.finditer(relay.log()):
        found["http" if m.group(1) == "http" else m.group(2)] = int(m.group(4))
    return found


def send(port: int, sender: str = "a@example.org") -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        code, reply = smtp.rcpt("b@example.net")
        if code != 250:
            return f"{code} {reply.decode()}"
        code, reply = smtp.data(MESSAGE)
        return f"{code} {reply.decode()}"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# -- reload ------------------------------------------------------------------------


def test_reload_applies_mynetworks_to_new_sessions(relay_factory) -> None:
    relay: Relay = relay_factory(listener_extra='mynetworks = ["192.0.2.0/24"]')
    assert send(relay.smtp_port).startswith("550 5.7.1")
    write_config(relay)  # default mynetworks: loopback
    out = reload(relay)
    assert "reload done: 1 listeners (none added, none removed, mta changed)" in out
    assert send(relay.smtp_port).startswith("250 2.0.0 Ok: queued as")
    relay.wait_delivered(1)


def test_reload_adds_and_removes_listeners_and_changes_routes(relay_factory, tmp_path) -> None:
    relay: Relay = relay_factory()
    first = relay.smtp_port
    other = tmp_path / "other-outbox"
    write_config(relay, extra=f"""
[[listener]]
name = "second"
listen = "tcp:0:interface=127.0.0.1"
route = "other"

[route.other]
maildir = "{other}"
""")
    out = reload(relay)
    assert ("reload done: 2 listeners (second added, none removed, none changed), "
            "2 routes (other new or changed)") in out
    second = wait_for(lambda: ports(relay).get("second"), what="the new listener's port")
    assert send(second).startswith("250")
    assert send(first).startswith("250")
    wait_for(lambda: (other / "new").is_dir() and len(list((other / "new").iterdir())) == 1,
             what="delivery through the new route")
    relay.wait_delivered(1)

    # Now the first listener goes and the route "outbox" points elsewhere.
    moved = tmp_path / "moved-outbox"
    relay.config_path.write_text(f"""
[server]
hostname = "relay.test"
spool = "{relay.spool}"

[http]
listen = "tcp:0:interface=127.0.0.1"

[[listener]]
name = "second"
listen = "tcp:0:interface=127.0.0.1"
route = "outbox"

[route.outbox]
maildir = "{moved}"
""")
    out = reload(relay)
    assert ("reload done: 1 listeners (none added, mta removed, second changed), "
            "1 routes (outbox new or changed)") in out
    assert "route other removed" in out
    wait_for(lambda: refused(first), what="the removed listener's port to close")
    assert send(second).startswith("250")
    wait_for(lambda: (moved / "new").is_dir() and len(list((moved / "new").iterdir())) == 1,
             what="delivery through the changed route")
    assert relay.proc is not None and relay.proc.poll() is None


@pytest.mark.parametrize("change, reason", [
    ("spool", "server.spool cannot change without a restart"),
    ("syntax", "reload refused"),
    ("missing-cert", "tls.cert"),
])
def test_a_refused_reload_keeps_the_running_config(relay_factory, tmp_path, change,
                                                    reason) -> None:
    relay: Relay = relay_factory(listener_extra='mynetworks = ["192.0.2.0/24"]')
    text = config_text(relay.spool, relay.outbox)  # would let loopback relay...
    if change == "spool":
        text = text.replace(f'spool = "{relay.spool}"', f'spool = "{tmp_path / "elsewhere"}"')
    elif change == "syntax":
        text += "\n[route.broken\n"
    else:
        text += f'\n[tls]\ncert = "{tmp_path / "nope.crt"}"\nkey = "{tmp_path / "nope.key"}"\n'
    relay.config_path.write_text(text)
    out = reload(relay)
    assert "reload refused, the running configuration stays" in out
    assert reason in out
    # ...but the old config (no loopback relaying) is still the one in force.
    assert send(relay.smtp_port).startswith("550 5.7.1")
    assert relay.proc is not None and relay.proc.poll() is None


def test_reload_refuses_a_listener_moved_onto_a_port_in_use(relay_factory) -> None:
    relay: Relay = relay_factory()
    http = relay.ports["http"]
    write_config(relay, listener_extra="")
    text = relay.config_path.read_text().replace(
        'name = "mta"\nlisten = "tcp:0:interface=127.0.0.1"',
        f'name = "mta"\nlisten = "tcp:{http}:interface=127.0.0.1"')
    relay.config_path.write_text(text)
    out = reload(relay)
    assert "reload refused" in out and "listener[mta].listen" in out
    assert send(relay.smtp_port).startswith("250")


def test_reload_picks_up_a_new_htpasswd_user(relay_factory, tmp_path) -> None:
    """Auth files are reread: a user added to the file can log in after SIGHUP."""
    import base64

    users = tmp_path / "passwd"
    htpasswd_tool("-cbB", str(users), "old", "old-secret")
    relay: Relay = relay_factory(
        listener_extra='mynetworks = []\nauth = "required"\nauth_backend = "users"\n'
                       'plaintext_auth = true',
        extra=f'[auth.users]\ntype = "htpasswd"\nfile = "{users}"\n')
    htpasswd_tool("-bB", str(users), "new", "new-secret")
    out = reload(relay)
    assert "reload done" in out
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as smtp:
        smtp.ehlo()
        token = base64.b64encode(b"\0new\0new-secret").decode()
        assert smtp.docmd("AUTH", f"PLAIN {token}")[0] == 235


# -- stop ------------------------------------------------------------------------


def test_sigterm_lets_a_transaction_in_data_finish_then_exits(relay_factory) -> None:
    relay: Relay = relay_factory()
    sock = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"EHLO client.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    assert f.readline().startswith(b"250")
    assert f.readline().startswith(b"250")
    assert f.readline().startswith(b"354")
    sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    # The port closes at once: no new clients...
    wait_for(lambda: refused(relay.smtp_port), what="the listener to close")
    assert relay.proc.poll() is None  # ...but the session in DATA is still served.
    sock.sendall(b"second half\r\n.\r\nQUIT\r\n")
    queued = f.readline()
    assert queued.startswith(b"250 2.0.0 Ok: queued as"), queued
    assert f.readline().startswith(b"421 4.3.2")
    assert f.readline() == b""  # closed
    sock.close()
    assert relay.proc.wait(timeout=30) in CLEAN_EXIT
    queue_id = queued.split()[-1].decode()
    # Acknowledged means kept: delivered before the exit, or after the restart.
    relay.start()
    delivered = relay.wait_delivered(1)
    assert queue_id in delivered[0].name
    assert b"second half" in delivered[0].read_bytes()


def test_sigterm_cuts_off_a_stalled_client_after_stop_timeout(relay_factory) -> None:
    relay: Relay = relay_factory(extra="")
    text = relay.config_path.read_text().replace(
        'hostname = "relay.test"', 'hostname = "relay.test"\nstop_timeout = "2s"')
    relay.config_path.write_text(text)
    relay.stop()
    relay.start()
    sock = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=30)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"HELO client.test\r\nMAIL FROM:<a@example.org>\r\n"
                 b"RCPT TO:<b@example.net>\r\nDATA\r\n")
    for _ in range(4):
        f.readline()
    sock.sendall(b"Subject: never finished\r\n\r\n")
    assert relay.proc is not None
    started = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(timeout=30) in CLEAN_EXIT
    assert time.monotonic() - started >= 1.5  # it did wait for the client
    try:
        rest = f.read()
    except ConnectionResetError:  # aborted: a reset, not a close
        rest = b""
    assert rest == b""  # cut off without a 250
    sock.close()
    assert "still open after the grace period" in relay.log()
    assert relay.queued() == [] and relay.delivered() == []


def test_sigterm_closes_idle_sessions_with_421(relay_factory) -> None:
    relay: Relay = relay_factory()
    sock = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=30)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO client.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    assert f.readline().startswith(b"421 4.3.2")
    assert relay.proc.wait(timeout=30) in CLEAN_EXIT
    sock.close()


def test_config_file_for_instances_documents_stop_timeout() -> None:
    sample = (Path(__file__).resolve().parents[2] / "etc/relayd/relayd.toml").read_text()
    assert 'stop_timeout = "30s"' in sample
