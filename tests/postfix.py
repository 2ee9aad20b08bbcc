"""Postfix as a real upstream (smarthost) for tests: a private Postfix
instance, and ``Sink``, Postfix's smtp-sink.

``PrivatePostfix`` has its own config, queue and data directories and loopback port, never the
system instance. It accepts mail from 127.0.0.0/8 and delivers everything
for ``example.net`` into one maildir, so a test can see what arrived.
Optionally offers STARTTLS with a given certificate.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import need
from tests.relay import wait_for

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostfix:
    def __init__(self, directory: Path, cert: Path | None = None, key: Path | None = None,
                 hostname: str = "smarthost.test", extra: dict | None = None) -> None:
        if not os.path.exists(POSTFIX) or not os.path.exists("/etc/postfix/master.cf"):
            pytest.skip("postfix is not installed")
        if os.geteuid() != 0:
            pytest.skip("a private postfix instance needs root")
        # Postfix's own users must reach these directories, and pytest's
        # temporary tree is private to root: use a world-traversable one.
        directory = Path(tempfile.mkdtemp(prefix="relayd-postfix-"))
        os.chmod(directory, 0o755)
        self.dir = directory
        self.conf = directory / "conf"
        self.queue = directory / "queue"
        self.data = directory / "data"
        self.mail = directory / "mail"
        self.maillog = directory / "maillog"
        self.cert, self.key, self.hostname = cert, key, hostname
        self.extra = extra or {}
        self.port = 0

    @property
    def delivered(self) -> list[Path]:
        new = self.mail / "outbox" / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    def start(self) -> PrivatePostfix:
        pw = pwd.getpwnam("postfix")
        for d in (self.conf, self.queue, self.data, self.mail):
            d.mkdir(parents=True, mode=0o755)
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        os.chown(self.mail, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "syslog_name": "postfix-relayd-test",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.dir,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "myhostname": self.hostname,
            "mydestination": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "virtual_mailbox_domains": "example.net",
            "virtual_mailbox_base": self.mail,
            "virtual_mailbox_maps": "static:outbox/",
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "virtual_minimum_uid": "1",
            "smtputf8_enable": "yes",
        }
        if self.cert and self.key:
            main.update({
                "smtpd_tls_cert_file": self.cert,
                "smtpd_tls_key_file": self.key,
                "smtpd_tls_security_level": "may",
                "smtpd_tls_loglevel": "1",
                "smtpd_tls_received_header": "yes",
            })
        main.update(self.extra)
        for k in [k for k, v in main.items() if v is None]:
            del main[k]
        with open(self.conf / "main.cf", "w") as f:
            for k, v in main.items():
                f.write(f"{k} = {v}\n")
        lines = []
        for line in open("/etc/postfix/master.cf"):
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "smtp" and parts[1] == "inet":
                line = line.replace("smtp", f"127.0.0.1:{self.port}", 1)
            lines.append(line)
        if not any(ln.split()[:2] == ["postlog", "unix-dgram"] for ln in lines if ln.strip()):
            lines.append("postlog   unix-dgram n  -       n       -       1       postlogd\n")
        (self.conf / "master.cf").write_text("".join(lines))
        subprocess.run([POSTCONF, "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True,
                       capture_output=True)
        for step in ("check", "start"):
            r = self._postfix(step)
            if r.returncode != 0:
                raise RuntimeError(f"postfix {step}: {r.stdout}{r.stderr}\n{self.log()[-2000:]}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"private postfix did not come up:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        if self.port:
            try:
                pid = int((self.queue / "pid" / "master.pid").read_text().strip())
            except (OSError, ValueError):
                pid = 0
            self._postfix("stop")
            deadline = time.monotonic() + 15
            while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            self.port = 0
        shutil.rmtree(self.dir, ignore_errors=True)


class Sink:
    """Postfix's smtp-sink: accepts (or rejects, with -f/-r) and dumps each message."""

    def __init__(self, directory: Path, *flags: str) -> None:
        self.binary = need("smtp-sink")
        # smtp-sink writes as "nobody": pytest's private tmp tree is out of reach.
        self.dir = Path(tempfile.mkdtemp(prefix="relayd-sink-"))
        os.chmod(self.dir, 0o777)
        self.flags = flags
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sink:
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [self.binary, *user, *self.flags, "-d", f"{self.dir}/%H%M%S.",
             f"127.0.0.1:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                assert self.proc is not None and self.proc.poll() is None, self.proc.stderr.read()
                return False

        wait_for(up, what="smtp-sink")
        return self

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
