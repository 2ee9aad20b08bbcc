"""Run relayd as a real process for integration tests.

The relay binds port 0 and logs the ports it got; tests read them from the
log, so nothing races for a port number.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(
    r'(?:\[relayd#info\] |"message": ")(listener (\S+)|http) listening on ([^\s:]+|\[[^\]]+\]):(\d+)'
)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something true (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def config_text(spool: Path, outbox: Path, listener_extra: str = "", extra: str = "",
                route_extra: str = "", queue: str = "") -> str:
    return f"""
[server]
hostname = "relay.test"
spool = "{spool}"

[http]
listen = "tcp:0:interface=127.0.0.1"

[queue]
{queue}

[[listener]]
name = "mta"
listen = "tcp:0:interface=127.0.0.1"
route = "outbox"
{listener_extra}

[route.outbox]
maildir = "{outbox}"
{route_extra}
{extra}
"""


class Relay:
    """A relayd process with its own spool, outbox and config file."""

    def __init__(self, directory: Path, config: str | None = None, **config_args: Any) -> None:
        self.dir = directory
        self.spool = directory / "spool"
        self.outbox = directory / "outbox"
        self.config_path = directory / "relayd.toml"
        if config is None:
            config = config_text(self.spool, self.outbox, **config_args)
        self.config_path.write_text(config)
        self.log_path = directory / "relayd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self._log_offset = 0

    def start(self, args: list[str] | None = None, wait: bool = True) -> Relay:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        cmd = args or [sys.executable, "-m", "relayd.cli", "run", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        if wait:
            self.wait_listening()
        return self

    def new_log(self) -> str:
        return self.log_path.read_bytes()[self._log_offset:].decode("utf-8", "replace")

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def wait_listening(self) -> None:
        def bound() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"relayd exited {self.proc.returncode}:\n{self.new_log()}")
            text = self.new_log()
            ports = {}
            for m in _LISTENING.finditer(text):
                ports["http" if m.group(1) == "http" else m.group(2)] = int(m.group(4))
            if "relayd is running" in text or ("http" in ports and len(ports) >= 2):
                self.ports = ports
                return "recovered" in text or "http" in ports
            return False

        wait_for(bound, what="relayd to listen")

    @property
    def smtp_port(self) -> int:
        return next(p for name, p in self.ports.items() if name != "http")

    def smtp(self, listener: str | None = None) -> smtplib.SMTP:
        port = self.ports[listener] if listener else self.smtp_port
        return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)

    def delivered(self) -> list[Path]:
        new = self.outbox / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_delivered(self, count: int, timeout: float = 30) -> list[Path]:
        return wait_for(lambda: len(self.delivered()) >= count and self.delivered(), timeout,
                        f"{count} delivered messages")

    def queued(self) -> list[str]:
        d = self.spool / "messages"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
