"""systemd integration: the notify protocol, the units, the instance examples.

systemd is not PID 1 on the test machines, so the units are checked
statically (``systemd-analyze verify`` and ``security --offline``) and the
notify protocol is tested against a datagram socket the test owns, handed
to relayd as ``$NOTIFY_SOCKET`` the way systemd does.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.application.service import MultiService, Service
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher

from relayd import sdnotify
from relayd.config import ServerConfig, load
from relayd.sdnotify import Notifier, SystemdNotifier
from tests.relay import ROOT, wait_for

UNITS = ROOT / "systemd"
EXAMPLES = ROOT / "etc" / "relayd" / "examples"
INSTANCES = sorted(EXAMPLES.glob("instance-*.toml"))

#: ``systemd-analyze security`` exposure of both services, measured on
#: systemd 252 (Debian 12): 1.5 "OK".  The score moves in steps of 0.1 and
#: dropping almost any one hardening setting adds 0.1, so the bound is the
#: measured value: a weaker sandbox fails here.  Lower it when hardening more.
MAX_EXPOSURE = 1.5


# -- a notify socket the test owns ---------------------------------------------


class NotifySocket:
    """The receiving end of ``$NOTIFY_SOCKET``, as systemd would bind it."""

    def __init__(self, address: str) -> None:
        self.address = address  # as put into $NOTIFY_SOCKET
        #: Every datagram wait_for() has received.
        self.seen: list[dict[str, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = 30.0) -> dict[str, str]:
        """The next datagram as KEY -> value (raises on timeout)."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        return parse(data)

    def pending(self) -> list[dict[str, str]]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(parse(self.sock.recv(65536)))
        except BlockingIOError:
            return out

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """Datagrams until one sets ``key`` (earlier ones are kept in .seen)."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.receive(max(0.01, deadline - time.monotonic()))
            self.seen.append(fields)
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


def parse(data: bytes) -> dict[str, str]:
    text = data.decode("utf-8")
    assert text.endswith("\n"), text
    return dict(line.split("=", 1) for line in text.splitlines())


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    assert len(os.fsencode(path)) < 108, f"{path} is too long for a Unix socket"
    s = NotifySocket(str(path))
    yield s
    s.close()


@pytest.fixture
def warnings() -> Iterator[list[dict]]:
    events: list[dict] = []

    def observe(event: dict) -> None:
        level = getattr(event.get("log_level"), "name", None)
        if event.get("log_namespace") == "relayd" and level == "warn":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# -- (a) the protocol ------------------------------------------------------------


def test_fields_go_in_one_datagram_in_order(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.address)
    assert n.notify(READY=1, STATUS="up", MAINPID=42)
    notify_socket.sock.settimeout(5)
    assert notify_socket.sock.recv(4096) == b"READY=1\nSTATUS=up\nMAINPID=42\n"


def test_abstract_namespace_address() -> None:
    """``@name`` is a name in the abstract namespace, not a file called @name."""
    receiver = NotifySocket(f"@relayd-test-{uuid.uuid4().hex}")
    try:
        assert Notifier(receiver.address).ready("listening")
        assert receiver.receive(5) == {"READY": "1", "STATUS": "listening",
                                       "MAINPID": str(os.getpid())}
    finally:
        receiver.close()
    assert not Path(receiver.address).exists()


def test_ready_reloading_stopping_status(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    reloading = notify_socket.receive(5)
    assert reloading["RELOADING"] == "1" and reloading["STATUS"]
    # What Type=notify-reload (systemd >= 253) needs with RELOADING=1.
    usec = int(reloading["MONOTONIC_USEC"])
    assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.ready("accepting mail")
    assert notify_socket.receive(5) == {"READY": "1", "STATUS": "accepting mail",
                                        "MAINPID": str(os.getpid())}
    n.status("busy")
    assert notify_socket.receive(5) == {"STATUS": "busy"}
    n.stopping()
    assert notify_socket.receive(5)["STOPPING"] == "1"


def test_a_newline_cannot_forge_a_field(notify_socket: NotifySocket) -> None:
    Notifier(notify_socket.address).status("queue empty\nREADY=1\r\nSTOPPING=1")
    assert notify_socket.receive(5) == {"STATUS": "queue empty READY=1  STOPPING=1"}


def test_without_notify_socket_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_environment()
    assert not n.enabled
    assert n.ready("x") is False and n.stopping() is False and n.notify(A=1) is False


def test_the_address_is_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                     notify_socket: NotifySocket) -> None:
    """Read once, then unset: processes relayd starts cannot speak for it."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    n = Notifier.from_environment()
    assert "NOTIFY_SOCKET" not in os.environ
    assert n.address == notify_socket.address and n.status("still works")
    assert notify_socket.receive(5) == {"STATUS": "still works"}
    env = {"NOTIFY_SOCKET": "@x", "OTHER": "1"}
    assert Notifier.from_environment(env).address == "@x" and env == {"OTHER": "1"}


def test_the_module_functions_use_one_process_notifier(
        monkeypatch: pytest.MonkeyPatch, notify_socket: NotifySocket) -> None:
    monkeypatch.setattr(sdnotify, "_default", None)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    assert sdnotify.reloading()
    assert sdnotify.ready("back")
    assert sdnotify.status("s") and sdnotify.notify(WATCHDOG=1) and sdnotify.stopping()
    assert [sorted(notify_socket.receive(5)) for _ in range(5)] == [
        ["MONOTONIC_USEC", "RELOADING", "STATUS"], ["MAINPID", "READY", "STATUS"],
        ["STATUS"], ["WATCHDOG"], ["STATUS", "STOPPING"]]
    assert sdnotify.default() is sdnotify.default()


@pytest.mark.parametrize("address", ["{tmp}/nobody-listens", "relative/path", "vsock:2:1234"])
def test_failures_are_logged_once_and_never_raised(tmp_path: Path, warnings: list[dict],
                                                   address: str) -> None:
    n = Notifier(address.format(tmp=tmp_path))
    assert n.ready("x") is False
    assert n.reloading() is False and n.stopping() is False
    assert len(warnings) == 1, warnings
    assert "systemd notification" in warnings[0]["log_format"]


# -- the Service -------------------------------------------------------------------


class Recorder(Service):
    """A sibling that records when it starts and stops."""

    def __init__(self, name: str, events: list[str], notify: NotifySocket) -> None:
        self.name = name
        self._events = events
        self._notify = notify

    def startService(self) -> None:
        super().startService()
        self._events.append(f"start {self.name}")

    def stopService(self) -> None:
        super().stopService()
        # What had systemd been told by the time this child stops?
        already = [d for d in self._notify.pending() if "STOPPING" in d]
        self._events.append(f"stop {self.name} (STOPPING sent: {bool(already)})")


def test_service_says_ready_after_the_other_children_and_the_reactor_start(
        notify_socket: NotifySocket) -> None:
    reactor = MemoryReactor()
    events: list[str] = []
    parent = MultiService()
    Recorder("listener", events, notify_socket).setServiceParent(parent)
    notifier = SystemdNotifier(reactor, lambda: "accepting mail on 127.0.0.1:25",
                               Notifier(notify_socket.address))
    notifier.setServiceParent(parent)
    parent.startService()
    assert events == ["start listener"]
    assert notify_socket.pending() == []  # the reactor is not running yet
    reactor.run()
    assert notify_socket.receive(5) == {"READY": "1", "STATUS": "accepting mail on 127.0.0.1:25",
                                        "MAINPID": str(os.getpid())}
    parent.stopService()
    # Children stop in reverse: STOPPING=1 was out before the listener closed.
    assert events == ["start listener", "stop listener (STOPPING sent: True)"]


def test_service_sends_stopping_once(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier(MemoryReactor(), lambda: "x", Notifier(notify_socket.address))
    notifier.startService()
    assert notifier.stopping()  # a graceful stop says so when it begins...
    notifier.stopService()  # ...and the service does not say it again
    assert [sorted(d) for d in notify_socket.pending()] == [["STATUS", "STOPPING"]]


def test_service_stopped_before_the_reactor_runs_never_says_ready(
        notify_socket: NotifySocket) -> None:
    reactor = MemoryReactor()
    notifier = SystemdNotifier(reactor, lambda: "x", Notifier(notify_socket.address))
    notifier.startService()
    notifier.stopService()
    reactor.run()
    assert ["READY" in d for d in notify_socket.pending()] == [False]


def test_a_broken_status_text_still_says_ready(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier(MemoryReactor(), lambda: 1 / 0,  # type: ignore[arg-type,return-value]
                               Notifier(notify_socket.address))
    assert notifier.ready()
    assert notify_socket.receive(5)["READY"] == "1"


# -- (b) the relayd process under a notify socket -----------------------------------


def test_relayd_says_ready_when_listening_and_stopping_on_sigterm(
        relay_factory, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = relay_factory(start=False)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    relay.start(wait=False)
    assert relay.proc is not None
    ready = notify_socket.wait_for("READY")
    # Stop the process right there: whatever is bound now was bound before
    # READY=1, and the kernel completes connections to it on its own.
    relay.proc.send_signal(signal.SIGSTOP)
    try:
        assert ready["MAINPID"] == str(relay.proc.pid)
        match = re.fullmatch(r"accepting mail on 127\.0\.0\.1:(\d+)", ready["STATUS"])
        assert match, ready
        smtp = socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=30)
        http = relay_ports_from_log(relay)["http"]
        socket.create_connection(("127.0.0.1", http), timeout=30).close()
        assert (relay.spool / "control.sock").exists()
    finally:
        relay.proc.send_signal(signal.SIGCONT)
    with smtp:
        assert smtp.makefile("rb").readline().startswith(b"220 relay.test ")
    assert not any("STOPPING" in d for d in notify_socket.seen)

    relay.proc.send_signal(signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    # twistd ends by re-raising the signal that stopped it, so the status is
    # "killed by SIGTERM": systemd counts that as a clean stop, like exit 0
    # (SuccessExitStatus= by default), and Restart=on-failure leaves it be.
    assert relay.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "systemd notification" not in relay.log()  # no send failed


@pytest.mark.parametrize("good", [True, False])
def test_a_reload_says_reloading_then_ready_even_when_refused(
        relay_factory, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch,
        good: bool) -> None:
    """systemd keeps a Type=notify unit "reloading" until READY=1 follows
    RELOADING=1: a refused reload must send it too."""
    relay = relay_factory(start=False)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    relay.start(wait=False)
    assert relay.proc is not None
    notify_socket.wait_for("READY")
    if not good:
        relay.config_path.write_text(relay.config_path.read_text() + "\n[broken\n")
    relay.proc.send_signal(signal.SIGHUP)
    assert notify_socket.wait_for("RELOADING")["RELOADING"] == "1"
    assert notify_socket.wait_for("READY")["READY"] == "1"
    assert ("reload done" if good else "reload refused") in relay.log()


def relay_ports_from_log(relay) -> dict[str, int]:
    """The ports relayd logged as bound (it logs each before READY=1)."""
    relay.wait_listening()
    return relay.ports


def test_socket_activation_with_systemd_socket_activate(
        relay_factory, notify_socket: NotifySocket) -> None:
    """relayd.socket's way: the activator binds the port, and starts relayd
    (with LISTEN_FDS) on the first connection, which relayd then serves."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (package systemd)")
    relay = relay_factory(start=False)
    relay.config_path.write_text(relay.config_path.read_text().replace(
        'listen = "tcp:0:interface=127.0.0.1"\nroute', 'listen = "systemd:domain=INET:index=0"\nroute'))
    # The activator's child gets only the variables passed with -E.
    passed = {"NOTIFY_SOCKET": notify_socket.address, "PYTHONUNBUFFERED": "1",
              **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    first = None
    for _attempt in range(5):
        # The activator takes no port 0: pick a free port, and pick again in
        # the unlikely case that someone takes it first.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # --fdname: newer Twisted (26; not 22.4) adopts nothing without LISTEN_FDNAMES,
        # which systemd (>= 227) always sets and this tool only when asked.
        relay.start([activate, "-l", f"127.0.0.1:{port}", "--fdname=mta",
                     *(f"-E{k}={v}" for k, v in passed.items()),
                     sys.executable, "-m", "relayd.cli", "run", "--config", str(relay.config_path)],
                    wait=False)
        first = wait_for(lambda p=port: connect_or_exit(relay, p), what="the activator to listen")
        if first != "exited":
            break
        assert "Address already in use" in relay.new_log(), relay.new_log()
    assert isinstance(first, socket.socket), relay.new_log()
    with first:
        ready = notify_socket.wait_for("READY")
        assert ready["STATUS"] == f"accepting mail on 127.0.0.1:{port}"
        assert ready["MAINPID"] == str(relay.proc.pid)  # the activator execs relayd
        # The connection that started relayd is served by it.
        first.settimeout(30)
        assert first.makefile("rb").readline().startswith(b"220 relay.test ")
    relay.wait_listening()
    assert relay.ports["mta"] == port
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: activated\r\n\r\nhi\r\n")
    relay.wait_delivered(1)
    relay.proc.send_signal(signal.SIGTERM)
    assert notify_socket.wait_for("STOPPING")["STOPPING"] == "1"
    assert relay.proc.wait(timeout=60) in (0, -signal.SIGTERM)


def connect_or_exit(relay, port: int) -> socket.socket | str | None:
    assert relay.proc is not None
    if relay.proc.poll() is not None:
        return "exited"
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=30)
    except ConnectionRefusedError:
        return None


# -- (c) the units, statically --------------------------------------------------------


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (in order; repeated keys accumulate)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    return path


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze verify --root``: the units as shipped in
    /etc/systemd/system, the system's own units (the targets they refer to),
    and stand-ins for the programs they run, which verify requires to exist
    (relayd is not installed in /usr/bin here)."""
    root = tmp_path / "root"
    system_units = Path("/lib/systemd/system")
    if not system_units.is_dir():
        pytest.skip("no /lib/systemd/system to verify the units against")
    shutil.copytree(system_units, root / "lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS.glob("relayd*"):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for program in ("/usr/bin/relayd", "/bin/kill"):
        stand_in = root / program.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    return root


def shipped_units() -> list[str]:
    names = sorted(p.name for p in UNITS.glob("relayd*") if p.suffix in (".service", ".socket"))
    return [n.replace("@.", "@tenant-a.") for n in names]


def test_units_exist() -> None:
    assert {"relayd.service", "relayd@.service"} <= {p.name for p in UNITS.iterdir()}


def test_systemd_analyze_verify(unit_root: Path) -> None:
    """No errors and no warnings (verify reports unknown keys and bad
    values as warnings and still exits 0, so its output must be empty)."""
    units = shipped_units()
    out = subprocess.run([analyze(), "verify", f"--root={unit_root}", *units],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_systemd_analyze_verify_catches_a_bad_unit(unit_root: Path) -> None:
    """The check above is not vacuous: a typo is reported."""
    unit = unit_root / "etc/systemd/system/relayd.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    out = subprocess.run([analyze(), "verify", f"--root={unit_root}", "relayd.service"],
                         capture_output=True, text=True, timeout=120)
    assert "Unknown key 'ProtectSytem'" in out.stdout + out.stderr


@pytest.mark.parametrize("unit", ["relayd.service", "relayd@.service"])
def test_security_exposure(unit: str) -> None:
    out = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(UNITS / unit)],
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", text)
    assert match, text
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, (
        f"{unit}: exposure {score} {match.group(2)} > {MAX_EXPOSURE}:\n"
        + "\n".join(line for line in text.splitlines() if line.startswith("✗")))


def test_the_template_is_the_service_with_another_config() -> None:
    """relayd@.service must not drift from relayd.service."""
    plain = unit_settings(UNITS / "relayd.service")
    template = unit_settings(UNITS / "relayd@.service")
    assert plain["Service"].pop("ExecStart") == ["/usr/bin/relayd --config /etc/relayd/relayd.toml"]
    assert template["Service"].pop("ExecStart") == ["/usr/bin/relayd --config /etc/relayd/%i.toml"]
    assert template["Unit"].pop("AssertPathExists") == ["/etc/relayd/%i.toml"]
    assert plain["Unit"].pop("Description") != template["Unit"].pop("Description")
    assert plain == template


@pytest.mark.parametrize("unit", ["relayd.service", "relayd@.service"])
def test_unit_essentials(unit: str) -> None:
    """What the score does not pin down, or pins only loosely."""
    s = {k: v[-1] for k, v in unit_settings(UNITS / unit)["Service"].items()}
    filters = unit_settings(UNITS / unit)["Service"]["SystemCallFilter"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["User"] == "relayd" and s["Group"] == "relayd"
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["ReadWritePaths"].split() == ["/var/spool/relayd", "/var/lib/relayd"]
    assert s["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert filters == ["@system-service", "~@privileged @resources"]
    assert s["UMask"] == "0077"
    # systemd must wait out relayd's graceful stop before its SIGKILL.
    stop_timeouts = [ServerConfig().stop_timeout, *(load(str(p)).server.stop_timeout
                                                     for p in shipped_configs())]
    assert int(s["TimeoutStopSec"]) >= max(stop_timeouts) + 10
    assert int(s["LimitNOFILE"]) >= 65536


def shipped_configs() -> list[Path]:
    """The configs the units may run: the sample, the packaged one, the
    instance and socket activation examples."""
    configs = [ROOT / "etc/relayd/relayd.toml", *INSTANCES, UNITS / "socket-activation.toml"]
    packaged = ROOT / "packaging/deb/relayd.toml"
    return [*configs, packaged] if packaged.exists() else configs


def test_the_sandbox_lets_relayd_write_where_its_configs_say() -> None:
    """Every spool and maildir of the shipped configs is under ReadWritePaths
    (ProtectSystem=strict makes everything else read-only)."""
    writable = unit_settings(UNITS / "relayd.service")["Service"]["ReadWritePaths"][-1].split()
    for path in shipped_configs():
        config = load(str(path))
        dirs = [config.server.spool, *(r.maildir for r in config.routes.values() if r.maildir)]
        for d in dirs:
            assert any(d == w or d.startswith(w + "/") for w in writable), f"{path}: {d}"


def test_socket_unit_matches_its_example_config() -> None:
    """socket-activation.toml takes relayd.socket's sockets by position,
    each with the address family systemd gives it."""
    streams = unit_settings(UNITS / "relayd.socket")["Socket"]["ListenStream"]
    config = load(str(UNITS / "socket-activation.toml"))
    domains = {}
    for listener in config.listeners:
        assert listener.listen.kind == "systemd", listener.listen.description
        options = dict(o.split("=", 1) for o in listener.listen.description.split(":")[1:])
        domains[listener.listen.index] = options["domain"]
    assert sorted(domains) == list(range(len(streams)))
    for index, stream in enumerate(streams):
        # A bare port is one dual-stack IPv6 socket (BindIPv6Only=both).
        ipv4 = re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", stream)
        assert domains[index] == ("INET" if ipv4 else "INET6"), (index, stream)
    out = subprocess.run([sys.executable, "-m", "relayd.cli", "check-config", "--config",
                          str(UNITS / "socket-activation.toml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr


# -- the system call filter, applied for real -------------------------------------------

#: Runs argv[2:] under a seccomp allow-list (argv[1], comma-separated): what
#: systemd does for SystemCallFilter= with SystemCallErrorNumber=EPERM.
_SECCOMP_LAUNCHER = """
import ctypes, ctypes.util, errno, os, sys
seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
ctx = seccomp.seccomp_init(ERRNO | errno.EPERM)
for name in sys.argv[1].split(",") + ["execve"]:  # systemd allows the exec itself
    number = seccomp.seccomp_syscall_resolve_name(name.encode())
    if number >= 0:  # negative: not a system call of this architecture
        assert seccomp.seccomp_rule_add(ctx, ALLOW, number, 0) == 0, name
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
assert seccomp.seccomp_load(ctypes.c_void_p(ctx)) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""

_groups: dict[str, set[str]] = {}


def syscall_group(name: str) -> set[str]:
    """A systemd system call group (``@system-service``), fully expanded."""
    if name not in _groups:
        out = subprocess.run([analyze(), "syscall-filter", "--no-pager", name],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        names: set[str] = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                names |= syscall_group(item) if item.startswith("@") else {item}
        _groups[name] = names
    return _groups[name]


def allowed_syscalls(unit: Path) -> set[str]:
    """What the unit's SystemCallFilter= lines allow: the first is an allow
    list, later ``~`` lines take groups out of it (systemd's semantics)."""
    allowed: set[str] = set()
    for line in unit_settings(unit)["Service"]["SystemCallFilter"]:
        deny = line.startswith("~")
        items = set()
        for item in line.lstrip("~").split():
            items |= syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - items if deny else allowed | items
    return allowed


def seccomp_launcher(unit: Path) -> list[str]:
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed")
    return [sys.executable, "-c", _SECCOMP_LAUNCHER, ",".join(sorted(allowed_syscalls(unit)))]


def test_the_filter_is_enforced() -> None:
    """setpriority() is in @resources, which the unit takes out: EPERM."""
    launcher = seccomp_launcher(UNITS / "relayd.service")
    out = subprocess.run([*launcher, sys.executable, "-c",
                          "import os; os.setpriority(os.PRIO_PROCESS, 0, 1)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "PermissionError" in out.stderr, out.stderr


def test_relayd_runs_under_the_units_system_call_filter(
        relay_factory, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start, relay a message, answer HTTP and the queue command, stop:
    all with only the system calls relayd.service allows."""
    launcher = seccomp_launcher(UNITS / "relayd.service")
    relay = relay_factory(start=False)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    relay.start([*launcher, sys.executable, "-m", "relayd.cli", "run", "--config",
                 str(relay.config_path)], wait=False)
    assert notify_socket.wait_for("READY")["MAINPID"] == str(relay.proc.pid)
    relay.wait_listening()
    with relay.smtp() as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: filtered\r\n\r\nhi\r\n")
    relay.wait_delivered(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.ports['http']}/status",
                                timeout=30) as response:
        assert json.load(response)["queue"] is not None
    listing = subprocess.run([sys.executable, "-m", "relayd.cli", "queue", "--config",
                              str(relay.config_path), "list"],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "not running" not in listing.stdout  # it asked the daemon
    relay.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING")
    assert relay.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Operation not permitted" not in relay.log()


# -- W^X: why MemoryDenyWriteExecute= is off -------------------------------------------

_MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
from twisted.internet import ssl
try:
    # A verifying client context: pyOpenSSL's set_verify() makes a cffi callback.
    ssl.optionsForClientTLS("smtp.example.org")
except MemoryError as e:
    print(e)
    sys.exit(1)
"""


def test_memory_deny_write_execute_only_if_tls_works_under_it() -> None:
    """MemoryDenyWriteExecute=yes (seccomp: no W+X mappings) breaks verified
    TLS to the smarthost while pyOpenSSL uses cffi callbacks.  The kernel's
    PR_SET_MDWE (Linux >= 6.3) enforces the same rule on this process, so
    the unit may turn it on only when this probe passes."""
    out = subprocess.run([sys.executable, "-c", _MDWE_PROBE], capture_output=True, text=True,
                         timeout=60)
    if out.returncode == 77:
        pytest.skip(f"the kernel has no PR_SET_MDWE: {os.uname().release}")
    works = out.returncode == 0
    for unit in ("relayd.service", "relayd@.service"):
        setting = unit_settings(UNITS / unit)["Service"].get("MemoryDenyWriteExecute", ["no"])
        if setting[-1] == "yes":
            assert works, f"{unit}: MemoryDenyWriteExecute=yes, but {out.stdout}{out.stderr}"


# -- the instance examples ---------------------------------------------------------------


def test_instance_examples_pass_check_config() -> None:
    assert len(INSTANCES) >= 2
    for path in INSTANCES:
        out = subprocess.run([sys.executable, "-m", "relayd.cli", "check-config", "--config",
                              str(path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr


def test_instances_share_no_spool_port_or_http_port() -> None:
    """What relayd@.service's comments require of each instance file, also
    against relayd.service's shipped config."""
    reserved = {"tmp", "messages", "state", "corrupt"}  # relayd.service's spool entries
    seen: dict[str, Path] = {}
    # relayd.service runs one of these (they are alternatives to each other).
    for path in (ROOT / "etc/relayd/relayd.toml", ROOT / "packaging/deb/relayd.toml"):
        if not path.exists():
            continue
        main = load(str(path))
        assert main.http.listen is not None
        for item in (main.server.spool, port_of(main.http.listen.description),
                     *(port_of(listener.listen.description) for listener in main.listeners),
                     *(r.maildir for r in main.routes.values() if r.maildir)):
            seen.setdefault(item, path)
    for path in INSTANCES:
        config = load(str(path))
        spool = config.server.spool
        assert spool.startswith("/var/spool/relayd/"), spool
        assert Path(spool).name not in reserved
        assert config.http.listen is not None
        owned = [spool, port_of(config.http.listen.description),
                 *(port_of(listener.listen.description) for listener in config.listeners),
                 *(r.maildir for r in config.routes.values() if r.maildir)]
        for item in owned:
            assert item not in seen, f"{path} and {seen[item]} both use {item}"
            seen[item] = path


def port_of(description: str) -> str:
    """``tcp:8026:interface=127.0.0.1`` -> ``tcp:8026`` (addresses aside: the
    examples keep instances apart by port)."""
    kind, port = description.split(":")[:2]
    return f"{kind.replace('tcp6', 'tcp')}:{port}"

