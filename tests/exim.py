"""A private Exim 4.96 from Debian 12, unpacked, never installed.

Exim is the real MTA here that sends with BDAT (RFC 3030) when a server
offers CHUNKING; Python's smtplib cannot.  Debian's exim4 packages conflict
with the postfix package the tests install, so the .debs are fetched with
``apt-get download`` and unpacked with ``dpkg -x`` into a cache directory
(``$RELAYD_TEST_CACHE``, default ``/var/tmp/relayd-tests``: Exim re-executes
itself as its unprivileged user, so the tree must be world-readable, which a
home directory is not).  Exim insists
that its compiled-in user ``Debian-exim`` exists and is not root; rather
than add a user to the machine, the unpacked libnss-wrapper maps it to
``nobody`` through a private passwd file.

``python3 -m tests.exim`` fetches it (tests/run does, after apt-get update).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("exim4-daemon-light", "exim4-base", "libnss-wrapper")


def cache_dir() -> Path:
    base = Path(os.environ.get("RELAYD_TEST_CACHE") or "/var/tmp/relayd-tests")
    for d in (base, base / "exim4"):
        d.mkdir(mode=0o755, exist_ok=True)
    return base / "exim4"


def private_exim() -> Path:
    """The unpacked tree (``usr/sbin/exim4`` inside), fetched if absent."""
    root = cache_dir() / "root"
    exim = root / "usr/sbin/exim4"
    if exim.exists() and nss_wrapper(root).exists() and not exim.stat().st_mode & 0o4000:
        return root
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    # apt-get download fetches into the working directory; as root it warns
    # that _apt cannot write there, which is harmless.
    subprocess.run(["apt-get", "download", "-q", *PACKAGES], cwd=debs, check=True,
                   stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="root.", dir=cache_dir()))
    os.chmod(tmp, 0o755)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
    # Not setuid: the delivery process Exim re-executes as its own user must
    # keep LD_PRELOAD, which the loader ignores for a setuid binary.
    os.chmod(tmp / "usr/sbin/exim4", 0o755)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def nss_wrapper(root: Path) -> Path:
    return root / "usr/lib/x86_64-linux-gnu/libnss_wrapper.so"


class Exim:
    """Exim as a client: each ``send`` delivers one message to the smarthost
    at ``port`` in the foreground and returns Exim's verbose transcript
    (its side of the SMTP dialogue: ``SMTP>> BDAT 123 LAST``)."""

    def __init__(self, port: int) -> None:
        self.root = private_exim()
        # Exim's deliveries run as Debian-exim (nobody): its directory must
        # be reachable and writable by it.
        self.dir = Path(tempfile.mkdtemp(prefix="relayd-exim-"))
        os.chmod(self.dir, 0o777)
        for sub in ("spool", "log"):
            (self.dir / sub).mkdir(mode=0o777)
            os.chmod(self.dir / sub, 0o777)
        (self.dir / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nDebian-exim:x:65534:65534::/nonexistent:/bin/false\n")
        (self.dir / "group").write_text("root:x:0:\nDebian-exim:x:65534:\n")
        self.config = self.dir / "exim.conf"
        self.config.write_text(f"""
exim_path = {self.root}/usr/sbin/exim4
exim_user = Debian-exim
exim_group = Debian-exim
spool_directory = {self.dir}/spool
log_file_path = {self.dir}/log/%slog
primary_hostname = exim.test
qualify_domain = exim.test
never_users =
# The re-executed delivery process needs the NSS wrapper too.
keep_environment = LD_PRELOAD : NSS_WRAPPER_PASSWD : NSS_WRAPPER_GROUP
begin routers
smarthost:
  driver = manualroute
  transport = to_relayd
  route_list = * 127.0.0.1 byname
  self = send
begin transports
to_relayd:
  driver = smtp
  port = {port}
  hosts_try_chunking = *
  hosts_avoid_tls = *
begin retry
* * F,1m,1m
""")
        os.chmod(self.config, 0o644)

    def send(self, sender: str, recipient: str, message: bytes) -> str:
        env = dict(os.environ, LD_PRELOAD=str(nss_wrapper(self.root)),
                   NSS_WRAPPER_PASSWD=str(self.dir / "passwd"),
                   NSS_WRAPPER_GROUP=str(self.dir / "group"))
        done = subprocess.run(
            [str(self.root / "usr/sbin/exim4"), "-C", str(self.config), "-odf", "-oi", "-v",
             "-f", sender, recipient],
            input=message, capture_output=True, env=env, timeout=60,
        )
        transcript = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
        assert done.returncode == 0, transcript
        return transcript

    def mainlog(self) -> str:
        path = self.dir / "log" / "mainlog"
        return path.read_text() if path.exists() else ""


if __name__ == "__main__":
    print(private_exim(), file=sys.stderr)
