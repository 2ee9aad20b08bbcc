"""The smarthost client against real TLS on loopback.

The fake smarthost is a stdlib ``ssl`` + ``socket`` server in a thread of the
test process; the relayd client runs under ``task.react`` in a subprocess
(this module, run as ``python -m tests.integration.test_smarthost_tls SPEC``), so the
test process never starts a global reactor.  Certificates come from
``tests.certs``, generated into tmp_path.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relayd.config import RouteConfig, Smarthost
from relayd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: tls\r\n\r\n.dot line\r\nbye\r\n"


# ---------------------------------------------------------------------------
# The fake smarthost (thread in the test process)
# ---------------------------------------------------------------------------


class TLSSmarthost(threading.Thread):
    """Accepts connections on 127.0.0.1 and speaks just enough ESMTP.

    ``commands`` records ``(line, tls)``; ``events`` records handshake
    results; ``messages`` the received (still stuffed) DATA.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        implicit: bool = False,
        client_ca: Path | None = None,
        auth: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(str(client_ca))
        self.implicit = implicit
        self.auth = auth
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(5)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.commands: list[tuple[str, bool]] = []
        self.events: list[str] = []
        self.messages: list[bytes] = []
        self.client_subjects: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._session(sock)
            except Exception as e:  # the client went away, TLS alert, ...
                self.events.append(f"session ended: {e.__class__.__name__}: {e}")
            finally:
                sock.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.listener.close()

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket | None:
        sock.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.events.append(f"handshake failed: {e}")
            return None
        self.events.append("handshake ok")
        peer = tls.getpeercert()
        if peer:
            self.client_subjects.append(dict(x[0] for x in peer["subject"])["commonName"])
        return tls

    def _session(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        sock: Any = raw
        tls = False
        if self.implicit:
            sock = self._handshake(raw)
            if sock is None:
                return
            tls = True
        buf = b""

        def send(text: str) -> None:
            sock.sendall(text.encode() + b"\r\n")

        send("220 smtp.test ESMTP fake")
        while True:
            while b"\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    self.events.append("closed by client")
                    return
                buf += data
            line, buf = buf.split(b"\r\n", 1)
            text = line.decode()
            self.commands.append((text, tls))
            verb = text.split(" ", 1)[0].split(":", 1)[0].upper()
            if verb == "EHLO":
                ext = ["smtp.test", "PIPELINING", "SIZE 1000000", "8BITMIME"]
                if not tls and not self.implicit:
                    ext.append("STARTTLS")
                if self.auth and tls:
                    ext.append("AUTH PLAIN LOGIN")
                send("\r\n".join(
                    f"250-{x}" if i < len(ext) - 1 else f"250 {x}" for i, x in enumerate(ext)
                ))
            elif verb == "STARTTLS":
                send("220 2.0.0 Ready to start TLS")
                assert not buf
                new = self._handshake(sock)
                if new is None:
                    return
                sock, tls = new, True
            elif verb == "AUTH":
                send("235 2.7.0 Authentication successful")
            elif verb in ("MAIL", "RCPT", "RSET"):
                send("250 2.0.0 Ok")
            elif verb == "DATA":
                send("354 go ahead")
                while b"\r\n.\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                data, buf = buf.split(b"\r\n.\r\n", 1)
                self.messages.append(data + b"\r\n")
                send("250 2.0.0 Ok: queued as TLS1")
            elif verb == "QUIT":
                send("221 2.0.0 Bye")
                return
            else:
                send("502 5.5.2 Error: command not recognized")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve():
    started: list[TLSSmarthost] = []

    def start(*args: Any, **kw: Any) -> TLSSmarthost:
        server = TLSSmarthost(*args, **kw)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def deliver(port: int, host: str = "127.0.0.1", **route: Any) -> dict[str, Any]:
    """Run one delivery in a subprocess; its JSON report."""
    spec = {"host": host, "port": port, "route": route}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_smarthost_tls", json.dumps(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sent_in_clear(server: TLSSmarthost) -> list[str]:
    return [c for c, tls in server.commands if not tls]


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_verified_starttls_with_ca_file_and_auth(pki, serve):
    server = serve(pki.server.cert, pki.server.key, auth=True)
    report = deliver(
        server.port, ca_file=str(pki.ca), tls_server_name="smtp.test",
        username="user", password="secret",
    )
    assert report["status"] == "ok", report
    assert report["relay"] == f"127.0.0.1[127.0.0.1]:{server.port}"
    assert report["recipients"] == [["b@example.net", "sent", "250 2.0.0 Ok: queued as TLS1"]]
    assert sent_in_clear(server) == ["EHLO client.test", "STARTTLS"]
    verbs = [c.split(" ")[0] for c, _ in server.commands]
    assert verbs[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]
    assert server.messages == [MESSAGE.replace(b"\r\n.dot", b"\r\n..dot")]
    assert not any("secret" in line for line in report["log"])
    assert report["tls"] == {"success": 1.0}


def test_ip_address_smarthost_is_verified_as_an_ip(pki, serve):
    server = serve(pki.server.cert, pki.server.key)
    report = deliver(server.port, ca_file=str(pki.ca))
    assert report["status"] == "ok", report


def test_wrong_host_name_is_transient_and_nothing_is_sent(pki, serve):
    server = serve(pki.server.cert, pki.server.key)
    report = deliver(server.port, ca_file=str(pki.ca), tls_server_name="other.test")
    assert report["status"] == "transient", report
    assert "certificate verification failed for 127.0.0.1[127.0.0.1]" in report["error"]
    assert [c for c, _ in server.commands] == ["EHLO client.test", "STARTTLS"]
    assert report["tls"] == {"verification_failed": 1.0}


def test_unknown_ca_is_transient(pki, serve):
    server = serve(pki.rogue_server.cert, pki.rogue_server.key)
    report = deliver(server.port, ca_file=str(pki.ca), tls_server_name="smtp.test")
    assert report["status"] == "transient", report
    assert "TLS handshake with 127.0.0.1[127.0.0.1] failed" in report["error"]
    assert [c for c, _ in server.commands] == ["EHLO client.test", "STARTTLS"]
    assert report["tls"] == {"verification_failed": 1.0}


def test_system_trust_does_not_know_the_test_ca(pki, serve):
    server = serve(pki.server.cert, pki.server.key)
    report = deliver(server.port, tls_server_name="smtp.test")
    assert report["status"] == "transient", report
    assert "MAIL" not in " ".join(c for c, _ in server.commands)


def test_tls_verify_false_delivers_and_warns(pki, serve):
    server = serve(pki.rogue_server.cert, pki.rogue_server.key)
    report = deliver(server.port, tls_verify=False, tls_server_name="whatever.test")
    assert report["status"] == "ok", report
    assert any("tls_verify = false" in line for line in report["log"])
    assert [c for c, tls in server.commands if tls][0] == "EHLO client.test"


def test_implicit_tls(pki, serve):
    server = serve(pki.server.cert, pki.server.key, implicit=True)
    report = deliver(server.port, tls="implicit", ca_file=str(pki.ca), tls_server_name="smtp.test")
    assert report["status"] == "ok", report
    assert sent_in_clear(server) == []
    assert server.events[0] == "handshake ok"


def test_client_certificate(pki, serve):
    server = serve(pki.server.cert, pki.server.key, client_ca=pki.ca)
    report = deliver(
        server.port, ca_file=str(pki.ca), tls_server_name="smtp.test",
        client_cert=str(pki.client.cert), client_key=str(pki.client.key),
    )
    assert report["status"] == "ok", report
    assert server.client_subjects == ["relay-client.test"]


def test_client_certificate_missing_is_transient(pki, serve):
    server = serve(pki.server.cert, pki.server.key, client_ca=pki.ca)
    report = deliver(server.port, ca_file=str(pki.ca), tls_server_name="smtp.test")
    assert report["status"] == "transient", report
    assert "MAIL" not in " ".join(c for c, _ in server.commands)


def test_unreadable_tls_files_fail_at_construction(pki, tmp_path):
    from relayd.courier.smarthost import SmarthostCourier

    base = {"name": "r", "smarthost": (Smarthost("127.0.0.1", 25),)}
    with pytest.raises(ConfigError, match=r"route\.r\.ca_file: cannot read"):
        SmarthostCourier(RouteConfig(ca_file=str(tmp_path / "nope.pem"), **base), "h", None)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        SmarthostCourier(RouteConfig(ca_file=str(garbage), **base), "h", None)
    with pytest.raises(ConfigError, match="does not match"):
        SmarthostCourier(
            RouteConfig(client_cert=str(pki.client.cert), client_key=str(pki.server.key), **base),
            "h", None,
        )
    # A CA file with several certificates is fine.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.rogue_ca.read_bytes() + pki.ca.read_bytes())
    SmarthostCourier(RouteConfig(ca_file=str(bundle), **base), "h", None, Clock())


# ---------------------------------------------------------------------------
# The subprocess driver
# ---------------------------------------------------------------------------


def _driver(spec: dict[str, Any]) -> None:
    from twisted.internet import task
    from twisted.logger import formatEvent, globalLogPublisher

    from relayd.courier.smarthost import SmarthostCourier
    from relayd.envelope import Envelope
    from relayd.errors import DeliveryError

    log: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "relayd.courier":
            log.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)

    def main(reactor: Any) -> Any:
        route = RouteConfig(
            name="tlstest", smarthost=(Smarthost(spec["host"], spec["port"]),), **spec["route"]
        )
        from relayd.metrics import Metrics

        metrics = Metrics()
        courier = SmarthostCourier(route, "client.test", reactor, metrics=metrics)
        envelope = Envelope(
            sender="a@example.org", recipients=("b@example.net",), route="tlstest", arrival=0.0
        )
        report: dict[str, Any] = {}

        def ok(result: Any) -> None:
            report.update(
                status="ok", relay=result.relay,
                recipients=[[r.recipient, r.status, r.reply] for r in result.recipients],
            )

        def failed(failure: Any) -> None:
            if failure.check(DeliveryError):
                report.update(status="transient" if not failure.value.permanent else "permanent",
                              error=failure.value.reply)
            else:
                report.update(status="error", error=failure.getTraceback())

        def finish(_: object) -> Any:
            return courier.stop()

        def show(_: object) -> None:
            report["log"] = log
            report["tls"] = {
                s.labels["result"]: s.value
                for family in metrics.registry.collect()
                if family.name == "relayd_smarthost_tls_handshakes"
                for s in family.samples if s.name.endswith("_total")
            }
            print(json.dumps(report))

        d = courier.deliver("QTLS", envelope, MESSAGE)
        d.addCallbacks(ok, failed)
        d.addCallback(finish)
        d.addCallback(show)
        return d

    task.react(main)


if __name__ == "__main__":
    _driver(json.loads(sys.argv[1]))
