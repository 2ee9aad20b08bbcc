#!/usr/bin/env python3
"""Throughput / CPU / memory benchmark for relayd, with a private Postfix as the yardstick.

Two workloads (``--workload``), both driven by Postfix's ``smtp-source`` (one new
connection per message, one recipient, N messages over S parallel sessions):

* ``relay`` (default): smtp-source -> relay -> ``smtp-sink``. The relay accepts each
  message into its spool and forwards it over SMTP to a private smtp-sink (Postfix's
  test server, answers 250 to everything). Matrix: sessions {20, 100} x size
  {1 KB, 10 KB, 100 KB}.
* ``maildir``: smtp-source -> relay -> one local maildir (20,000 x 10 KB, 20 sessions).

For each cell and each selected relay (relayd under two Pythons, and a private
Postfix instance) the workload runs 3 times on a fresh spool, and the table
shows medians:

* accept msgs/s   N / wall time of smtp-source (every 250 answered)
* e2e msgs/s      N / time from smtp-source start until all N messages arrived
                  (relay: smtp-sink's message counter; maildir: files in outbox/new)
* CPU s           user+system CPU of the server process tree during the workload
                  (baseline taken just before smtp-source starts, final sample once
                  the server has gone idle after the last delivery)
* CPU ms/msg      CPU s / N
* peak RSS, PSS   max over the run of the sum over the server's processes
                  (/proc/PID/smaps_rollup sampled every 0.2 s)

The peer is a throw-away Postfix instance (own config, queue and data directories
under the bench's temp dir, own port on 127.0.0.1) that relays to the same kind of
smtp-sink (relayhost), or delivers with virtual(8) into one maildir. The system
Postfix is never started or touched.

Stdlib only; see bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHONS = {
    "venv": os.path.join(REPO, ".venv", "bin", "relayd"),
    "debian": os.path.join(REPO, ".venv-deb", "bin", "relayd"),
}
PYTHON_LABELS = {"venv": "pyenv 3.11 (.venv)", "debian": "Debian python3 (.venv-deb)"}
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@bench.test"

# Defaults of the two workloads (see parse_args / README).
RELAY_SESSIONS = [20, 100]
RELAY_SIZES = [1024, 10240, 102400]
RELAY_MESSAGES = {1024: 20000, 10240: 20000, 102400: 5000}  # per size; others: 10000
QUICK_RELAY = {"sessions": 20, "size": 10240, "messages": 3000}
MAILDIR_DEFAULT = {"sessions": 20, "size": 10240, "messages": 20000}
QUICK_MAILDIR_MESSAGES = 2000

# PYTHONPATH for the relayd processes: a snapshot of relayd/ taken when the bench
# starts (see --no-snapshot), so that edits to the working tree during a long run
# cannot mix code versions between runs.
_RELAYD_ENV: dict[str, str] | None = None

# Everything this script started and has not stopped yet; the finally in main()
# stops them all (by PID), also on Ctrl-C, SIGTERM or an exception.
_LIVE: list[Any] = []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, user ticks, system ticks) or None if the process is gone; each
    includes the reaped children's (utime+cutime, stime+cstime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    # fields[0] is state (field 3 of stat(5)); utime is field 14 -> index 11.
    ppid = int(fields[1])
    return ppid, int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14])


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def process_tree(root: int) -> list[int]:
    """root and all its live descendants."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def cpu_ticks(root: int) -> int:
    return sum(cpu_split(root))


def cpu_split(root: int) -> tuple[int, int]:
    """(user, system) CPU ticks used by root's tree: each live process's own time plus the time of
    the children it has reaped (cutime/cstime), so exited workers (Postfix's smtpd
    after max_use, ...) are counted exactly once, through their parent."""
    user = system = 0
    for pid in process_tree(root):
        st = _stat(pid)
        if st is not None:
            user += st[1]
            system += st[2]
    return user, system


def _rollup(pid: int) -> tuple[int, int]:
    """(Rss kB, Pss kB) from smaps_rollup; (0, 0) if gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class MemSampler(threading.Thread):
    """Samples the summed RSS/PSS of a process tree every `interval` s; keeps the max."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="mem-sampler")
        self.root = root
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_procs = 0
        self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = process_tree(self.root)
        rss = pss = 0
        for pid in pids:
            r, p = _rollup(pid)
            rss += r
            pss += p
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, steal) ticks of the whole machine from /proc/stat: user+nice+system+irq+softirq
    (iowait and idle are not busy); steal = time the hypervisor gave to other guests."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def rusage_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def count_files(path: str) -> int:
    try:
        with os.scandir(path) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_idle(root: int, window: float = 0.5, max_wait: float = 20.0) -> None:
    """Wait until root's tree stops burning CPU (finishing spool clean-up etc.)."""
    deadline = time.monotonic() + max_wait
    before = cpu_ticks(root)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_ticks(root)
        if now - before <= max(1, int(window * CLK_TCK * 0.04)):  # < ~4% of a core
            return
        before = now


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tail(path: str, n: int = 20) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []




# --------------------------------------------------------------------------- servers


class LogCounter:
    """Counts `status=sent` lines of a log file incrementally (only the new bytes
    are read on each call), so the drain check can poll a growing log cheaply."""

    def __init__(self, path: str, marker: str, needle: str = "status=sent") -> None:
        self.path = path
        self.marker = marker
        self.needle = needle
        self.offset = 0
        self.count = 0
        self._partial = b""

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.count
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        m, n = self.marker.encode(), self.needle.encode()
        self.count += sum(1 for ln in lines if m in ln and n in ln)
        return self.count


class Cell:
    """One point of the matrix: how smtp-source is run and the relays' concurrency."""

    def __init__(self, workload: str, sessions: int, size: int, messages: int,
                 concurrency: int, reuse_connections: bool = False,
                 backlog: int | None = None) -> None:
        self.workload = workload
        self.sessions = sessions
        self.size = size
        self.messages = messages
        self.concurrency = concurrency
        self.reuse_connections = reuse_connections
        self.backlog = backlog  # relayd's listen backlog; None = relayd's default

    @property
    def name(self) -> str:
        return f"{self.sessions} sessions x {human_size(self.size)}"

    def as_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "sessions": self.sessions, "size": self.size,
                "messages": self.messages, "concurrency": self.concurrency,
                "reuse_connections": self.reuse_connections, "relayd_backlog": self.backlog}


class SmtpSink:
    """Postfix's smtp-sink on a free loopback port: the upstream ("smarthost") of
    the relay workload. It answers 250 to everything and throws mail away; with -c
    it writes running counters (`sess=N quit=N mesg=N\\r`, flushed on every change)
    to its stdout, which goes to a file we read the last record of."""

    COUNTER_RE = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)\r")

    def __init__(self, rundir: str) -> None:
        self.rundir = rundir
        self.counter_file = os.path.join(rundir, "smtp-sink.counters")
        self.err_file = os.path.join(rundir, "smtp-sink.err")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.base = (0, 0, 0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def counters(self) -> tuple[int, int, int]:
        """(sessions ended, QUITs, messages received) since the sink started."""
        try:
            with open(self.counter_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256))
                data = f.read()
        except OSError:
            return 0, 0, 0
        found = self.COUNTER_RE.findall(data)
        if not found:
            return 0, 0, 0
        s, q, m = found[-1]
        return int(s), int(q), int(m)

    def received(self) -> int:
        return self.counters()[2] - self.base[2]

    def sessions(self) -> int:
        return self.counters()[0] - self.base[0]

    def cpu_ticks(self) -> int:
        st = _stat(self.pid) if self.alive() else None
        return st[1] + st[2] if st else 0

    def start(self) -> None:
        for attempt in range(3):
            self.port = free_port()
            cmd = [SMTP_SINK, "-c"]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]  # required when root; it drops to nobody after bind
            cmd += [f"127.0.0.1:{self.port}", "256"]
            with open(self.counter_file, "wb") as out, open(self.err_file, "wb") as err:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=err, start_new_session=True)
            _LIVE.append(self)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.alive():
                if self._probe():
                    # The probe is a session of its own: wait for its counter, then
                    # take it as the baseline.
                    while time.monotonic() < deadline and self.counters()[0] < 1:
                        time.sleep(0.02)
                    self.base = self.counters()
                    return
                time.sleep(0.05)
            self.stop()
            log(f"smtp-sink on port {self.port} did not come up (attempt {attempt + 1}): "
                + " ".join(tail(self.err_file, 3)))
        raise RuntimeError("smtp-sink did not start: " + " ".join(tail(self.err_file, 5)))

    def _probe(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.settimeout(5)
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                s.recv(512)
                return banner.startswith(b"220")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_pid(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                kill_pid(self.proc.pid)
                self.proc.wait(5)
        if self in _LIVE:
            _LIVE.remove(self)


class RelaydServer:
    """`relayd run --config FILE` in the foreground, SMTP and HTTP on port 0; one
    route: a maildir (maildir workload) or the smtp-sink as smarthost (relay)."""

    kind = "relayd"
    LISTEN_RE = re.compile(r"listener (\S+) listening on [^\s:]+:(\d+)")
    PROBLEM_RE = re.compile(r"#(error|critical|warn)\]|Traceback|Unhandled|Exception")

    def __init__(self, key: str, command: str, cell: Cell, rundir: str,
                 upstream_port: int = 0) -> None:
        self.key = key
        self.command = command
        self.rundir = rundir
        self.cell = cell
        self.upstream_port = upstream_port
        self.concurrency = cell.concurrency
        self.config = os.path.join(rundir, "relayd.toml")
        self.logfile = os.path.join(rundir, "relayd.log")
        self.logpath = self.logfile
        self.maildir_new = os.path.join(rundir, "outbox", "new")
        self.spool_messages = os.path.join(rundir, "spool", "messages")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.count_sent = LogCounter(self.logfile, "[relayd.mail#")

    @property
    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def queue_count(self) -> int:
        """Messages still in the spool."""
        return count_files(self.spool_messages)

    def config_text(self) -> str:
        backlog = f":backlog={self.cell.backlog}" if self.cell.backlog else ""
        text = (
            f'[server]\nhostname = "bench.test"\nspool = "{self.rundir}/spool"\n'
            f'[http]\nlisten = "tcp:0:interface=127.0.0.1"\n'
            f'[[listener]]\nname = "bench"\nlisten = "tcp:0:interface=127.0.0.1{backlog}"\n'
        )
        if self.cell.workload == "relay":
            text += (
                f'route = "up"\nmax_recipients = 1000\n'
                f'[route.up]\nsmarthost = ["127.0.0.1:{self.upstream_port}"]\n'
                f'tls = "none"\nconcurrency = {self.concurrency}\n'
            )
        else:
            text += (
                f'route = "outbox"\nmax_recipients = 1000\n'
                f'[route.outbox]\nmaildir = "{self.rundir}/outbox"\n'
                f"concurrency = {self.concurrency}\n"
            )
        return text

    def start(self, timeout: float = 60.0) -> None:
        with open(self.config, "w") as f:
            f.write(self.config_text())
        logf = open(self.logfile, "wb")
        try:
            self.proc = subprocess.Popen(
                [self.command, "run", "--config", self.config],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.rundir, start_new_session=True,  # Ctrl-C is ours to handle
                env=_RELAYD_ENV,
            )
        finally:
            logf.close()
        _LIVE.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.logfile, errors="replace") as f:
                m = self.LISTEN_RE.search(f.read())
            if m:
                self.port = int(m.group(2))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"relayd ({self.key}) did not start listening (exit code {self.proc.poll()}); "
            "log tail:\n  " + "\n  ".join(tail(self.logfile))
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kids = process_tree(self.proc.pid)[1:]
            kill_pid(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                log(f"relayd pid {self.proc.pid} ignored SIGTERM for 20 s; SIGKILL")
                kill_pid(self.proc.pid)
                self.proc.wait(10)
            # relayd forks nothing today; if it ever does, those are ours too.
            for pid in kids:
                kill_pid(pid)
        if self in _LIVE:  # only once really stopped: main() retries otherwise
            _LIVE.remove(self)

    def log_summary(self) -> dict[str, Any]:
        accepted = sent = deferred = bounced = rejected = 0
        problems: list[str] = []
        first_deferred: list[str] = []
        n_problems = 0
        try:
            f = open(self.logfile, errors="replace")
        except OSError:
            return {}
        with f:
            for line in f:
                if "[relayd.mail#" in line:
                    if ": from=<" in line:
                        accepted += 1
                    elif "status=sent" in line:
                        sent += 1
                    elif "status=deferred" in line:
                        deferred += 1
                        if len(first_deferred) < 5:
                            first_deferred.append(line.rstrip("\n"))
                    elif "status=bounced" in line:
                        bounced += 1
                        if len(first_deferred) < 5:
                            first_deferred.append(line.rstrip("\n"))
                    elif "NOQUEUE: reject" in line:
                        rejected += 1
                if self.PROBLEM_RE.search(line):
                    n_problems += 1
                    if len(problems) < 25:
                        problems.append(line.rstrip("\n"))
        return {"accepted": accepted, "sent": sent, "deferred": deferred, "bounced": bounced,
                "rejected": rejected, "problem_lines": n_problems,
                "problems": problems, "deferred_lines": first_deferred}


class PostfixServer:
    """A private Postfix instance: own config/queue/data dirs and port. Relay workload:
    relayhost = the smtp-sink; maildir workload: virtual(8) delivers everything into
    <rundir>/mail/outbox/ (a maildir)."""

    kind = "postfix"
    PROBLEM_RE = re.compile(r"\b(warning|error|fatal|panic):")
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, cell: Cell, rundir: str, upstream_port: int = 0) -> None:
        self.key = "postfix"
        self.rundir = rundir
        self.cell = cell
        self.upstream_port = upstream_port
        self.concurrency = cell.concurrency
        self.confdir = os.path.join(rundir, "conf")
        self.queuedir = os.path.join(rundir, "queue")
        self.datadir = os.path.join(rundir, "data")
        self.mailbase = os.path.join(rundir, "mail")
        self.maillog = os.path.join(rundir, "maillog")
        self.logpath = self.maillog
        self.maildir_new = os.path.join(self.mailbase, "outbox", "new")
        self.port = 0
        self.master_pid = 0
        self.started = False
        self.count_sent = LogCounter(self.maillog, "postfix-bench/")

    @property
    def root_pid(self) -> int:
        return self.master_pid

    def alive(self) -> bool:
        return self.master_pid > 0 and os.path.exists(f"/proc/{self.master_pid}")

    def queue_count(self) -> int:
        """Queue files left in maildrop/incoming/active/deferred/hold (deferred is hashed)."""
        n = 0
        for q in self.QUEUES:
            for _dirpath, _dirs, files in os.walk(os.path.join(self.queuedir, q)):
                n += len(files)
        return n

    def _postfix(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", self.confdir, *args], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def main_cf(self) -> dict[str, str]:
        pw = pwd.getpwnam("postfix")
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": self.queuedir,
            "data_directory": self.datadir,
            "mail_owner": "postfix",
            "syslog_name": "postfix-bench",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.rundir,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "myhostname": "bench.test",
            "mydestination": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
        }
        if self.cell.workload == "relay":
            cf.update({
                # Everything goes to the smtp-sink through the smtp(8) client; Postfix's
                # connection cache (smtp_connection_cache_on_demand = yes) is left on
                # its default, as is everything else not listed here.
                "relayhost": f"[127.0.0.1]:{self.upstream_port}",
                "smtp_tls_security_level": "none",
                "default_destination_concurrency_limit": str(self.concurrency),
            })
        else:
            cf.update({
                "virtual_mailbox_domains": "bench.test",
                "virtual_mailbox_base": self.mailbase,
                "virtual_mailbox_maps": "static:outbox/",  # trailing slash: maildir
                "virtual_uid_maps": f"static:{pw.pw_uid}",
                "virtual_gid_maps": f"static:{pw.pw_gid}",
                "virtual_minimum_uid": "1",
                "virtual_destination_concurrency_limit": str(self.concurrency),
            })
        return cf

    def start(self) -> None:
        pw = pwd.getpwnam("postfix")
        for d in (self.confdir, self.queuedir, self.datadir, self.mailbase):
            os.makedirs(d, mode=0o755)
        os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        os.chown(self.mailbase, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        with open(os.path.join(self.confdir, "main.cf"), "w") as f:
            f.write("# private benchmark instance written by relayd bench/run.py\n")
            for k, v in self.main_cf().items():
                f.write(f"{k} = {v}\n")
        # master.cf: the system one, with the smtp inet service moved to our port.
        # chroot is turned off below (a chroot in a fresh queue dir would need
        # etc/ files copied in; Debian's init script does that for the system one).
        lines = []
        found = False
        with open("/etc/postfix/master.cf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "smtp" and parts[1] == "inet":
                    line = line.replace("smtp", f"127.0.0.1:{self.port}", 1)
                    found = True
                lines.append(line)
        if not found:
            raise RuntimeError("no 'smtp inet' service in /etc/postfix/master.cf")
        if not any(ln.split()[:2] == ["postlog", "unix-dgram"] for ln in lines if ln.strip()):
            lines.append("postlog   unix-dgram n  -       n       -       1       postlogd\n")
        with open(os.path.join(self.confdir, "master.cf"), "w") as f:
            f.writelines(lines)
        subprocess.run([POSTCONF, "-c", self.confdir, "-F", "*/*/chroot = n"],
                       check=True, capture_output=True, text=True)

        r = self._postfix("check")
        if r.returncode != 0:
            raise RuntimeError(f"postfix check failed ({r.returncode}): {r.stdout}{r.stderr}"
                               + "\n  ".join(["", *tail(self.maillog)]))
        _LIVE.append(self)
        self.started = True
        r = self._postfix("start")
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}): {r.stdout}{r.stderr}"
                               + "\n  ".join(["", *tail(self.maillog)]))
        pidfile = os.path.join(self.queuedir, "pid", "master.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    self.master_pid = int(f.read().strip())
            except (OSError, ValueError):
                self.master_pid = 0
            if self.master_pid and self.alive() and self._port_open():
                return
            time.sleep(0.1)
        raise RuntimeError("private postfix did not come up; maillog tail:\n  "
                           + "\n  ".join(tail(self.maillog)))

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.settimeout(5)
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                return banner.startswith(b"220")
        except OSError:
            return False

    def instance_pids(self) -> list[int]:
        """Every process of this instance: the master's tree, plus anything whose
        environment names our config dir (master passes MAIL_CONFIG to its children)."""
        pids = set(process_tree(self.master_pid)) if self.master_pid else set()
        needle = f"MAIL_CONFIG={self.confdir}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.add(int(entry))
            except OSError:
                continue
        pids.discard(os.getpid())
        return sorted(pids)

    def stop(self) -> None:
        if not self.started:
            if self in _LIVE:
                _LIVE.remove(self)
            return
        try:
            r = self._postfix("stop", timeout=60)
            if r.returncode != 0 and self.alive():
                log(f"postfix stop exited {r.returncode}: {r.stdout}{r.stderr}".strip())
        except subprocess.TimeoutExpired:
            log("postfix stop timed out")
        deadline = time.monotonic() + 15
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = self.instance_pids()
        if leftovers:
            log(f"killing leftover processes of the private postfix: {leftovers}")
            for pid in leftovers:
                kill_pid(pid)
        self.started = False
        if self in _LIVE:  # only once really stopped: main() retries otherwise
            _LIVE.remove(self)

    def log_summary(self) -> dict[str, Any]:
        accepted = sent = deferred = bounced = rejected = 0
        problems: list[str] = []
        first_deferred: list[str] = []
        n_problems = 0
        try:
            f = open(self.maillog, errors="replace")
        except OSError:
            return {}
        with f:
            for line in f:
                if "/cleanup[" in line and ": message-id=" in line:
                    accepted += 1
                elif "status=sent" in line:
                    sent += 1
                elif "status=deferred" in line:
                    deferred += 1
                    if len(first_deferred) < 5:
                        first_deferred.append(line.rstrip("\n"))
                elif "status=bounced" in line:
                    bounced += 1
                    if len(first_deferred) < 5:
                        first_deferred.append(line.rstrip("\n"))
                elif "NOQUEUE: reject" in line:
                    rejected += 1
                if self.PROBLEM_RE.search(line):
                    n_problems += 1
                    if len(problems) < 25:
                        problems.append(line.rstrip("\n"))
        return {"accepted": accepted, "sent": sent, "deferred": deferred, "bounced": bounced,
                "rejected": rejected, "problem_lines": n_problems,
                "problems": problems, "deferred_lines": first_deferred}


# --------------------------------------------------------------------------- one run


def run_once(make_server: Callable[[Cell, str, int], Any], label: str, idx: int, cell: Cell,
             args: argparse.Namespace, workroot: str) -> dict[str, Any]:
    n = cell.messages
    relay = cell.workload == "relay"
    rundir = tempfile.mkdtemp(
        prefix=f"{label.replace(' ', '-')}-s{cell.sessions}-{cell.size}-{idx}-", dir=workroot)
    os.chmod(rundir, 0o755)  # postfix's processes must traverse it
    sink: SmtpSink | None = SmtpSink(rundir) if relay else None
    server: Any = None
    sampler: MemSampler | None = None
    src: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"impl": label, "run": idx, "messages": n, "ok": False,
                              "errors": [], "warnings": [], **cell.as_dict()}
    source_timeout = args.source_timeout or (120 + n / 10)
    try:
        if sink is not None:
            sink.start()
        server = make_server(cell, rundir, sink.port if sink else 0)
        t_start = time.monotonic()
        server.start()
        result["startup_s"] = round(time.monotonic() - t_start, 3)
        if sink is not None:
            result["upstream"] = f"smtp-sink 127.0.0.1:{sink.port} (pid {sink.pid})"

        def delivered_now() -> int:
            return sink.received() if sink is not None else count_files(server.maildir_new)

        sampler = MemSampler(server.root_pid, args.sample_interval)
        sampler.start()
        time.sleep(0.5)  # let the server settle after start-up
        usr0, sys0 = cpu_split(server.root_pid)
        cpu0 = usr0 + sys0
        sink0 = sink.cpu_ticks() if sink is not None else 0
        busy0, steal0 = machine_busy_ticks()
        self0, kids0 = rusage_s(resource.RUSAGE_SELF), rusage_s(resource.RUSAGE_CHILDREN)

        cmd = [SMTP_SOURCE, "-s", str(cell.sessions), "-l", str(cell.size), "-m", str(n),
               "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT]
        if cell.reuse_connections:
            cmd.append("-d")
        cmd.append(f"127.0.0.1:{server.port}")
        result["command"] = " ".join(cmd)
        done: dict[str, Any] = {}

        t0 = time.monotonic()
        src = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
        _LIVE.append(src)

        def waiter(p: subprocess.Popen[bytes] = src) -> None:
            out, err = p.communicate()
            done["t"] = time.monotonic()
            done["rc"] = p.returncode
            done["output"] = (out + err).decode(errors="replace").strip()

        wt = threading.Thread(target=waiter, daemon=True, name="smtp-source-wait")
        wt.start()

        source_deadline = t0 + source_timeout
        delivered = 0
        last_progress = t0
        t_e2e: float | None = None
        progress_at = t0 + 30
        while True:
            now = time.monotonic()
            count = delivered_now()
            if count != delivered:
                delivered, last_progress = count, now
            if delivered >= n:
                t_e2e = now
                break
            if not server.alive():
                result["errors"].append("server process died during the run")
                break
            if sink is not None and not sink.alive():
                result["errors"].append("smtp-sink died during the run")
                break
            if now >= progress_at:  # a sign of life for long runs
                log(f"  {label}: {now - t0:.0f} s: {delivered}/{n} delivered"
                    f"{'' if 't' in done else ', smtp-source running'}")
                progress_at = now + 30
            if "t" not in done:
                if now > source_deadline:
                    result["errors"].append(
                        f"smtp-source still running after {source_timeout:.0f} s: killed")
                    kill_pid(src.pid)
                    wt.join(10)
            elif now - max(last_progress, done["t"]) > args.stall_timeout:
                result["errors"].append(
                    f"delivery stalled: {delivered}/{n} "
                    f"{'received by smtp-sink' if relay else 'in the maildir'}, no progress "
                    f"for {args.stall_timeout:.0f} s after smtp-source finished")
                break
            time.sleep(args.poll_interval)
        wt.join(source_timeout)
        if src in _LIVE:
            _LIVE.remove(src)

        # Relay: the sink has everything; the relay must also have logged every
        # delivery and emptied its queue (a message sent but not removed would be
        # sent again after a restart).
        t_drained: float | None = None
        if relay and t_e2e is not None:
            deadline = time.monotonic() + args.drain_timeout
            while time.monotonic() < deadline and server.alive():
                if server.count_sent() >= n and server.queue_count() == 0:
                    t_drained = time.monotonic()
                    break
                time.sleep(0.1)
            if t_drained is None:
                result["errors"].append(
                    f"not drained {args.drain_timeout:.0f} s after the sink had all {n}: "
                    f"{server.count_sent()} status=sent logged, {server.queue_count()} "
                    "message(s) still queued")

        if server.alive():
            wait_idle(server.root_pid)
            usr1, sys1 = cpu_split(server.root_pid)
            cpu1 = usr1 + sys1
        else:
            usr1, sys1, cpu1 = usr0, sys0, cpu0
            result["errors"].append("CPU not measured (server gone)")
        sink1 = sink.cpu_ticks() if sink is not None else 0
        busy1, steal1 = machine_busy_ticks()
        self1, kids1 = rusage_s(resource.RUSAGE_SELF), rusage_s(resource.RUSAGE_CHILDREN)
        sampler.sample()
        sampler.stop()

        rc = done.get("rc")
        result["smtp_source_rc"] = rc
        if done.get("output"):
            result["smtp_source_output"] = done["output"][-2000:]
        if rc != 0:
            result["errors"].append(f"smtp-source exit code {rc}: {done.get('output', '')[-500:]}")
        accept_s = done["t"] - t0 if "t" in done else None
        result["accept_s"] = round(accept_s, 3) if accept_s else None
        result["accept_rate"] = round(n / accept_s, 1) if accept_s and rc == 0 else None
        result["delivered"] = delivered_now()
        result["e2e_s"] = round(t_e2e - t0, 3) if t_e2e else None
        result["e2e_rate"] = round(n / (t_e2e - t0), 1) if t_e2e else None
        result["drained_s"] = round(t_drained - t0, 3) if t_drained else None
        cpu_s = (cpu1 - cpu0) / CLK_TCK
        sink_s = (sink1 - sink0) / CLK_TCK
        result["cpu_s"] = round(cpu_s, 2)
        result["cpu_ms_per_msg"] = round(1000 * cpu_s / n, 3)
        result["cpu_user_s"] = round((usr1 - usr0) / CLK_TCK, 2)
        result["cpu_sys_s"] = round((sys1 - sys0) / CLK_TCK, 2)
        result["sys_pct"] = round(100 * (sys1 - sys0) / (cpu1 - cpu0), 1) if cpu1 > cpu0 else None
        # Who else used the CPUs in the same window: smtp-source (the only child
        # reaped in it), smtp-sink, this script (sampler, polling), and everything
        # else on the machine ("other": a noisy neighbour makes the run suspect).
        result["client_cpu_s"] = round(kids1 - kids0, 2)
        result["sink_cpu_s"] = round(sink_s, 2) if sink is not None else None
        result["bench_cpu_s"] = round(self1 - self0, 2)
        result["machine_busy_cpu_s"] = round((busy1 - busy0) / CLK_TCK, 2)
        result["other_cpu_s"] = round(
            (busy1 - busy0) / CLK_TCK - cpu_s - sink_s - (kids1 - kids0) - (self1 - self0), 2)
        result["steal_s"] = round((steal1 - steal0) / CLK_TCK, 2)
        result["peak_rss_mb"] = round(sampler.peak_rss_kb / 1024, 1)
        result["peak_pss_mb"] = round(sampler.peak_pss_kb / 1024, 1)
        result["peak_processes"] = sampler.peak_procs
        result["mem_samples"] = sampler.samples
        result["queued_at_end"] = server.queue_count()
        result["log"] = server.log_summary()
        lg = result["log"]
        if result["delivered"] < n:
            result["errors"].append(
                f"only {result['delivered']}/{n} messages "
                f"{'received by smtp-sink' if relay else 'delivered'} "
                f"(relay log: accepted {lg.get('accepted')}, sent {lg.get('sent')}, "
                f"deferred {lg.get('deferred')}, bounced {lg.get('bounced')}; "
                f"{result['queued_at_end']} still queued)")
        elif result["delivered"] > n:
            result["errors"].append(
                f"DUPLICATES: {result['delivered']} messages "
                f"{'received by smtp-sink' if relay else 'delivered'} for {n} sent")
        if relay and lg.get("sent") != n and not any("drained" in e for e in result["errors"]):
            result["errors"].append(f"relay log has {lg.get('sent')} status=sent for {n} messages")
        if lg.get("deferred") or lg.get("bounced"):
            result["warnings"].append(
                f"{lg.get('deferred')} deferral(s), {lg.get('bounced')} bounce(s) logged")

        if sink is not None:
            # Upstream connections: smtp-sink counts a session when it ends, so stop the
            # relay first (it QUITs its cached connections), then read the counter.
            server.stop()
            time.sleep(0.3)
            conns = sink.sessions()
            result["upstream_connections"] = conns
            result["msgs_per_connection"] = round(result["delivered"] / conns, 1) if conns else None
            # The sink counted every DATA it accepted; after the relay stopped it must
            # not have more than N (it would mean a message went out twice).
            after = sink.received()
            if after != result["delivered"]:
                result["errors"].append(
                    f"smtp-sink counter moved after the end of the run: {after} (was "
                    f"{result['delivered']})")
                result["delivered"] = after

        result["ok"] = not result["errors"]
        if not result["ok"]:
            logpath: str = server.logpath
            result["log_tail"] = tail(logpath, 15)
            # The run directory goes away; keep the server's log for the post-mortem.
            saved = os.path.join(
                args.workdir, f"relayd-bench-failed-{label.replace(' ', '-')}"
                f"-s{cell.sessions}-{cell.size}-run{idx}-{time.strftime('%Y%m%d-%H%M%S')}.log")
            try:
                shutil.copyfile(logpath, saved)
                result["saved_log"] = saved
            except OSError:
                pass
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        if src is not None and src.poll() is None:
            kill_pid(src.pid)
            src.wait(10)
        if src in _LIVE:
            _LIVE.remove(src)
        if sampler is not None:
            sampler.stop()
        if server is not None:
            server.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            result["rundir"] = rundir
    return result


# --------------------------------------------------------------------------- report

MEDIAN_KEYS = (
    "accept_rate", "e2e_rate", "cpu_s", "cpu_ms_per_msg", "peak_rss_mb", "peak_pss_mb",
    "accept_s", "e2e_s", "drained_s", "client_cpu_s", "sink_cpu_s", "other_cpu_s", "steal_s",
    "cpu_user_s", "cpu_sys_s", "sys_pct", "msgs_per_connection", "upstream_connections")


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r["ok"]] or runs  # fall back to whatever was measured
    return {
        "impl": label,
        "runs": len(runs),
        "ok_runs": sum(1 for r in runs if r["ok"]),
        **{k: _median(good, k) for k in MEDIAN_KEYS},
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def human_size(n: int) -> str:
    for unit, factor in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(B|K|KB|KIB|M|MB|MIB)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or e.g. 10KB)")
    unit = (m.group(2) or "B").upper()
    return int(m.group(1)) * (1024 * 1024 if unit.startswith("M") else
                              1024 if unit.startswith("K") else 1)


def _list_of(conv: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [conv(part) for part in text.split(",") if part.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def cell_ratios(medians: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    peer = next((m for m in medians if m["impl"] == "postfix"), None)
    if not peer:
        return {}
    return {m["impl"]: {
        "accept": _ratio(m["accept_rate"], peer["accept_rate"]),
        "e2e": _ratio(m["e2e_rate"], peer["e2e_rate"]),
        "cpu_per_msg": _ratio(m["cpu_ms_per_msg"], peer["cpu_ms_per_msg"]),
    } for m in medians if m is not peer}


def table_header(meta: dict[str, Any], cells: list[Cell]) -> list[str]:
    w = meta["workload"]
    out = [
        f"relayd benchmark  {meta['date']}  host {meta['host']}, {meta['cpus']} CPUs, "
        f"kernel {meta['kernel']}, workdir fs {meta['workdir_fs']}",
        f"relayd {meta['relayd_commit']}{' (+uncommitted changes)' if meta['relayd_dirty'] else ''}"
        + (f", snapshot {meta['relayd_snapshot']['sha256']}" if meta.get("relayd_snapshot")
           else ", live tree")
        + f"; Postfix {meta.get('postfix_version') or '-'}",
    ]
    if w["workload"] == "relay":
        out.append(
            "workload relay: smtp-source -> relay -> smtp-sink (127.0.0.1, no TLS); "
            f"smtp-source -s SESS -l SIZE -m N{' -d' if w['reuse_connections'] else ''} "
            f"({'connections reused' if w['reuse_connections'] else 'one connection per message'}"
            "), 1 rcpt; relayd [route.up] smarthost, tls = none, concurrency = "
            f"{w['concurrency']}, listen backlog "
            f"{w.get('relayd_backlog') or 'default (relayd: 1024)'}; Postfix relayhost, "
            f"default_destination_concurrency_limit = {w['concurrency']}, smtpd backlog 100")
    else:
        out.append(
            f"workload maildir: smtp-source -s SESS -l SIZE -m N"
            f"{' -d' if w['reuse_connections'] else ''} "
            f"({'connections reused' if w['reuse_connections'] else 'one connection per message'}"
            f"), 1 rcpt, delivery into one maildir, concurrency {w['concurrency']}, relayd listen "
            f"backlog {w.get('relayd_backlog') or 'default (relayd: 1024)'}")
    out.append("cells (sessions x size: messages): "
               + ", ".join(f"{c.sessions}x{human_size(c.size)}: {c.messages}" for c in cells)
               + f"; {w['runs']} run(s) each, MEDIANS shown")
    for key, info in meta.get("pythons", {}).items():
        out.append(f"  {key}: {info}")
    return out


def _columns(relay: bool, peer: bool) -> str:
    head = (f"{'sess':>4} {'size':>6} {'impl':<14} {'ok':>4} {'accept/s':>8} {'e2e/s':>7}"
            f" {'CPU s':>7} {'sys%':>4} {'CPU ms/msg':>10} {'RSS MB':>7} {'PSS MB':>7}")
    if relay:
        head += f" {'msg/conn':>8}"
    head += f" {'client s':>8}"
    if relay:
        head += f" {'sink s':>6}"
    head += f" {'other s':>7}"
    if peer:
        head += f"  {'accept vs PF':>12} {'e2e vs PF':>9} {'CPU/msg vs PF':>13}"
    return head


def table_rows(cell: Cell, medians: list[dict[str, Any]], peer: bool) -> list[str]:
    relay = cell.workload == "relay"
    ratios = cell_ratios(medians)
    rows = []
    for m in medians:
        line = (f"{cell.sessions:>4} {human_size(cell.size):>6} {m['impl']:<14}"
                f" {m['ok_runs']}/{m['runs']:<2} {_fmt(m['accept_rate'], '8.0f')}"
                f" {_fmt(m['e2e_rate'], '7.0f')} {_fmt(m['cpu_s'], '7.1f')}"
                f" {_fmt(m['sys_pct'], '4.0f')}"
                f" {_fmt(m['cpu_ms_per_msg'], '10.2f')} {_fmt(m['peak_rss_mb'], '7.1f')}"
                f" {_fmt(m['peak_pss_mb'], '7.1f')}")
        if relay:
            line += f" {_fmt(m['msgs_per_connection'], '8.1f')}"
        line += f" {_fmt(m['client_cpu_s'], '8.1f')}"
        if relay:
            line += f" {_fmt(m['sink_cpu_s'], '6.1f')}"
        line += f" {_fmt(m['other_cpu_s'], '7.1f')}"
        if peer:
            r = ratios.get(m["impl"])
            if m["impl"] == "postfix":
                line += f"  {'1.00':>12} {'1.00':>9} {'1.00':>13}"
            elif r:
                line += (f"  {_fmt(r['accept'], '12.2f')} {_fmt(r['e2e'], '9.2f')}"
                         f" {_fmt(r['cpu_per_msg'], '13.2f')}")
        rows.append(line)
    return rows


def table_footer(relay: bool) -> list[str]:
    out = [
        "ratios are relayd / Postfix: >1 = relayd faster (accept, e2e); "
        ">1 = relayd uses more CPU per message.",
        "CPU = server process tree (Postfix: master + all its daemons, incl. exited ones), "
        "not smtp-source" + (" or smtp-sink" if relay else "")
        + ". RSS/PSS = peak of the sum over the tree.",
        "sys% = share of the server's CPU spent in the kernel (syscalls, fsync, TCP).",
    ]
    if relay:
        out.append("e2e = until smtp-sink has received all N; msg/conn = N / SMTP sessions the "
                   "relay opened to smtp-sink (connection reuse).")
    out.append("client s = CPU of smtp-source" + ("; sink s = CPU of smtp-sink" if relay else "")
               + "; other s = CPU used by everything else on the machine in the same window "
               "(background load: if it is more than a few s, the run was disturbed).")
    return out


def render_table(meta: dict[str, Any], results: list[dict[str, Any]], cells: list[Cell],
                 peer: bool) -> str:
    relay = meta["workload"]["workload"] == "relay"
    out = table_header(meta, cells)
    out.append("")
    head = _columns(relay, peer)
    out.append(head)
    out.append("-" * len(head))
    for i, res in enumerate(results):
        if i and relay:
            out.append("")
        out.extend(table_rows(res["cell_obj"], res["medians"], peer))
    out.append("")
    out.extend(table_footer(relay))
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _probe_python(relayd_cmd: str) -> str:
    py = os.path.join(os.path.dirname(relayd_cmd), "python")
    code = ("import sys, twisted; "
            "lib = 'shared libpython' if 'libpython' in open('/proc/self/maps').read() "
            "else 'static libpython'; "
            "print(f'{sys.executable} -> {sys._base_executable} {sys.version.split()[0]} ({lib}), "
            "Twisted {twisted.__version__}')")
    try:
        r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
        return r.stdout.strip() or r.stderr.strip()[-200:]
    except Exception as e:
        return f"? ({e})"


def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def snapshot_relayd(dest: str) -> dict[str, Any]:
    """Copy REPO/relayd to dest/relayd and point the relayd processes at it (PYTHONPATH
    comes before the editable install's finder); returns what was snapshotted."""
    global _RELAYD_ENV
    import hashlib
    target = os.path.join(dest, "relayd")
    shutil.copytree(os.path.join(REPO, "relayd"), target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(target)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, target).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    env = dict(os.environ)
    env["PYTHONPATH"] = dest + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    _RELAYD_ENV = env
    return {"path": target, "sha256": digest.hexdigest()[:12]}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception:
        return ""


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark relayd against a private Postfix: smtp-source -> relay -> "
                    "smtp-sink (--workload relay, a sessions x size matrix) or -> maildir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", choices=["relay", "maildir"], default="relay",
                   help="relay: forward to a private smtp-sink (smarthost); "
                        "maildir: deliver into one local maildir")
    p.add_argument("--quick", action="store_true",
                   help=f"one short cell, 1 run: relay {QUICK_RELAY['sessions']} sessions x "
                        f"{human_size(QUICK_RELAY['size'])} x {QUICK_RELAY['messages']} messages "
                        f"(a few minutes); maildir {QUICK_MAILDIR_MESSAGES} messages")
    p.add_argument("--python", choices=["venv", "debian", "both"], default="both",
                   help=f"relayd command(s): venv={PYTHONS['venv']}, debian={PYTHONS['debian']}")
    p.add_argument("--peer", choices=["postfix"], default="postfix",
                   help="also run the workload against a private Postfix instance")
    p.add_argument("--no-peer", dest="peer", action="store_const", const=None,
                   help="relayd only")
    p.add_argument("--sessions", type=_list_of(int), default=None,
                   help="smtp-source -s, comma-separated list (a matrix axis); default "
                        f"relay {','.join(map(str, RELAY_SESSIONS))}, maildir "
                        f"{MAILDIR_DEFAULT['sessions']}")
    p.add_argument("--size", "--sizes", dest="sizes", type=_list_of(parse_size), default=None,
                   help="smtp-source -l (payload bytes, or 10KB), comma-separated list (a matrix "
                        f"axis); default relay {','.join(human_size(s) for s in RELAY_SIZES)}, "
                        f"maildir {human_size(MAILDIR_DEFAULT['size'])}")
    p.add_argument("--messages", type=_list_of(int), default=None,
                   help="smtp-source -m: one value for every cell, or one per size; default "
                        "relay " + ", ".join(f"{human_size(s)}: {m}"
                                             for s, m in RELAY_MESSAGES.items())
                        + f", maildir {MAILDIR_DEFAULT['messages']}")
    p.add_argument("--runs", type=int, default=None, help="runs per relay and cell "
                   "(default 3, 1 with --quick)")
    p.add_argument("--concurrency", default="20",
                   help="relayd route concurrency and Postfix's destination concurrency limit "
                        "(relay: default_destination_concurrency_limit; maildir: "
                        "virtual_destination_concurrency_limit); 'match' = the cell's sessions")
    p.add_argument("--backlog", type=int, default=None,
                   help="relayd's SMTP listen backlog (listen = \"tcp:0:...:backlog=N\"); default: "
                        "relayd's own (Twisted's 50). Postfix's smtpd listens with a backlog "
                        "of 100 (default_process_limit)")
    p.add_argument("--reuse-connections", action="store_true",
                   help="smtp-source -d: send all of a session's messages over one connection")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON to FILE "
                   "(rewritten after every cell, so a partial run leaves a partial file)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the per-run spools/maildirs/queues go (must be a real disk)")
    p.add_argument("--keep", action="store_true", help="keep the per-run directories")
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="run relayd from the live working tree (default: from a copy of "
                        "relayd/ taken when the bench starts, so that edits during a long "
                        "run do not mix versions)")
    p.add_argument("--poll-interval", type=float, default=0.1,
                   help="seconds between delivery counts (e2e resolution)")
    p.add_argument("--sample-interval", type=float, default=0.2,
                   help="seconds between RSS/PSS samples")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="give up when no message arrives for this long after smtp-source ended")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="relay: how long the relay may take, once the sink has all N, to log "
                        "every delivery and empty its queue")
    p.add_argument("--source-timeout", type=float, default=None,
                   help="kill smtp-source after this many seconds (default 120 + N/10)")
    args = p.parse_args(argv)
    relay = args.workload == "relay"
    if args.quick:
        q = QUICK_RELAY if relay else MAILDIR_DEFAULT
        args.sessions = args.sessions or [q["sessions"]]
        args.sizes = args.sizes or [q["size"]]
        args.messages = args.messages or [q["messages"] if relay else QUICK_MAILDIR_MESSAGES]
    elif relay:
        args.sessions = args.sessions or list(RELAY_SESSIONS)
        args.sizes = args.sizes or list(RELAY_SIZES)
        args.messages = args.messages or [RELAY_MESSAGES.get(s, 10000) for s in args.sizes]
    else:
        args.sessions = args.sessions or [MAILDIR_DEFAULT["sessions"]]
        args.sizes = args.sizes or [MAILDIR_DEFAULT["size"]]
        args.messages = args.messages or [MAILDIR_DEFAULT["messages"]]
    if len(args.messages) == 1:
        args.messages = args.messages * len(args.sizes)
    if len(args.messages) != len(args.sizes):
        p.error(f"--messages: give one value or one per size ({len(args.sizes)})")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.concurrency != "match":
        try:
            if int(args.concurrency) < 1:
                raise ValueError
        except ValueError:
            p.error("--concurrency: a positive integer or 'match'")
    return args


def make_cells(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for sessions in args.sessions:
        for size, messages in zip(args.sizes, args.messages):
            conc = sessions if args.concurrency == "match" else int(args.concurrency)
            cells.append(Cell(args.workload, sessions, size, messages, conc,
                              args.reuse_connections, args.backlog))
    return cells


def _make_relayd(key: str, command: str, cell: Cell, rundir: str,
                 upstream_port: int) -> RelaydServer:
    return RelaydServer(key, command, cell, rundir, upstream_port)


def _make_postfix(cell: Cell, rundir: str, upstream_port: int) -> PostfixServer:
    return PostfixServer(cell, rundir, upstream_port)


_SIGNALLED = False


def _on_signal(signum: int, frame: Any) -> None:
    """First signal: unwind (every finally stops what it started). Later ones are
    only reported, so that they cannot cut the clean-up short; every stop has its
    own timeout."""
    global _SIGNALLED
    if _SIGNALLED:
        log(f"signal {signum}: already stopping, please wait")
        return
    _SIGNALLED = True
    raise KeyboardInterrupt(f"signal {signum}")


def _log_run(label: str, r: dict[str, Any]) -> None:
    relay = r.get("workload") == "relay"
    log(f"{label}: run {r['run']}: accept {_fmt(r.get('accept_rate'), '.0f')}/s, "
        f"e2e {_fmt(r.get('e2e_rate'), '.0f')}/s"
        + (f" (drained {_fmt(r.get('drained_s'), '.1f')} s)" if relay else "")
        + f", cpu {_fmt(r.get('cpu_s'), '.1f')} s "
        f"(user {_fmt(r.get('cpu_user_s'), '.1f')}, sys {_fmt(r.get('cpu_sys_s'), '.1f')}) "
        f"({_fmt(r.get('cpu_ms_per_msg'), '.2f')} ms/msg), "
        f"RSS {_fmt(r.get('peak_rss_mb'), '.0f')} MB, "
        f"PSS {_fmt(r.get('peak_pss_mb'), '.0f')} MB, "
        f"{'received by sink' if relay else 'delivered'} {r.get('delivered', '?')}/{r['messages']}"
        + (f" over {r.get('upstream_connections', '?')} connections" if relay else "")
        + f", smtp-source cpu {_fmt(r.get('client_cpu_s'), '.1f')} s"
        + (f", smtp-sink cpu {_fmt(r.get('sink_cpu_s'), '.1f')} s" if relay else "")
        + f", other processes cpu {_fmt(r.get('other_cpu_s'), '.1f')} s, "
        f"log {json.dumps({k: v for k, v in r.get('log', {}).items() if k not in ('problems', 'deferred_lines')})}"
        + (f"  WARNINGS: {r['warnings']}" if r.get("warnings") else "")
        + ("" if r["ok"] else f"  ERRORS: {r['errors']}"))
    for line in r.get("log", {}).get("problems", [])[:10]:
        log(f"  {label} log: {line}")
    for line in r.get("log", {}).get("deferred_lines", [])[:5]:
        log(f"  {label} log (deferral/bounce): {line}")
    for line in r.get("log_tail", []) if not r["ok"] else []:
        log(f"  {label} log tail: {line}")


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT is installed even when inherited as ignored (background jobs of a
    # non-interactive shell): `kill -INT PID` must still clean up.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: keep ignoring it
        signal.signal(signal.SIGHUP, _on_signal)

    relay = args.workload == "relay"
    for tool, what in ((SMTP_SOURCE, True), (SMTP_SINK, relay)):
        if what and not os.access(tool, os.X_OK):
            print(f"bench: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 2
    keys = ["venv", "debian"] if args.python == "both" else [args.python]
    impls: list[tuple[str, Callable[..., Any]]] = []
    for key in keys:
        cmd = PYTHONS[key]
        if not os.access(cmd, os.X_OK):
            hint = (" (create it: /usr/bin/python3 -m venv --system-site-packages "
                    f"{REPO}/.venv-deb && {REPO}/.venv-deb/bin/pip install --no-deps -e {REPO})"
                    if key == "debian" else "")
            print(f"bench: {cmd} not found{hint}", file=sys.stderr)
            return 2
        impls.append((f"relayd {key}", functools.partial(_make_relayd, key, cmd)))

    cells = make_cells(args)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "workdir": args.workdir, "workdir_fs": _fs_type(os.path.realpath(args.workdir)),
        "relayd_commit": _git("rev-parse", "--short", "HEAD") or "?",
        "relayd_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "relayd")),
        "argv": sys.argv,
        "workload": {"workload": args.workload, "sessions": args.sessions, "sizes": args.sizes,
                     "messages": args.messages, "runs": args.runs,
                     "reuse_connections": args.reuse_connections,
                     "concurrency": args.concurrency, "relayd_backlog": args.backlog},
        "pythons": {key: _probe_python(PYTHONS[key]) for key in keys},
    }
    peer_note = None
    if args.peer == "postfix":
        if os.geteuid() != 0:
            peer_note = "Postfix peer skipped: needs root (postfix start, uid switches)"
        elif not (os.access(POSTFIX, os.X_OK) and os.path.exists("/etc/postfix/master.cf")):
            peer_note = "Postfix peer skipped: postfix or /etc/postfix/master.cf not installed"
        else:
            try:
                pwd.getpwnam("postfix")
                meta["postfix_version"] = subprocess.run(
                    [POSTCONF, "-d", "-h", "mail_version"], capture_output=True,
                    text=True).stdout.strip()
                impls.append(("postfix", _make_postfix))
            except (KeyError, OSError) as e:
                peer_note = f"Postfix peer skipped: {e}"
        if peer_note:
            log(peer_note)
            meta["peer_note"] = peer_note
    has_peer = any(label == "postfix" for label, _ in impls)

    total_msgs = sum(c.messages for c in cells) * args.runs * len(impls)
    log(f"{args.workload} workload: {len(cells)} cell(s) x {len(impls)} relay(s) x {args.runs} "
        f"run(s) = {len(cells) * len(impls) * args.runs} runs, {total_msgs} messages in all")

    results: list[dict[str, Any]] = []

    def write_json(interrupted: bool = False) -> None:
        if not args.json:
            return
        cells_out = [{"cell": r["cell_obj"].as_dict(), "medians": r["medians"],
                      "ratios_vs_postfix": cell_ratios(r["medians"]), "runs": r["runs"],
                      "elapsed_s": r.get("elapsed_s")} for r in results]
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "cells": cells_out,
                       "table": render_table(meta, results, cells, has_peer)
                       + ("\n" + peer_note if peer_note else ""),
                       "complete": len(results) == len(cells) and not interrupted,
                       "interrupted": interrupted}, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.json)

    workroot = tempfile.mkdtemp(prefix="relayd-bench-", dir=args.workdir)
    os.chmod(workroot, 0o755)
    if args.snapshot:
        try:
            meta["relayd_snapshot"] = snapshot_relayd(os.path.join(workroot, "src"))
        except BaseException:
            shutil.rmtree(workroot, ignore_errors=True)
            raise
        log(f"relayd code: snapshot {meta['relayd_snapshot']['sha256']} of {REPO}/relayd "
            f"(commit {meta['relayd_commit']}{', uncommitted changes' if meta['relayd_dirty'] else ''})")
    interrupted = False
    t_bench = time.monotonic()
    try:
        for ci, cell in enumerate(cells, 1):
            t_cell = time.monotonic()
            res: dict[str, Any] = {"cell_obj": cell, "runs": {label: [] for label, _ in impls},
                                   "medians": []}
            results.append(res)
            log(f"=== cell {ci}/{len(cells)}: {cell.name}, {cell.messages} messages, "
                f"concurrency {cell.concurrency}")
            # Interleave the implementations run by run, so slow drift of the machine
            # (page cache, thermal, neighbours) hits all of them alike.
            for idx in range(1, args.runs + 1):
                for label, make in impls:
                    log(f"{label}: {cell.name}: run {idx}/{args.runs} ({cell.messages} msgs)")
                    r = run_once(make, label, idx, cell, args, workroot)
                    res["runs"][label].append(r)
                    res["medians"] = [summarise(lb, rs) for lb, rs in res["runs"].items() if rs]
                    _log_run(label, r)
            res["elapsed_s"] = round(time.monotonic() - t_cell, 1)
            log(f"=== cell {ci}/{len(cells)} done in {res['elapsed_s']:.0f} s "
                f"(bench running {time.monotonic() - t_bench:.0f} s)")
            if len(cells) > 1:  # partial results, in case the matrix is cut short
                print(f"--- cell {ci}/{len(cells)} ({res['elapsed_s']:.0f} s): medians of "
                      f"{args.runs} run(s)", flush=True)
                print("\n".join([_columns(relay, has_peer),
                                 *table_rows(cell, res["medians"], has_peer)]) + "\n",
                      flush=True)
            write_json()
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"interrupted ({e or 'Ctrl-C'}); stopping everything")
    finally:
        for obj in list(reversed(_LIVE)):
            try:
                if isinstance(obj, subprocess.Popen):
                    if obj.poll() is None:
                        kill_pid(obj.pid)
                        obj.wait(10)
                    _LIVE.remove(obj)
                else:
                    obj.stop()
            except Exception as e:  # keep stopping the others
                log(f"while stopping {obj!r}: {e}")
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            log(f"kept {workroot}")

    results = [r for r in results if r["medians"]]
    for r in results:
        r["medians"] = [summarise(lb, rs) for lb, rs in r["runs"].items() if rs]
    table = render_table(meta, results, cells, has_peer)
    if peer_note:
        table += "\n" + peer_note
    print(table, flush=True)
    log(f"total time {time.monotonic() - t_bench:.0f} s")
    failed = [run for r in results for runs in r["runs"].values() for run in runs if not run["ok"]]
    if failed:
        print("\nFAILED RUNS:")
        for run in failed:
            print(f"  {run['impl']} {run['sessions']} sessions x {human_size(run['size'])} "
                  f"run {run['run']}: {'; '.join(run['errors'])}"
                  + (f" (server log kept in {run['saved_log']})" if run.get("saved_log") else ""))
    write_json(interrupted)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
