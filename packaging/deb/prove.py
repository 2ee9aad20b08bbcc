#!/usr/bin/python3
"""Prove the Debian package on a clean Debian 12, as root:

    packaging/deb/prove.py [--earlier OLD.deb] relayd_VERSION_all.deb

1. A clean bookworm root (debootstrap --variant=minbase), cached pristine in
   /var/cache/relayd-test/ and used through an overlay, so every run starts
   from the same clean system; downloaded .debs are cached there too.
2. ``apt install ./relayd_*.deb`` inside it (a chroot): apt pulls Debian's
   python3-twisted & co.; nothing comes from pip.
3. The installed /usr/bin/relayd runs from the chroot as the relayd user, with
   the installed /etc/relayd/relayd.toml, sharing this host's network: a
   message sent from here to 127.0.0.1:25 and one to :1025 land in the
   outbox maildir, 587 offers STARTTLS on the snakeoil certificate and
   refuses mail without AUTH.
4. With --earlier: that build is installed first; then the conffile is
   changed, a message is left deferred and one held in the spool, and
   ``apt install`` of the new .deb (relayd still running, as on a real
   upgrade) must keep the changed conffile and both messages.

Stdlib only, so it runs with Debian's /usr/bin/python3 outside any venv.
Environment: RELAYD_PROVE_CACHE (default /var/cache/relayd-test),
RELAYD_PROVE_MIRROR (default http://deb.debian.org/debian).
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

SUITE = "bookworm"
CACHE = Path(os.environ.get("RELAYD_PROVE_CACHE", "/var/cache/relayd-test"))
MIRROR = os.environ.get("RELAYD_PROVE_MIRROR", "http://deb.debian.org/debian")
SECURITY = "http://deb.debian.org/debian-security"
CONFIG = "/etc/relayd/relayd.toml"
OUTBOX = "/var/lib/relayd/outbox"
SPOOL = "/var/spool/relayd"
# The ports of the packaged config; if one is taken on this host (the chroot
# shares its network), they become port 0 and are read from relayd's log.
STOCK_PORTS = {"mta": 25, "local": 1025, "submission": 587, "http": 8025}
# A clean environment for everything run in the chroot: nothing from a venv
# or pyenv of the caller may leak in.
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}
_LISTENING = re.compile(r"(listener (\S+)|http) listening on ([^\s:]+|\[[^\]]+\]):(\d+)")
_started = time.monotonic()


class ProofFailed(Exception):
    pass


def step(message: str) -> None:
    print(f"== [{time.monotonic() - _started:6.1f}s] {message}", flush=True)


def check(condition: object, message: str) -> None:
    if not condition:
        raise ProofFailed(message)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise ProofFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def sh(*cmd: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a host command; on failure show its output and stop."""
    result = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            **kwargs)
    if result.returncode != 0:
        raise ProofFailed(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}")
    return result


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces etc. as octal escapes.
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(path) or point.startswith(prefix):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf that never follows a mount: a /dev or cache bind mount left
    behind must not be emptied with the rest."""
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", point])
    left = mounts_under(path)
    if left:
        print(f"warning: not removing {path}: still mounted: {left}", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# The clean root
# ---------------------------------------------------------------------------


def pristine_root() -> Path:
    """The cached clean bookworm root, made once (a rename makes it appear
    complete or not at all); never modified afterwards."""
    root = CACHE / f"{SUITE}-minbase"
    if root.is_dir():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    step(f"debootstrap --variant=minbase {SUITE} (cached in {root} for later runs)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{SUITE}-minbase.", dir=CACHE))
    try:
        sh("debootstrap", "--variant=minbase", SUITE, str(tmp), MIRROR)
        # Debian 12 as installed: with its point and security updates.
        (tmp / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} {SUITE} main\n"
            f"deb {MIRROR} {SUITE}-updates main\n"
            f"deb {SECURITY} {SUITE}-security main\n"
        )
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():  # not just a concurrent run that won
            raise
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return root


class Chroot:
    """A throwaway copy of the pristine root (an overlay), with /proc, /dev
    and the shared .deb cache mounted; everything undone on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.mounts: list[Path] = []

    def __enter__(self) -> Chroot:
        try:
            self._set_up()
        except BaseException:
            self.__exit__()  # undo the mounts made so far
            raise
        return self

    def _set_up(self) -> None:
        lower = pristine_root()
        upper, work = self.workdir / "upper", self.workdir / "work"
        for d in (self.root, upper, work):
            d.mkdir()
        try:
            self._mount("-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", target=self.root)
        except ProofFailed:
            # No overlayfs here: a plain copy is slower but as clean.
            step("overlayfs unavailable: copying the pristine root")
            self.root.rmdir()
            sh("cp", "-a", str(lower), str(self.root))
        self._mount("-t", "proc", "proc", target=self.root / "proc")
        self._mount("--bind", "/dev", target=self.root / "dev")
        archives = CACHE / "apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(archives), target=self.root / "var/cache/apt/archives")
        # Name resolution for apt; keep the .debs apt downloads (the `apt`
        # command deletes them by default) for the next run.
        shutil.copyfile("/etc/resolv.conf", self.root / "etc/resolv.conf")
        (self.root / "etc/apt/apt.conf.d/99relayd-prove").write_text(
            'Binary::apt::APT::Keep-Downloaded-Packages "true";\n')
        # Speed only, as in Debian's container images: no fsync per unpacked
        # file (the root is thrown away after the run).
        (self.root / "etc/dpkg/dpkg.cfg.d/99relayd-prove").write_text("force-unsafe-io\n")
        # No service starts from a maintainer script (there is no systemd in
        # here either: deb-systemd-invoke does nothing without /run/systemd).
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)

    def _mount(self, *args: str, target: Path) -> None:
        sh("mount", *args, str(target))
        self.mounts.append(target)

    def __exit__(self, *exc: object) -> None:
        # Anything still running inside (relayd, a stray helper) was started
        # by this proof: end it by PID before unmounting.
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for target in reversed(self.mounts):
            if subprocess.run(["umount", str(target)]).returncode != 0:
                time.sleep(0.5)
                if subprocess.run(["umount", str(target)]).returncode != 0:
                    subprocess.run(["umount", "--lazy", str(target)])
                    print(f"warning: {target} was busy; unmounted lazily", file=sys.stderr)
        self.mounts.clear()

    def processes(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "root") == str(self.root):
                        found.append(int(entry.name))
        return found

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """Run a command in the chroot; on failure show its output and stop."""
        result = subprocess.run(["chroot", str(self.root), *cmd], text=True, env=CHROOT_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise ProofFailed(f"(chroot) {' '.join(cmd)} exited {result.returncode}:\n"
                              f"{result.stdout}")
        return result


# ---------------------------------------------------------------------------
# relayd in the chroot
# ---------------------------------------------------------------------------


class Relayd:
    """The installed relayd, started the way relayd.service starts it: as
    the relayd user (plus group ssl-cert), with CAP_NET_BIND_SERVICE only."""

    def __init__(self, chroot: Chroot, log: Path) -> None:
        self.chroot = chroot
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self._offset = 0

    def start(self) -> None:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            # chroot and setpriv exec in turn, so the PID is relayd's.
            self.proc = subprocess.Popen(
                ["chroot", str(self.chroot.root), "setpriv", "--reuid=relayd",
                 "--regid=relayd", "--init-groups", "--inh-caps=-all,+net_bind_service",
                 "--ambient-caps=-all,+net_bind_service", "--",
                 "/usr/bin/relayd", "--config", CONFIG],
                stdout=out, stderr=subprocess.STDOUT, env={**CHROOT_ENV, "PYTHONUNBUFFERED": "1"})
        wanted = set(STOCK_PORTS)

        def listening() -> bool:
            assert self.proc is not None
            text = self.new_log()
            if self.proc.poll() is not None:
                raise ProofFailed(f"relayd exited {self.proc.returncode}:\n{text}")
            self.ports = {("http" if m.group(1) == "http" else m.group(2)): int(m.group(4))
                          for m in _LISTENING.finditer(text)}
            return wanted <= set(self.ports)

        wait_for(listening, "relayd to listen on 25, 1025, 587 and 8025")

    def new_log(self) -> str:
        return self.log.read_bytes()[self._offset:].decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ProofFailed("relayd did not stop within 40 s of SIGTERM") from None
        finally:
            self.proc = None
        # twistd re-raises the signal that stopped it; systemd counts a
        # SIGTERM exit as a clean stop.
        check(code in (0, -signal.SIGTERM), f"relayd exited {code} on SIGTERM:\n{self.new_log()}")


def message(subject: str) -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "app@example.org", "someone@example.net", subject
    m.set_content(f"{subject}: sent by packaging/deb/prove.py\n")
    return m


def send(port: int, subject: str) -> str:
    """Send one message over plain SMTP; return its queue id."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="prove.test", timeout=30) as s:
        s.ehlo()
        code, reply = s.mail("app@example.org")
        check(code == 250, f"MAIL on port {port}: {code} {reply!r}")
        code, reply = s.rcpt("someone@example.net")
        check(code == 250, f"RCPT on port {port}: {code} {reply!r}")
        code, reply = s.data(message(subject).as_bytes())
        check(code == 250, f"DATA on port {port}: {code} {reply!r}")
    match = re.search(rb"queued as (\S+)", reply)
    if match is None:
        raise ProofFailed(f"no queue id in {reply!r}")
    return match.group(1).decode()


def check_submission(port: int) -> None:
    """587: STARTTLS on the snakeoil certificate, AUTH only after it, and no
    mail without a login (the packaged user list is empty)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="prove.test", timeout=30) as s:
        s.ehlo()
        check(s.has_extn("starttls"), "587 does not offer STARTTLS")
        check(not s.has_extn("auth"), "587 offers AUTH before TLS")
        # The snakeoil certificate is self-signed: clients must be told to
        # accept it, which is the point of replacing it.
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo()
        check(s.has_extn("auth"), "587 does not offer AUTH after STARTTLS")
        try:
            s.login("nobody", "wrong")
        except smtplib.SMTPAuthenticationError as e:
            check(e.smtp_code == 535, f"a failed login got {e.smtp_code}")
        else:
            raise ProofFailed("587 accepted a login with an empty user list")
        code, reply = s.mail("app@example.org")
        check(code == 530, f"MAIL without AUTH on 587 got {code} {reply!r}, not 530")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stock_ports_free() -> bool:
    for port in STOCK_PORTS.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def queue_list(chroot: Chroot) -> dict[str, dict[str, Any]]:
    out = chroot.run("relayd", "queue", "--config", CONFIG, "list", "--json").stdout
    return {e["id"]: e for e in (json.loads(line) for line in out.splitlines()
                                 if line.startswith("{"))}


def deb_field(deb: Path, name: str) -> str:
    return sh("dpkg-deb", "--field", str(deb), name).stdout.strip()


def deb_conffile(deb: Path, workdir: Path) -> str:
    target = workdir / f"extract-{deb.stem}"
    sh("dpkg-deb", "-x", str(deb), str(target))
    return (target / CONFIG.lstrip("/")).read_text()


# ---------------------------------------------------------------------------
# The proof
# ---------------------------------------------------------------------------


def install(chroot: Chroot, deb: Path, upgrade: bool = False) -> None:
    shutil.copy(deb, chroot.path("/tmp"))
    step(f"apt install ./{deb.name}" + (" (upgrade)" if upgrade else ""))
    chroot.run("apt-get", "update", "-q")
    # The operator's command; --force-confold answers dpkg's conffile
    # question the way the README recommends for unattended upgrades.
    chroot.run("sh", "-c", f"cd /tmp && apt install -y -q -o Dpkg::Options::=--force-confold "
                           f"./{deb.name}")
    status = chroot.run("dpkg-query", "-W", "-f=${Status} ${Version}", "relayd").stdout
    check(status == f"install ok installed {deb_field(deb, 'Version')}", f"relayd: {status}")


def check_installed(chroot: Chroot) -> None:
    step("check the installed files, user and plugin")
    check(chroot.run("relayd", "--version").stdout.startswith("relayd "), "relayd --version")
    groups = chroot.run("id", "-nG", "relayd").stdout.split()
    check("ssl-cert" in groups, f"relayd is not in group ssl-cert: {groups}")
    for path, owner, mode in ((SPOOL, "relayd:relayd", "700"),
                              ("/etc/relayd/passwd", "root:relayd", "640")):
        got = chroot.run("stat", "-c", "%U:%G %a", path).stdout.split()
        check(got == [owner, mode], f"{path}: {got}, expected {owner} {mode}")
    check(chroot.path("/etc/relayd/passwd").stat().st_size == 0, "/etc/relayd/passwd not empty")
    check(CONFIG in chroot.run("dpkg-query", "--control-show", "relayd", "conffiles").stdout,
          f"{CONFIG} is not a conffile")
    # The twisted-plugins-cache trigger ran: twistd knows the plugin, and
    # the cache it needs was written by python3-twisted, not shipped by us.
    plugins = chroot.run("python3", "-c", "from twisted.plugin import getPlugins; "
                         "from twisted.application.service import IServiceMaker; "
                         "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))").stdout
    check("'relayd'" in plugins, f"twistd plugins: {plugins}")
    cache = chroot.path("/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache")
    check(cache.exists() and b"relayd_plugin" in cache.read_bytes(),
          "dropin.cache does not list relayd_plugin")
    owned = chroot.run("dpkg", "-L", "relayd").stdout.split()
    check(not any(p.endswith(("dropin.cache", "twisted/plugins/__init__.py",
                              "twisted/__init__.py")) for p in owned),
          "the package ships a Twisted plugin cache or __init__.py")
    # Run as relayd (with ssl-cert): it can read the snakeoil key.
    chroot.run("setpriv", "--reuid=relayd", "--regid=relayd", "--init-groups", "--",
               "relayd", "check-config", "--config", CONFIG)
    pip = list(chroot.path("/usr/local/lib").glob("python3*/dist-packages/*"))
    check(not pip, f"something was installed with pip: {pip}")


def use_free_ports(chroot: Chroot) -> None:
    """The chroot shares this host's ports: if the packaged ones are taken,
    run on port 0 (the file is otherwise as installed)."""
    if stock_ports_free():
        return
    step("a packaged port (25, 587, 1025, 8025) is in use on this host: using port 0")
    conf = chroot.path(CONFIG)
    text = conf.read_text()
    for port in STOCK_PORTS.values():
        text = re.sub(rf'"tcp:{port}(?=[:"])', '"tcp:0', text)
    conf.write_text(text)


def prove(new_deb: Path, earlier_deb: Path | None, workdir: Path) -> None:
    first = earlier_deb or new_deb
    with Chroot(workdir) as chroot:
        install(chroot, first)
        check_installed(chroot)
        use_free_ports(chroot)

        relayd = Relayd(chroot, workdir / "relayd.log")
        step("start /usr/bin/relayd as relayd in the chroot; relay through 25 and 1025")
        relayd.start()
        check("NO SMARTHOST IS CONFIGURED" in relayd.new_log(),
              "no start-up warning about the missing smarthost")
        ids = [send(relayd.ports["mta"], "via 25"), send(relayd.ports["local"], "via 1025")]
        outbox = chroot.path(OUTBOX) / "new"

        def delivered() -> list[Path]:
            return sorted(outbox.iterdir()) if outbox.is_dir() else []

        got = wait_for(lambda: len(delivered()) >= 2 and delivered(), "2 messages in the outbox")
        names = " ".join(p.name for p in got)
        check(all(i in names for i in ids), f"outbox {names} lacks {ids}")
        check("Subject: via 25" in got[0].read_text() + got[1].read_text(), "message content")
        check_submission(relayd.ports["submission"])

        if earlier_deb is None:
            relayd.stop()
            step("proof passed (no --earlier build: upgrade not tried)")
            return

        step("change the conffile: mail from 1025 to an unreachable smarthost")
        conf = chroot.path(CONFIG)
        # The route line of the [[listener]] named "local" (no table header
        # in between).
        changed = re.sub(r'(name = "local"\n(?:[^\[\n].*\n|\n)*?)route = "outbox"',
                         r'\1route = "nowhere"', conf.read_text(), count=1)
        check('route = "nowhere"' in changed, "could not find the 1025 listener in the conffile")
        changed += (f'\n# Changed by prove.py: nothing listens there.\n[route.nowhere]\n'
                    f'smarthost = ["127.0.0.1:{free_port()}"]\ntls = "none"\n')
        conf.write_text(changed)
        relayd.stop()
        relayd.start()
        deferred = send(relayd.ports["local"], "deferred")
        held = send(relayd.ports["local"], "held")
        chroot.run("relayd", "queue", "--config", CONFIG, "hold", held)
        wait_for(lambda: queue_list(chroot).get(deferred, {}).get("attempts", 0) >= 1,
                 "a failed delivery attempt of the deferred message")
        queued = queue_list(chroot)
        check(queued[deferred]["state"] == "deferred", f"not deferred: {queued[deferred]}")
        check(queued[held]["state"] == "held", f"not held: {queued[held]}")

        # As on a real system, relayd keeps running while dpkg unpacks; the
        # postinst would then restart it (systemd), which is done by hand here.
        install(chroot, new_deb, upgrade=True)
        step("check the upgrade kept the changed conffile and the queue")
        check(conf.read_text() == changed, "the changed conffile was not kept")
        packaged = deb_conffile(new_deb, workdir)
        dist = chroot.path(CONFIG + ".dpkg-dist")
        if packaged != deb_conffile(earlier_deb, workdir):
            check(dist.exists() and dist.read_text() == packaged,
                  "the new packaged conffile is not beside it as .dpkg-dist")
        check_installed(chroot)
        check(set(queue_list(chroot)) >= {deferred, held}, "the running relayd lost mail")
        relayd.stop()
        relayd.start()
        queued = queue_list(chroot)
        check({deferred, held} <= set(queued), f"queue after the upgrade: {sorted(queued)}")
        check(queued[held]["state"] == "held", f"no longer held: {queued[held]}")
        after = send(relayd.ports["mta"], "after the upgrade")
        wait_for(lambda: any(after in p.name for p in delivered()),
                 "the message sent after the upgrade in the outbox")
        relayd.stop()
        step(f"proof passed: {first.name} -> {new_deb.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("deb", type=Path, help="the relayd .deb to prove")
    parser.add_argument("--earlier", type=Path,
                        help="an earlier build: install it first, then upgrade to DEB")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, overlay) for inspection")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("prove.py: run as root (debootstrap, mount, chroot)", file=sys.stderr)
        return 2
    for tool in ("debootstrap", "chroot", "mount", "dpkg-deb"):
        if shutil.which(tool) is None:
            print(f"prove.py: {tool} is missing (apt install debootstrap)", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="relayd-prove."))
    try:
        prove(args.deb.resolve(), args.earlier.resolve() if args.earlier else None, workdir)
    except ProofFailed as e:
        print(f"PROOF FAILED: {e}", file=sys.stderr)
        log = workdir / "relayd.log"
        if log.exists():
            print(f"--- relayd log ---\n{log.read_text(errors='replace')[-4000:]}",
                  file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            remove_tree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
