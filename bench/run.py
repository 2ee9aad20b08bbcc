#!/usr/bin/env python3
"""Throughput / CPU / memory benchmark for relayd, with a private Postfix as the yardstick.

Workload (default): Postfix's ``smtp-source`` sends 20,000 messages of 10 KB over
20 parallel sessions (one connection per message) to the relay, which delivers
every message into one local maildir. For each selected relay the workload runs
3 times on a fresh spool and outbox, and the table shows medians:

* accept msgs/s   N / wall time of smtp-source (every 250 answered)
* e2e msgs/s      N / time from smtp-source start until all N files are in outbox/new
* CPU s           user+system CPU of the server process tree during the workload
                  (baseline taken just before smtp-source starts, final sample once
                  the server has gone idle after the last delivery)
* CPU ms/msg      CPU s / N
* peak RSS, PSS   max over the run of the sum over the server's processes
                  (/proc/PID/smaps_rollup sampled every 0.2 s)

The peer is a throw-away Postfix instance (own config, queue and data directories
under the bench's temp dir, own port on 127.0.0.1) that delivers with virtual(8)
into one maildir, like relayd's maildir route. The system Postfix is never
started or touched.

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


class RelaydServer:
    """`relayd run --config FILE` in the foreground, SMTP and HTTP on port 0."""

    kind = "relayd"
    LISTEN_RE = re.compile(r"listener (\S+) listening on [^\s:]+:(\d+)")
    PROBLEM_RE = re.compile(r"#(error|critical|warn)\]|Traceback|Unhandled|Exception")

    def __init__(self, key: str, command: str, rundir: str, concurrency: int) -> None:
        self.key = key
        self.command = command
        self.rundir = rundir
        self.concurrency = concurrency
        self.config = os.path.join(rundir, "relayd.toml")
        self.logfile = os.path.join(rundir, "relayd.log")
        self.logpath = self.logfile
        self.maildir_new = os.path.join(rundir, "outbox", "new")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.config, "w") as f:
            f.write(
                f'[server]\nhostname = "bench.test"\nspool = "{self.rundir}/spool"\n'
                f'[http]\nlisten = "tcp:0:interface=127.0.0.1"\n'
                f'[[listener]]\nname = "bench"\nlisten = "tcp:0:interface=127.0.0.1"\n'
                f'route = "outbox"\nmax_recipients = 1000\n'
                f'[route.outbox]\nmaildir = "{self.rundir}/outbox"\n'
                f"concurrency = {self.concurrency}\n"
            )
        logf = open(self.logfile, "wb")
        try:
            self.proc = subprocess.Popen(
                [self.command, "run", "--config", self.config],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.rundir, start_new_session=True,  # Ctrl-C is ours to handle
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
                    elif "status=bounced" in line:
                        bounced += 1
                    elif "NOQUEUE: reject" in line:
                        rejected += 1
                if self.PROBLEM_RE.search(line):
                    n_problems += 1
                    if len(problems) < 25:
                        problems.append(line.rstrip("\n"))
        return {"accepted": accepted, "sent": sent, "deferred": deferred, "bounced": bounced,
                "rejected": rejected, "problem_lines": n_problems, "problems": problems}


class PostfixServer:
    """A private Postfix instance: own config/queue/data dirs and port; virtual(8)
    delivers everything into <rundir>/mail/outbox/ (a maildir)."""

    kind = "postfix"
    PROBLEM_RE = re.compile(r"\b(warning|error|fatal|panic):")

    def __init__(self, rundir: str, concurrency: int) -> None:
        self.key = "postfix"
        self.rundir = rundir
        self.concurrency = concurrency
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

    @property
    def root_pid(self) -> int:
        return self.master_pid

    def alive(self) -> bool:
        return self.master_pid > 0 and os.path.exists(f"/proc/{self.master_pid}")

    def _postfix(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", self.confdir, *args], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        pw = pwd.getpwnam("postfix")
        for d in (self.confdir, self.queuedir, self.datadir, self.mailbase):
            os.makedirs(d, mode=0o755)
        os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        os.chown(self.mailbase, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        main_cf = {
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
            "virtual_mailbox_domains": "bench.test",
            "virtual_mailbox_base": self.mailbase,
            "virtual_mailbox_maps": "static:outbox/",  # trailing slash: maildir
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "virtual_minimum_uid": "1",
            "virtual_destination_concurrency_limit": str(self.concurrency),
        }
        with open(os.path.join(self.confdir, "main.cf"), "w") as f:
            f.write("# private benchmark instance written by relayd bench/run.py\n")
            for k, v in main_cf.items():
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
                elif "status=bounced" in line:
                    bounced += 1
                elif "NOQUEUE: reject" in line:
                    rejected += 1
                if self.PROBLEM_RE.search(line):
                    n_problems += 1
                    if len(problems) < 25:
                        problems.append(line.rstrip("\n"))
        return {"accepted": accepted, "sent": sent, "deferred": deferred, "bounced": bounced,
                "rejected": rejected, "problem_lines": n_problems, "problems": problems}


# --------------------------------------------------------------------------- one run


def run_once(make_server: Callable[[str], Any], label: str, idx: int, args: argparse.Namespace,
             workroot: str) -> dict[str, Any]:
    n = args.messages
    rundir = tempfile.mkdtemp(prefix=f"{label.replace(' ', '-')}-{idx}-", dir=workroot)
    os.chmod(rundir, 0o755)  # postfix's processes must traverse it
    server = make_server(rundir)
    sampler: MemSampler | None = None
    src: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"impl": label, "run": idx, "messages": n, "ok": False,
                              "errors": []}
    try:
        t_start = time.monotonic()
        server.start()
        result["startup_s"] = round(time.monotonic() - t_start, 3)
        sampler = MemSampler(server.root_pid, args.sample_interval)
        sampler.start()
        time.sleep(0.5)  # let the server settle after start-up
        usr0, sys0 = cpu_split(server.root_pid)
        cpu0 = usr0 + sys0
        busy0, steal0 = machine_busy_ticks()
        self0, kids0 = rusage_s(resource.RUSAGE_SELF), rusage_s(resource.RUSAGE_CHILDREN)

        cmd = [SMTP_SOURCE, "-s", str(args.sessions), "-l", str(args.size), "-m", str(n),
               "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT]
        if args.reuse_connections:
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

        source_deadline = t0 + args.source_timeout
        delivered = 0
        last_progress = t0
        t_e2e: float | None = None
        while True:
            now = time.monotonic()
            count = count_files(server.maildir_new)
            if count != delivered:
                delivered, last_progress = count, now
            if delivered >= n:
                t_e2e = now
                break
            if not server.alive():
                result["errors"].append("server process died during the run")
                break
            if "t" not in done:
                if now > source_deadline:
                    result["errors"].append(
                        f"smtp-source still running after {args.source_timeout:.0f} s: killed")
                    kill_pid(src.pid)
                    wt.join(10)
            elif now - max(last_progress, done["t"]) > args.stall_timeout:
                result["errors"].append(
                    f"delivery stalled: {delivered}/{n} in the maildir, no progress for "
                    f"{args.stall_timeout:.0f} s after smtp-source finished")
                break
            time.sleep(args.poll_interval)
        wt.join(args.source_timeout)
        if src in _LIVE:
            _LIVE.remove(src)

        if server.alive():
            wait_idle(server.root_pid)
            usr1, sys1 = cpu_split(server.root_pid)
            cpu1 = usr1 + sys1
        else:
            usr1, sys1, cpu1 = usr0, sys0, cpu0
            result["errors"].append("CPU not measured (server gone)")
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
        result["delivered"] = count_files(server.maildir_new)
        result["e2e_s"] = round(t_e2e - t0, 3) if t_e2e else None
        result["e2e_rate"] = round(n / (t_e2e - t0), 1) if t_e2e else None
        cpu_s = (cpu1 - cpu0) / CLK_TCK
        result["cpu_s"] = round(cpu_s, 2)
        result["cpu_ms_per_msg"] = round(1000 * cpu_s / n, 3)
        result["cpu_user_s"] = round((usr1 - usr0) / CLK_TCK, 2)
        result["cpu_sys_s"] = round((sys1 - sys0) / CLK_TCK, 2)
        result["sys_pct"] = round(100 * (sys1 - sys0) / (cpu1 - cpu0), 1) if cpu1 > cpu0 else None
        # Who else used the CPUs in the same window: smtp-source (the only child
        # reaped in it), this script (sampler, maildir polling), and everything
        # else on the machine ("other": a noisy neighbour makes the run suspect).
        result["client_cpu_s"] = round(kids1 - kids0, 2)
        result["bench_cpu_s"] = round(self1 - self0, 2)
        result["machine_busy_cpu_s"] = round((busy1 - busy0) / CLK_TCK, 2)
        result["other_cpu_s"] = round(
            (busy1 - busy0) / CLK_TCK - cpu_s - (kids1 - kids0) - (self1 - self0), 2)
        result["steal_s"] = round((steal1 - steal0) / CLK_TCK, 2)
        result["peak_rss_mb"] = round(sampler.peak_rss_kb / 1024, 1)
        result["peak_pss_mb"] = round(sampler.peak_pss_kb / 1024, 1)
        result["peak_processes"] = sampler.peak_procs
        result["mem_samples"] = sampler.samples
        result["log"] = server.log_summary()
        if result["delivered"] < n:
            result["errors"].append(f"only {result['delivered']}/{n} messages delivered")
        result["ok"] = not result["errors"]
        if not result["ok"]:
            logpath: str = server.logpath
            result["log_tail"] = tail(logpath, 15)
            # The run directory goes away; keep the server's log for the post-mortem.
            saved = os.path.join(args.workdir, f"relayd-bench-failed-{label.replace(' ', '-')}"
                                 f"-run{idx}-{time.strftime('%Y%m%d-%H%M%S')}.log")
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
        server.stop()
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            result["rundir"] = rundir
    return result


# --------------------------------------------------------------------------- report


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r["ok"]] or runs  # fall back to whatever was measured
    return {
        "impl": label,
        "runs": len(runs),
        "ok_runs": sum(1 for r in runs if r["ok"]),
        **{k: _median(good, k) for k in (
            "accept_rate", "e2e_rate", "cpu_s", "cpu_ms_per_msg", "peak_rss_mb",
            "peak_pss_mb", "accept_s", "e2e_s", "client_cpu_s", "other_cpu_s", "steal_s",
            "cpu_user_s", "cpu_sys_s", "sys_pct")},
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render_table(meta: dict[str, Any], medians: list[dict[str, Any]],
                 peer: dict[str, Any] | None) -> str:
    w = meta["workload"]
    out = [
        f"relayd benchmark  {meta['date']}  host {meta['host']}, {meta['cpus']} CPUs, "
        f"kernel {meta['kernel']}, workdir fs {meta['workdir_fs']}",
        f"relayd {meta['relayd_commit']}{' (+uncommitted changes)' if meta['relayd_dirty'] else ''}"
        f"; Postfix {meta.get('postfix_version') or '-'}",
        f"workload: smtp-source -s {w['sessions']} -l {w['size']} -m {w['messages']}"
        f"{' -d' if w['reuse_connections'] else ''} "
        f"({'connection reused' if w['reuse_connections'] else 'one connection per message'}), "
        f"1 rcpt, maildir delivery, concurrency {w['concurrency']}; "
        f"{w['runs']} run(s) each, MEDIANS shown",
    ]
    for key, info in meta.get("pythons", {}).items():
        out.append(f"  {key}: {info}")
    out.append("")
    head = (f"{'impl':<16} {'ok':>4} {'accept/s':>9} {'e2e/s':>8} {'CPU s':>7} {'sys%':>4}"
            f" {'CPU ms/msg':>10}"
            f" {'peak RSS MB':>11} {'peak PSS MB':>11} {'client s':>8} {'other s':>7}")
    if peer:
        head += f"  {'accept vs PF':>12} {'e2e vs PF':>9} {'CPU/msg vs PF':>13}"
    out.append(head)
    out.append("-" * len(head))
    for m in medians:
        line = (f"{m['impl']:<16} {m['ok_runs']}/{m['runs']:<2} {_fmt(m['accept_rate'], '9.0f')}"
                f" {_fmt(m['e2e_rate'], '8.0f')} {_fmt(m['cpu_s'], '7.1f')}"
                f" {_fmt(m['sys_pct'], '4.0f')}"
                f" {_fmt(m['cpu_ms_per_msg'], '10.2f')} {_fmt(m['peak_rss_mb'], '11.1f')}"
                f" {_fmt(m['peak_pss_mb'], '11.1f')} {_fmt(m['client_cpu_s'], '8.1f')}"
                f" {_fmt(m['other_cpu_s'], '7.1f')}")
        if peer:
            if m is peer:
                line += f"  {'1.00':>12} {'1.00':>9} {'1.00':>13}"
            else:
                line += (f"  {_fmt(_ratio(m['accept_rate'], peer['accept_rate']), '12.2f')}"
                         f" {_fmt(_ratio(m['e2e_rate'], peer['e2e_rate']), '9.2f')}"
                         f" {_fmt(_ratio(m['cpu_ms_per_msg'], peer['cpu_ms_per_msg']), '13.2f')}")
        out.append(line)
    out.append("")
    out.append("ratios are relayd / Postfix: >1 = relayd faster (accept, e2e); "
               ">1 = relayd uses more CPU per message.")
    out.append("CPU = server process tree (Postfix: master + all its daemons, incl. exited ones), "
               "not smtp-source. RSS/PSS = peak of the sum over the tree.")
    out.append("sys% = share of the server's CPU spent in the kernel (syscalls, fsync, TCP).")
    out.append("client s = CPU of smtp-source; other s = CPU used by everything else on the "
               "machine in the same window (background load: if it is more than a few s, the "
               "run was disturbed).")
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


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception:
        return ""


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark relayd (smtp-source -> relay -> maildir) against a private Postfix.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one short cell: 2,000 messages, 1 run (well under a minute)")
    p.add_argument("--python", choices=["venv", "debian", "both"], default="both",
                   help=f"relayd command(s): venv={PYTHONS['venv']}, debian={PYTHONS['debian']}")
    p.add_argument("--peer", choices=["postfix"], default="postfix",
                   help="also run the workload against a private Postfix instance")
    p.add_argument("--no-peer", dest="peer", action="store_const", const=None,
                   help="relayd only")
    p.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    p.add_argument("--size", type=int, default=10240, help="smtp-source -l (payload bytes)")
    p.add_argument("--messages", type=int, default=None,
                   help="smtp-source -m (default 20000, 2000 with --quick)")
    p.add_argument("--runs", type=int, default=None, help="runs per relay (default 3, 1 with --quick)")
    p.add_argument("--concurrency", type=int, default=20,
                   help="relayd route concurrency and Postfix virtual_destination_concurrency_limit")
    p.add_argument("--reuse-connections", action="store_true",
                   help="smtp-source -d: send all of a session's messages over one connection")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON to FILE")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the per-run spools/maildirs/queues go (must be a real disk)")
    p.add_argument("--keep", action="store_true", help="keep the per-run directories")
    p.add_argument("--poll-interval", type=float, default=0.1,
                   help="seconds between maildir counts (e2e resolution)")
    p.add_argument("--sample-interval", type=float, default=0.2,
                   help="seconds between RSS/PSS samples")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="give up when no message arrives for this long after smtp-source ended")
    p.add_argument("--source-timeout", type=float, default=None,
                   help="kill smtp-source after this many seconds (default 120 + N/20)")
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 2000 if args.quick else 20000
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.source_timeout is None:
        args.source_timeout = 120 + args.messages / 20
    return args


def _make_relayd(key: str, command: str, concurrency: int, rundir: str) -> RelaydServer:
    return RelaydServer(key, command, rundir, concurrency)


def _make_postfix(concurrency: int, rundir: str) -> PostfixServer:
    return PostfixServer(rundir, concurrency)


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


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT is installed even when inherited as ignored (background jobs of a
    # non-interactive shell): `kill -INT PID` must still clean up.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: keep ignoring it
        signal.signal(signal.SIGHUP, _on_signal)

    if not os.access(SMTP_SOURCE, os.X_OK):
        print(f"bench: {SMTP_SOURCE} not found (apt-get install postfix)", file=sys.stderr)
        return 2
    keys = ["venv", "debian"] if args.python == "both" else [args.python]
    impls: list[tuple[str, Callable[[str], Any]]] = []
    for key in keys:
        cmd = PYTHONS[key]
        if not os.access(cmd, os.X_OK):
            hint = (" (create it: /usr/bin/python3 -m venv --system-site-packages "
                    f"{REPO}/.venv-deb && {REPO}/.venv-deb/bin/pip install --no-deps -e {REPO})"
                    if key == "debian" else "")
            print(f"bench: {cmd} not found{hint}", file=sys.stderr)
            return 2
        impls.append((f"relayd {key}", functools.partial(
            _make_relayd, key, cmd, args.concurrency)))

    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "workdir": args.workdir, "workdir_fs": _fs_type(os.path.realpath(args.workdir)),
        "relayd_commit": _git("rev-parse", "--short", "HEAD") or "?",
        "relayd_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "relayd")),
        "workload": {"sessions": args.sessions, "size": args.size, "messages": args.messages,
                     "runs": args.runs, "reuse_connections": args.reuse_connections,
                     "concurrency": args.concurrency},
        "pythons": {key: _probe_python(PYTHONS[key]) for key in keys},
    }
    peer_note = None
    if args.peer == "postfix":
        if os.geteuid() != 0:
            peer_note = "Postfix peer skipped: needs root (postfix start, virtual(8) uid switch)"
        elif not (os.access(POSTFIX, os.X_OK) and os.path.exists("/etc/postfix/master.cf")):
            peer_note = "Postfix peer skipped: postfix or /etc/postfix/master.cf not installed"
        else:
            try:
                pwd.getpwnam("postfix")
                meta["postfix_version"] = subprocess.run(
                    [POSTCONF, "-d", "-h", "mail_version"], capture_output=True,
                    text=True).stdout.strip()
                impls.append(("postfix", functools.partial(_make_postfix, args.concurrency)))
            except (KeyError, OSError) as e:
                peer_note = f"Postfix peer skipped: {e}"
        if peer_note:
            log(peer_note)
            meta["peer_note"] = peer_note

    workroot = tempfile.mkdtemp(prefix="relayd-bench-", dir=args.workdir)
    os.chmod(workroot, 0o755)
    all_runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in impls}
    interrupted = False
    try:
        # Interleave the implementations run by run, so slow drift of the machine
        # (page cache, thermal, neighbours) hits all of them alike.
        for idx in range(1, args.runs + 1):
            for label, make in impls:
                log(f"{label}: run {idx}/{args.runs} ({args.messages} msgs)")
                r = run_once(make, label, idx, args, workroot)
                all_runs[label].append(r)
                log(f"{label}: run {idx}: accept {_fmt(r.get('accept_rate'), '.0f')}/s, "
                    f"e2e {_fmt(r.get('e2e_rate'), '.0f')}/s, cpu {_fmt(r.get('cpu_s'), '.1f')} s "
                    f"(user {_fmt(r.get('cpu_user_s'), '.1f')}, sys {_fmt(r.get('cpu_sys_s'), '.1f')}) "
                    f"({_fmt(r.get('cpu_ms_per_msg'), '.2f')} ms/msg), "
                    f"RSS {_fmt(r.get('peak_rss_mb'), '.0f')} MB, "
                    f"PSS {_fmt(r.get('peak_pss_mb'), '.0f')} MB, "
                    f"delivered {r.get('delivered', '?')}/{args.messages}, "
                    f"smtp-source cpu {_fmt(r.get('client_cpu_s'), '.1f')} s, "
                    f"other processes cpu {_fmt(r.get('other_cpu_s'), '.1f')} s, "
                    f"log {json.dumps({k: v for k, v in r.get('log', {}).items() if k != 'problems'})}"
                    + ("" if r["ok"] else f"  ERRORS: {r['errors']}"))
                for line in r.get("log", {}).get("problems", [])[:10]:
                    log(f"  {label} log: {line}")
                for line in r.get("log_tail", []) if not r["ok"] else []:
                    log(f"  {label} log tail: {line}")
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

    medians = [summarise(label, runs) for label, runs in all_runs.items() if runs]
    peer = next((m for m in medians if m["impl"] == "postfix"), None)
    table = render_table(meta, medians, peer)
    if peer_note:
        table += "\n" + peer_note
    print(table, flush=True)
    failed = [r for runs in all_runs.values() for r in runs if not r["ok"]]
    if failed:
        print("\nFAILED RUNS:")
        for r in failed:
            print(f"  {r['impl']} run {r['run']}: {'; '.join(r['errors'])}"
                  + (f" (server log kept in {r['saved_log']})" if r.get("saved_log") else ""))
    if args.json:
        ratios = {}
        if peer:
            for m in medians:
                if m is not peer:
                    ratios[m["impl"]] = {
                        "accept": _ratio(m["accept_rate"], peer["accept_rate"]),
                        "e2e": _ratio(m["e2e_rate"], peer["e2e_rate"]),
                        "cpu_per_msg": _ratio(m["cpu_ms_per_msg"], peer["cpu_ms_per_msg"]),
                    }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "medians": medians, "ratios_vs_postfix": ratios,
                       "runs": all_runs, "table": table, "interrupted": interrupted},
                      f, indent=2)
            f.write("\n")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
