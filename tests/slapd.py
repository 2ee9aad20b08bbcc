"""A private OpenLDAP slapd for tests: its own config, database and ports.

Debian's ``slapd`` package provides the binary; the system instance is never
configured or started (tests/run preseeds ``slapd/no_configuration``).  The
server listens on ``ldap://127.0.0.1:PORT`` (StartTLS) and
``ldaps://127.0.0.1:PORT`` with a certificate from ``tests.certs``, and is
filled with ``slapadd`` before it starts (no network round trips).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from attrs import define, field
from ldap3.utils.dn import escape_rdn

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret"
SERVICE_DN = f"cn=relayd,ou=services,{SUFFIX}"
SERVICE_PW = "service-secret"
PEOPLE = f"ou=people,{SUFFIX}"


def available() -> bool:
    return (
        os.access(SLAPD, os.X_OK)
        and os.access(SLAPADD, os.X_OK)
        and (SCHEMA_DIR / "core.schema").exists()
        and (MODULE_DIR / "back_mdb.so").exists()
    )


def ssha(password: str) -> str:
    """``{SSHA}`` userPassword value (salted SHA-1, what slappasswd makes)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@define
class User:
    uid: str
    password: str
    mail: tuple[str, ...] = ()
    cn: str = ""


@define
class Slapd:
    """Start with :meth:`start`, stop with :meth:`stop` (by PID)."""

    directory: Path
    cert: Path
    key: Path
    ca: Path
    users: list[User] = field(factory=list)
    ldap_port: int = 0
    ldaps_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ldaps_mismatch_url(self) -> str:
        return f"ldaps://127.0.0.2:{self.ldaps_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "slapd.log"

    def _config(self) -> str:
        d = self.directory
        schemas = "\n".join(
            f"include {SCHEMA_DIR / name}.schema"
            for name in ("core", "cosine", "inetorgperson", "nis")
        )
        return f"""\
{schemas}
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath {MODULE_DIR}
moduleload back_mdb
TLSCACertificateFile {self.ca}
TLSCertificateFile {self.cert}
TLSCertificateKeyFile {self.key}
loglevel stats

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {d}/db

access to attrs=userPassword
    by anonymous auth
    by self read
    by * none
access to *
    by * read
"""

    def _ldif(self) -> str:
        parts = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
            "dc: example\no: Example\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: relayd\nuserPassword: {ssha(SERVICE_PW)}\n",
        ]
        for u in self.users:
            entry = (
                f"dn: uid={escape_rdn(u.uid)},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {u.uid}\n"
                f"cn: {u.cn or u.uid}\nsn: {u.uid}\nuserPassword: {ssha(u.password)}\n"
            )
            entry += "".join(f"mail: {m}\n" for m in u.mail)
            parts.append(entry)
        return "\n".join(parts)

    def start(self, timeout: float = 10.0) -> None:
        d = self.directory
        (d / "db").mkdir(parents=True, exist_ok=True)
        conf = d / "slapd.conf"
        conf.write_text(self._config())
        (d / "data.ldif").write_text(self._ldif())
        added = subprocess.run(
            [SLAPADD, "-q", "-f", str(conf), "-l", str(d / "data.ldif")],
            capture_output=True, text=True,
        )
        if added.returncode != 0:
            raise RuntimeError(f"slapadd failed: {added.stdout}{added.stderr}")
        self.ldap_port = free_port()
        self.ldaps_port = free_port()
        # 127.0.0.2 (also loopback on Linux) is not in the certificate: a
        # name-mismatch target on the same server.
        urls = f"{self.ldap_url}/ {self.ldaps_url}/ ldaps://127.0.0.2:{self.ldaps_port}/"
        # -d: stay in the foreground (stopped by PID at teardown) and log the
        # operations to stderr, which tests read to see what was asked.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [SLAPD, "-d", "stats", "-f", str(conf), "-h", urls],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited: {self.log_path.read_text(errors='replace')}")
            try:
                for port in (self.ldap_port, self.ldaps_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("slapd did not start listening") from None
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory / "db", ignore_errors=True)
