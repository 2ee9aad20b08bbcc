#!/usr/bin/env python3
"""Throughput / latency / CPU / memory benchmark for relayd, with a private Postfix as the yardstick.

One command runs the whole comparison (bench/README.md): ``python3 bench/run.py --verify --big``.

Two workloads (``--workload``), both driven by Postfix's ``smtp-source`` (one new
connection per message, one recipient, N messages over S parallel sessions):

* ``relay`` (default): smtp-source -> relay -> ``smtp-sink``. The relay accepts each
  message into its spool and forwards it over SMTP to a private smtp-sink (Postfix's
  test server, answers 250 to everything). Matrix: sessions {20, 100} x size
  {1 KB, 10 KB, 100 KB}.
* ``maildir``: smtp-source -> relay -> one local maildir (20,000 x 10 KB, 20 sessions).

For each cell and each selected relay (relayd under two Pythons, and a private
Postfix instance) the workload runs 3 times on a fresh spool, interleaved, and the
tables show medians:

* e2e msgs/s      (N + probe msgs) / time from smtp-source start until all arrived
                  (relay: smtp-sink's message counter; maildir: files in outbox/new)
* accept msgs/s   messages answered 250 while smtp-source ran / its wall time
* p50/p99 ms      accept latency ("." -> 250) of a latency probe: sequential SMTP
                  sessions from the bench, one message of the cell's size each,
                  while smtp-source runs (smtp-source reports no latency)
* CPU s/1k        user+system CPU seconds of the server process tree per 1,000
                  messages (baseline just before smtp-source starts, final sample once
                  the server has gone idle after the last delivery)
* peak RSS, PSS   max over the run of the sum over the server's processes
                  (/proc/PID/smaps_rollup sampled every 0.2 s); relayd's largest
                  process also against the interpreter's import footprint
* ratios          relayd / Postfix per cell

--verify sends smtp-source's and the bench's own messages through every relay to a
capturing sink and checks each arrived byte-identical apart from the Received:
header; --big relays one 50 MB message and reports the relay's RSS growth.

The peer is a throw-away Postfix instance (own config, queue and data directories
under the bench's temp dir, own port on 127.0.0.1) that relays to the same kind of
smtp-sink (relayhost), or delivers with virtual(8) into one maildir. The system
Postfix is never started or touched.

Stdlib only; see bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import socketserver
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
PROBE_RECIPIENT = "probe@bench.test"  # the latency probe's messages
VERIFY_RECIPIENT = "verify@bench.test"  # --verify: the bench's own messages

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


def tree_memory(root: int) -> tuple[int, int, int, int]:
    """(sum of Rss kB, sum of Pss kB, number of processes, largest single Rss kB) of root's
    process tree."""
    rss = pss = proc_max = 0
    pids = process_tree(root)
    for pid in pids:
        r, p = _rollup(pid)
        rss += r
        pss += p
        proc_max = max(proc_max, r)
    return rss, pss, len(pids), proc_max


def vm_rss_kb(pid: int) -> int:
    """VmRSS of one process from /proc/PID/status (cheaper than smaps_rollup); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssSampler(threading.Thread):
    """--big: the summed VmRSS of a process tree (and its largest process) every `interval` s,
    keeping the peaks; fine-grained (20 ms) so that a short-lived buffer is not missed."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.root = root
        self.interval = interval
        self.peak_kb = 0
        self.peak_proc_kb = 0
        self.peak_at = 0.0
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (monotonic, summed kB)
        self._halt = threading.Event()

    def peak_between(self, t0: float, t1: float) -> int:
        """Peak summed kB of the samples taken in [t0, t1]."""
        return max((kb for t, kb in self.timeline if t0 <= t <= t1), default=0)

    def current(self) -> tuple[int, int]:
        sizes = [vm_rss_kb(pid) for pid in process_tree(self.root)]
        return sum(sizes), max(sizes, default=0)

    def run(self) -> None:
        while not self._halt.is_set():
            total, largest = self.current()
            now = time.monotonic()
            self.timeline.append((now, total))
            if total > self.peak_kb:
                self.peak_kb, self.peak_at = total, now
            self.peak_proc_kb = max(self.peak_proc_kb, largest)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


class MemSampler(threading.Thread):
    """Samples the summed RSS/PSS of a process tree every `interval` s; keeps the max."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="mem-sampler")
        self.root = root
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_proc_rss_kb = 0  # the largest single process
        self.peak_procs = 0
        self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        rss, pss, nprocs, proc_max = tree_memory(self.root)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_proc_rss_kb = max(self.peak_proc_rss_kb, proc_max)
        self.peak_procs = max(self.peak_procs, nprocs)
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




# --------------------------------------------------------------------------- SMTP in the bench


class SmtpError(Exception):
    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # the server's reply code, None: no (valid) reply


class SmtpClient:
    """A minimal blocking SMTP client (no pipelining, like smtp-source) for the latency probe,
    --verify and --big. TCP_NODELAY: the final ".", written on its own, must not wait for the
    ACK of the body (Nagle + delayed ACK would add up to 40 ms to every latency sample)."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        self.esmtp = ""
        self.dot_sent = False

    def reply(self) -> tuple[int, str]:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise SmtpError("connection closed by the server")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            raise SmtpError(f"bad reply {lines[-1][:80]!r}") from None
        return code, b"".join(lines).decode(errors="replace").strip()

    def expect(self, code: int, what: str) -> str:
        got, text = self.reply()
        if got != code:
            raise SmtpError(f"{what}: {text[:200]}", got)
        return text

    def command(self, line: str, code: int) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.expect(code, line.split(":")[0].split()[0])

    def hello(self, name: str = "client.bench.test") -> None:
        self.expect(220, "banner")
        self.esmtp = self.command(f"EHLO {name}", 250)

    def transaction(self, sender: str, recipients: list[str],
                    chunks: Iterable[bytes]) -> tuple[float, float]:
        """MAIL, RCPT, DATA, the (already dot-stuffed, CRLF-terminated) chunks, then "."
        written on its own. Returns (time the "." was written, time its 250 arrived)."""
        body8 = " BODY=8BITMIME" if "8BITMIME" in self.esmtp.upper() else ""
        self.command(f"MAIL FROM:<{sender}>{body8}", 250)
        for rcpt in recipients:
            self.command(f"RCPT TO:<{rcpt}>", 250)
        self.command("DATA", 354)
        for chunk in chunks:
            self.sock.sendall(chunk)
        t_dot = time.monotonic()
        self.sock.sendall(b".\r\n")
        self.dot_sent = True
        self.expect(250, "end of data")
        return t_dot, time.monotonic()

    def quit(self) -> None:
        try:
            self.command("QUIT", 221)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency: a line that begins with "." gets another one."""
    assert message.endswith(b"\r\n") or not message, "messages must end with CRLF"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest sample >= q % of the samples (p99 of 200
    samples is the 3rd largest; of fewer than 100 samples, the largest)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


def smtp_source_body(size: int) -> bytes:
    """The payload smtp-source -l SIZE sends (Postfix 3.7 smtp-source.c): SIZE bytes of 'X' in
    80-byte lines (CRLF included) that each start with a digit 1, 2, ... 9, 0, 1, ...; a last
    line without CRLF gets one (so the message is SIZE or SIZE + 2 bytes)."""
    lines = []
    full, rest = divmod(size, 80)
    for i in range(1, full + 1):
        if i * 80 < size:  # smtp-source marks line ends for i*80 < size only
            lines.append(b"0123456789"[i % 10:i % 10 + 1] + b"X" * 77 + b"\r\n")
        else:
            lines.append(b"X" * 80)
    if rest:
        lines.append(b"X" * rest)
    body = b"".join(lines)
    return body if body.endswith(b"\n") or not body else body + b"\r\n"


SMTP_SOURCE_HEAD = re.compile(
    rb"From: <[^>\r\n]*>\r\nTo: <[^>\r\n]*>\r\nDate: [^\r\n]+\r\nMessage-Id: <[^>\r\n]+>\r\n\r\n")


def bench_message(msgid: str, body: bytes, subject: str = "bench", extra: bytes = b"") -> bytes:
    """A message with every header a relay would otherwise add (From, To, Date, Message-Id),
    so that what a faithful relay passes on is exactly this plus its Received: header."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-Id: <{msgid}>\r\n").encode() + extra + b"\r\n"
    return head + body


class LatencyProbe(threading.Thread):
    """Sequential SMTP sessions to the relay under test while smtp-source loads it: one
    message of the cell's size each, `interval` s apart. Per sample: accept latency = from
    writing the final "." to reading the 250 (the relay making the message durable and
    answering), and session time = connect to the 221 after QUIT. The messages go to
    PROBE_RECIPIENT and are delivered like the others (the sink receives N + accepted)."""

    def __init__(self, port: int, size: int, interval: float, timeout: float = 60.0) -> None:
        super().__init__(daemon=True, name="latency-probe")
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.body = dot_stuff(smtp_source_body(size))
        self.accept_s: list[float] = []
        self.session_s: list[float] = []
        self.accepted_at: list[float] = []  # monotonic time of each 250 after "."
        self.errors = 0
        self.uncertain = 0  # "." written but no answer: the relay may or may not have it
        self.first_errors: list[str] = []
        self.in_flight = False
        self.lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        while True:
            with self.lock:  # stop() and the start of a transaction exclude each other
                if self._halt.is_set():
                    return
                self.in_flight = True
            n += 1
            t0 = time.monotonic()
            accepted = False
            c: SmtpClient | None = None
            try:
                c = SmtpClient(self.port, self.timeout)
                c.hello("probe.bench.test")
                msg = bench_message(f"probe.{os.getpid()}.{n}.{t0:.6f}@bench.test", b"",
                                    subject="latency probe")
                t_dot, t_250 = c.transaction(SENDER, [PROBE_RECIPIENT], (msg, self.body))
                accepted = True
                with self.lock:
                    self.accepted_at.append(t_250)
                    self.in_flight = False
                self.accept_s.append(t_250 - t_dot)
                c.quit()
                self.session_s.append(time.monotonic() - t0)
            except (OSError, SmtpError) as e:
                self.errors += 1
                if (not accepted and c is not None and c.dot_sent
                        and getattr(e, "code", None) is None):
                    self.uncertain += 1  # "." written, no answer: delivered or not?
                if len(self.first_errors) < 5:
                    self.first_errors.append(f"{type(e).__name__}: {e}")
                if c is not None:
                    c.close()
            finally:
                with self.lock:
                    self.in_flight = False
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """No new transaction starts after this; one in flight finishes (see settled)."""
        with self.lock:
            self._halt.set()

    def settled(self) -> bool:
        """Stopped, and no transaction in flight: len(accepted_at) is final."""
        with self.lock:
            return self._halt.is_set() and not self.in_flight

    def accepted(self) -> int:
        with self.lock:
            return len(self.accepted_at)

    def summary(self, t_window_end: float | None) -> dict[str, Any]:
        acc = [1000 * v for v in self.accept_s]
        ses = [1000 * v for v in self.session_s]
        return {
            "samples": len(acc),
            "accept_p50_ms": _round(percentile(acc, 50), 2),
            "accept_p99_ms": _round(percentile(acc, 99), 2),
            "accept_max_ms": _round(max(acc) if acc else None, 2),
            "session_p50_ms": _round(percentile(ses, 50), 2),
            "session_p99_ms": _round(percentile(ses, 99), 2),
            "messages": self.accepted(),
            "in_load_window": sum(1 for t in self.accepted_at
                                  if t_window_end is None or t <= t_window_end),
            "errors": self.errors, "uncertain": self.uncertain,
            "first_errors": self.first_errors,
        }


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


class CaptureSink:
    """A minimal ESMTP server in the bench process (one thread per connection) that keeps
    what it receives, unlike smtp-sink: for every message the envelope, the Received:
    header fields at its top (what the relay added) and the rest, dot-unstuffed, byte for
    byte -- or, beyond `keep_limit` bytes, only the rest's SHA-256 and length (--big)."""

    def __init__(self, keep_limit: int = 4 * 1024 * 1024) -> None:
        self.keep_limit = keep_limit
        self.messages: list[dict[str, Any]] = []
        self.sessions_count = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.server: socketserver.ThreadingTCPServer | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    def received(self) -> int:
        with self.lock:
            return len(self.messages)

    def sessions(self) -> int:
        with self.lock:
            return self.sessions_count

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def cpu_ticks(self) -> int:
        return 0  # it is part of the bench process

    def start(self) -> None:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            rbufsize = 256 * 1024
            timeout = 600

            def handle(self) -> None:
                try:
                    sink._session(self.rfile, self.connection)
                except (OSError, SmtpError) as e:
                    with sink.lock:
                        sink.errors.append(f"{type(e).__name__}: {e}")
                finally:
                    with sink.lock:
                        sink.sessions_count += 1

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="capture-sink")
        self.thread.start()
        _LIVE.append(self)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self in _LIVE:
            _LIVE.remove(self)

    def _session(self, rfile: Any, conn: socket.socket) -> None:
        conn.sendall(b"220 capture.bench.test ESMTP bench capture sink\r\n")
        sender: str | None = None
        rcpts: list[str] = []
        while True:
            line = rfile.readline(65536)
            if not line:
                return
            cmd = line.rstrip(b"\r\n").decode(errors="replace")
            verb = cmd[:4].upper()
            if verb == "EHLO":
                conn.sendall(b"250-capture.bench.test\r\n250-PIPELINING\r\n250-SIZE 0\r\n"
                             b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == "HELO":
                conn.sendall(b"250 capture.bench.test\r\n")
            elif verb == "MAIL":
                sender, rcpts = cmd[10:].strip(), []
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                if sender is None:
                    conn.sendall(b"503 5.5.1 Error: need MAIL command\r\n")
                else:
                    rcpts.append(cmd[8:].strip())
                    conn.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                if not rcpts:
                    conn.sendall(b"503 5.5.1 Error: need RCPT command\r\n")
                    continue
                conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                msg = self._data(rfile)
                msg.update({"sender": sender, "rcpts": rcpts, "t": time.monotonic()})
                with self.lock:
                    self.messages.append(msg)
                    n = len(self.messages)
                conn.sendall(f"250 2.0.0 Ok: queued as {n}\r\n".encode())
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "NOOP":
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 Error: command not recognized\r\n")

    def _data(self, rfile: Any) -> dict[str, Any]:
        """Read DATA up to the "." line: leading Received: fields apart, the rest hashed
        (and kept while it is within keep_limit)."""
        prefix: list[bytes] = []
        in_prefix, in_received, line_start = True, False, True
        digest = hashlib.sha256()
        kept: list[bytes] | None = []
        length = 0
        pending: list[bytes] = []
        pending_len = 0
        while True:
            line = rfile.readline(1 << 20)
            if not line:
                raise SmtpError("connection closed in DATA")
            if line_start:
                if line == b".\r\n":
                    break
                if line.startswith(b"."):
                    line = line[1:]
            was_start, line_start = line_start, line.endswith(b"\n")
            if in_prefix:
                if was_start and line[:9].lower() == b"received:":
                    in_received = True
                elif not (in_received and (not was_start or line[:1] in (b" ", b"\t"))):
                    in_prefix = False
                if in_prefix:
                    prefix.append(line)
                    continue
            pending.append(line)
            pending_len += len(line)
            if pending_len >= 1 << 20:
                chunk = b"".join(pending)
                digest.update(chunk)
                length += len(chunk)
                if kept is not None:
                    kept.append(chunk)
                    if length > self.keep_limit:
                        kept = None
                pending, pending_len = [], 0
        chunk = b"".join(pending)
        digest.update(chunk)
        length += len(chunk)
        if kept is not None:
            kept.append(chunk)
            if length > self.keep_limit:
                kept = None
        return {"prefix": b"".join(prefix), "sha256": digest.hexdigest(), "length": length,
                "data": b"".join(kept) if kept is not None else None}


def count_received(prefix: bytes) -> int:
    return sum(1 for line in prefix.split(b"\r\n") if line[:9].lower() == b"received:")


def first_difference(a: bytes, b: bytes) -> str:
    """Where two byte strings first differ, with a little context of each."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"first difference at byte {i} (lengths sent {len(a)}, received {len(b)}): "
            f"sent {a[max(0, i - 20):i + 30]!r}, received {b[max(0, i - 20):i + 30]!r}")


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
                 backlog: int | None = None, max_message_size: int | None = None,
                 relayd_extra: str = "") -> None:
        self.workload = workload
        self.sessions = sessions
        self.size = size
        self.messages = messages
        self.concurrency = concurrency
        self.reuse_connections = reuse_connections
        self.backlog = backlog  # relayd's listen backlog; None = relayd's default
        self.max_message_size = max_message_size  # --big: both relays' limit; None = default
        self.relayd_extra = relayd_extra  # --relayd-extra: TOML appended to relayd's config

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
        if self.cell.max_message_size:
            text += f"max_message_size = {self.cell.max_message_size}\n"
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
        return text + self.cell.relayd_extra

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
        if self.cell.max_message_size:
            cf["message_size_limit"] = str(self.cell.max_message_size)
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
    probe: LatencyProbe | None = None
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
        idle_rss, idle_pss, _procs, idle_proc = tree_memory(server.root_pid)
        result["idle_rss_mb"] = round(idle_rss / 1024, 1)
        result["idle_pss_mb"] = round(idle_pss / 1024, 1)
        result["idle_proc_rss_mb"] = round(idle_proc / 1024, 1)
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
        if args.probe_interval > 0:
            probe = LatencyProbe(server.port, cell.size, args.probe_interval)
            probe.start()

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
            if probe is not None and "t" in done:
                probe.stop()  # the probe samples while smtp-source runs
            # Until the probe has stopped, its message count is not final.
            settled = probe is None or probe.settled()
            expected = n + (probe.accepted() if probe is not None else 0)
            count = delivered_now()
            if count != delivered:
                delivered, last_progress = count, now
            if settled and delivered >= expected:
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
                    if probe is not None:
                        probe.stop()
            elif now - max(last_progress, done["t"]) > args.stall_timeout:
                result["errors"].append(
                    f"delivery stalled: {delivered}/{expected} "
                    f"{'received by smtp-sink' if relay else 'in the maildir'}, no progress "
                    f"for {args.stall_timeout:.0f} s after smtp-source finished")
                break
            time.sleep(args.poll_interval)
        wt.join(source_timeout)
        if src in _LIVE:
            _LIVE.remove(src)
        probe_msgs = probe_uncertain = probe_in_window = 0
        if probe is not None:
            probe.stop()
            probe.join(probe.timeout + 10)
            result["probe"] = probe.summary(done.get("t"))
            probe_msgs = result["probe"]["messages"]
            probe_uncertain = result["probe"]["uncertain"]
            probe_in_window = result["probe"]["in_load_window"]
            for key in ("samples", "accept_p50_ms", "accept_p99_ms", "session_p50_ms",
                        "session_p99_ms"):
                result[f"latency_{key}" if key == "samples" else key] = result["probe"][key]
            if result["probe"]["errors"]:
                result["warnings"].append(
                    f"latency probe: {result['probe']['errors']} failed session(s), e.g. "
                    + "; ".join(result["probe"]["first_errors"][:2]))
        # Everything the relay had to carry: smtp-source's N and the probe's messages.
        total = n + probe_msgs
        result["probe_messages"] = probe_msgs
        result["total_messages"] = total

        # Relay: the sink has everything; the relay must also have logged every
        # delivery and emptied its queue (a message sent but not removed would be
        # sent again after a restart).
        t_drained: float | None = None
        if relay and t_e2e is not None:
            deadline = time.monotonic() + args.drain_timeout
            while time.monotonic() < deadline and server.alive():
                if server.count_sent() >= total and server.queue_count() == 0:
                    t_drained = time.monotonic()
                    break
                time.sleep(0.1)
            if t_drained is None:
                result["errors"].append(
                    f"not drained {args.drain_timeout:.0f} s after the sink had all {total}: "
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
        # accept/s: what the relay answered 250 to while smtp-source ran (its N and the
        # probe's messages in that window); smtp-source's own rate is kept apart.
        result["accept_rate"] = (round((n + probe_in_window) / accept_s, 1)
                                 if accept_s and rc == 0 else None)
        result["source_accept_rate"] = round(n / accept_s, 1) if accept_s and rc == 0 else None
        result["delivered"] = delivered_now()
        result["e2e_s"] = round(t_e2e - t0, 3) if t_e2e else None
        result["e2e_rate"] = round(total / (t_e2e - t0), 1) if t_e2e else None
        result["drained_s"] = round(t_drained - t0, 3) if t_drained else None
        cpu_s = (cpu1 - cpu0) / CLK_TCK
        sink_s = (sink1 - sink0) / CLK_TCK
        result["cpu_s"] = round(cpu_s, 2)
        result["cpu_ms_per_msg"] = round(1000 * cpu_s / total, 3)
        result["cpu_s_per_1k"] = result["cpu_ms_per_msg"]  # the same number: s per 1,000 msgs
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
        result["peak_proc_rss_mb"] = round(sampler.peak_proc_rss_kb / 1024, 1)
        result["peak_processes"] = sampler.peak_procs
        result["mem_samples"] = sampler.samples
        result["queued_at_end"] = server.queue_count()
        result["log"] = server.log_summary()
        lg = result["log"]
        if result["delivered"] < total:
            result["errors"].append(
                f"only {result['delivered']}/{total} messages "
                f"{'received by smtp-sink' if relay else 'delivered'} "
                f"(relay log: accepted {lg.get('accepted')}, sent {lg.get('sent')}, "
                f"deferred {lg.get('deferred')}, bounced {lg.get('bounced')}; "
                f"{result['queued_at_end']} still queued)")
        elif result["delivered"] > total + probe_uncertain:
            result["errors"].append(
                f"DUPLICATES: {result['delivered']} messages "
                f"{'received by smtp-sink' if relay else 'delivered'} for {total} sent")
        if (relay and not total <= (lg.get("sent") or 0) <= total + probe_uncertain
                and not any("drained" in e for e in result["errors"])):
            result["errors"].append(
                f"relay log has {lg.get('sent')} status=sent for {total} messages")
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
        if probe is not None:
            probe.stop()
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
    "accept_rate", "source_accept_rate", "e2e_rate", "cpu_s", "cpu_ms_per_msg", "cpu_s_per_1k",
    "peak_rss_mb", "peak_pss_mb", "peak_proc_rss_mb", "idle_rss_mb", "idle_pss_mb",
    "idle_proc_rss_mb", "accept_p50_ms", "accept_p99_ms", "session_p50_ms", "session_p99_ms",
    "latency_samples", "probe_messages", "total_messages",
    "accept_s", "e2e_s", "drained_s", "client_cpu_s", "sink_cpu_s", "other_cpu_s", "steal_s",
    "cpu_user_s", "cpu_sys_s", "sys_pct", "msgs_per_connection", "upstream_connections",
    "peak_processes")

# Memory criteria of the issue (bench/README.md, "Memory").
ABOVE_IMPORT_LIMIT_MB = 30.0
BIG_GROWTH_LIMIT_MB = 10.0


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
        "accept_p50": _ratio(m["accept_p50_ms"], peer["accept_p50_ms"]),
        "accept_p99": _ratio(m["accept_p99_ms"], peer["accept_p99_ms"]),
        "cpu_per_msg": _ratio(m["cpu_ms_per_msg"], peer["cpu_ms_per_msg"]),
        "rss": _ratio(m["peak_rss_mb"], peer["peak_rss_mb"]),
        "pss": _ratio(m["peak_pss_mb"], peer["peak_pss_mb"]),
    } for m in medians if m is not peer}


def above_import(meta: dict[str, Any], m: dict[str, Any]) -> float | None:
    """relayd: peak RSS of its largest process minus the interpreter's import footprint."""
    key = m["impl"].removeprefix("relayd ")
    base = meta.get("import_rss_mb", {}).get(key)
    if not m["impl"].startswith("relayd ") or base is None or m.get("peak_proc_rss_mb") is None:
        return None
    return m["peak_proc_rss_mb"] - base


def table_header(meta: dict[str, Any], cells: list[Cell]) -> list[str]:
    w = meta["workload"]
    out = [
        f"relayd benchmark  {meta['date']}  host {meta['host']}, kernel {meta['kernel']}, "
        f"workdir fs {meta['workdir_fs']}",
        f"cores: os.cpu_count() = {meta['cpus']}, nproc = {meta.get('nproc', '?')}, "
        f"usable by the bench (sched_getaffinity) = {meta.get('cpus_usable', '?')}; "
        f"{meta.get('cpu_model', '?')}",
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
    if cells:
        out.append("cells (sessions x size: messages): "
                   + ", ".join(f"{c.sessions}x{human_size(c.size)}: {c.messages}" for c in cells)
                   + f"; {w['runs']} run(s) each, interleaved, MEDIANS shown")
    probe = w.get("probe_interval")
    out.append(
        "latency probe: " + (
            f"one SMTP session at a time to the relay while smtp-source runs, a message of the "
            f"cell's size every {probe * 1000:.0f} ms (+ its own duration); accept latency = "
            "final '.' written -> 250 read" if probe else "off (--probe-interval 0)"))
    for key, info in meta.get("pythons", {}).items():
        imp = meta.get("import_rss_mb", {}).get(key)
        out.append(f"  {key}: {info}; import RSS {_fmt(imp, '.1f')} MB")
    return out


def _columns(relay: bool, peer: bool) -> str:
    head = (f"{'sess':>4} {'size':>6} {'impl':<14} {'ok':>4} {'e2e/s':>7} {'accept/s':>8}"
            f" {'p50 ms':>7} {'p99 ms':>7} {'CPU s/1k':>8} {'RSS MB':>7} {'PSS MB':>7}")
    if peer:
        head += (f"  {'e2e vs PF':>9} {'accept vs PF':>12} {'p99 vs PF':>9} {'CPU vs PF':>9}"
                 f" {'PSS vs PF':>9}")
    return head


def _detail_columns(relay: bool) -> str:
    head = (f"{'sess':>4} {'size':>6} {'impl':<14} {'lat n':>5} {'sess p50':>8} {'sess p99':>8}"
            f" {'CPU s':>6} {'sys%':>4} {'idle RSS':>8} {'proc RSS':>8} {'>import':>8}"
            f" {'procs':>5}")
    if relay:
        head += f" {'msg/conn':>8}"
    head += f" {'client s':>8}"
    if relay:
        head += f" {'sink s':>6}"
    head += f" {'other s':>7}"
    return head


def table_rows(cell: Cell, medians: list[dict[str, Any]], peer: bool) -> list[str]:
    ratios = cell_ratios(medians)
    rows = []
    for m in medians:
        line = (f"{cell.sessions:>4} {human_size(cell.size):>6} {m['impl']:<14}"
                f" {m['ok_runs']}/{m['runs']:<2} {_fmt(m['e2e_rate'], '7.0f')}"
                f" {_fmt(m['accept_rate'], '8.0f')}"
                f" {_fmt(m['accept_p50_ms'], '7.1f')} {_fmt(m['accept_p99_ms'], '7.1f')}"
                f" {_fmt(m['cpu_s_per_1k'], '8.2f')} {_fmt(m['peak_rss_mb'], '7.1f')}"
                f" {_fmt(m['peak_pss_mb'], '7.1f')}")
        if peer:
            r = ratios.get(m["impl"])
            if m["impl"] == "postfix":
                line += f"  {'1.00':>9} {'1.00':>12} {'1.00':>9} {'1.00':>9} {'1.00':>9}"
            elif r:
                pss_flag = "!" if r["pss"] is not None and r["pss"] > 1 else " "
                line += (f"  {_fmt(r['e2e'], '9.2f')} {_fmt(r['accept'], '12.2f')}"
                         f" {_fmt(r['accept_p99'], '9.2f')} {_fmt(r['cpu_per_msg'], '9.2f')}"
                         f" {_fmt(r['pss'], '8.2f')}{pss_flag}")
        rows.append(line.rstrip())
    return rows


def detail_rows(meta: dict[str, Any], cell: Cell, medians: list[dict[str, Any]]) -> list[str]:
    relay = cell.workload == "relay"
    rows = []
    for m in medians:
        above = above_import(meta, m)
        flag = "!" if above is not None and above > ABOVE_IMPORT_LIMIT_MB else " "
        line = (f"{cell.sessions:>4} {human_size(cell.size):>6} {m['impl']:<14}"
                f" {_fmt(m['latency_samples'], '5.0f')}"
                f" {_fmt(m['session_p50_ms'], '8.1f')} {_fmt(m['session_p99_ms'], '8.1f')}"
                f" {_fmt(m['cpu_s'], '6.1f')} {_fmt(m['sys_pct'], '4.0f')}"
                f" {_fmt(m['idle_rss_mb'], '8.1f')} {_fmt(m['peak_proc_rss_mb'], '8.1f')}"
                f" {_fmt(above, '7.1f')}{flag} {_fmt(m.get('peak_processes'), '5.0f')}")
        if relay:
            line += f" {_fmt(m['msgs_per_connection'], '8.1f')}"
        line += f" {_fmt(m['client_cpu_s'], '8.1f')}"
        if relay:
            line += f" {_fmt(m['sink_cpu_s'], '6.1f')}"
        line += f" {_fmt(m['other_cpu_s'], '7.1f')}"
        rows.append(line)
    return rows


def table_footer(relay: bool) -> list[str]:
    out = [
        "e2e/s = (N + probe messages) / time until the "
        + ("sink" if relay else "maildir") + " had them all; accept/s = messages answered 250 "
        "while smtp-source ran / its wall time; p50/p99 ms = accept latency of the probe's "
        "messages (final '.' -> 250), nearest rank, per run, median over runs.",
        "CPU s/1k = CPU seconds of the server process tree per 1,000 messages (= ms per message; "
        "Postfix: master + all its daemons, incl. exited ones; not smtp-source"
        + (" or smtp-sink" if relay else "") + ").",
        "RSS/PSS MB = peak of the sum over the server's processes (Postfix: compare PSS, its RSS "
        "sum counts shared pages once per process).",
        "ratios are relayd / Postfix: e2e, accept > 1 = relayd faster; p99, CPU, PSS > 1 = relayd "
        "slower / costlier; '!' after PSS vs PF: relayd uses more than Postfix.",
    ]
    return out


def detail_footer(relay: bool) -> list[str]:
    return [
        "lat n = latency samples per run; sess p50/p99 = the probe's whole session (connect -> "
        "221 after QUIT), ms.",
        "CPU s = server CPU in the run; sys% = its share in the kernel (fsync, TCP, ...).",
        "idle RSS = sum over the server's processes after start-up, before any mail; proc RSS = "
        "peak RSS of its largest process; >import = relayd: proc RSS - the interpreter's "
        f"import RSS (header), '!' = over the {ABOVE_IMPORT_LIMIT_MB:.0f} MB limit; procs = "
        "peak number of server processes.",
        ("msg/conn = N / SMTP sessions the relay opened to smtp-sink (connection reuse); " if relay
         else "")
        + "client s = CPU of smtp-source" + ("; sink s = CPU of smtp-sink" if relay else "")
        + "; other s = CPU used by everything else on the machine in the same window "
        "(background load: if it is more than a few s, the run was disturbed).",
    ]


def render_table(meta: dict[str, Any], results: list[dict[str, Any]], cells: list[Cell],
                 peer: bool, extra: list[str] | None = None) -> str:
    relay = meta["workload"]["workload"] == "relay"
    out = table_header(meta, cells)
    if results:
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
        out.append("")
        out.append("details (medians of the same runs):")
        head = _detail_columns(relay)
        out.append(head)
        out.append("-" * len(head))
        for i, res in enumerate(results):
            if i and relay:
                out.append("")
            out.extend(detail_rows(meta, res["cell_obj"], res["medians"]))
        out.append("")
        out.extend(detail_footer(relay))
    for line in extra or []:
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- --verify, --big


def _random_line(rng: random.Random) -> bytes:
    """One body line (without CRLF) of the kinds a relay could get wrong."""
    kind = rng.random()
    if kind < 0.55:
        n = rng.choice((0, 1, rng.randint(2, 78), rng.randint(79, 200)))
        return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789-=+_/:;<>\"',!?")
                     for _ in range(n))
    if kind < 0.65:  # dot-stuffing: ".", "..", ".text", "..."
        return rng.choice((b".", b"..", b"...", b". ", b".x", b"..x", b".\t."))
    if kind < 0.75:  # 8-bit text (declared BODY=8BITMIME)
        return "Grüße, naïve café — 日本語 ✓ ".encode() * rng.randint(1, 4)
    if kind < 0.80:
        return b"x" * 998  # RFC 5322's longest line
    if kind < 0.88:  # trailing and lone white space
        return rng.choice((b"trailing space ", b"trailing tab\t", b" ", b"\t", b"   \t "))
    if kind < 0.93:
        return rng.choice((b"From here on", b">From me", b"Received: not a header, a body line",
                           b"-- ", b"--boundary--"))
    return bytes(rng.randint(0x21, 0x7e) for _ in range(rng.randint(1, 76)))


def random_body(rng: random.Random, size: int) -> bytes:
    lines: list[bytes] = []
    length = 0
    while length < size:
        line = _random_line(rng) + b"\r\n"
        lines.append(line)
        length += len(line)
    return b"".join(lines)


def verify_messages(sizes: list[int], per_size: int, seed: int = 8) -> list[tuple[str, bytes]]:
    """The bench's own --verify messages: per size, smtp-source-like and random bodies; then
    edge cases. (message-id, bytes) with CRLF line ends, not dot-stuffed."""
    rng = random.Random(seed)
    tag = f"{os.getpid()}.{int(time.time())}"
    out: list[tuple[str, bytes]] = []

    def add(body: bytes, subject: str = "verify", extra: bytes = b"",
            headers_only: bool = False) -> None:
        msgid = f"verify.{tag}.{len(out)}@bench.test"
        msg = bench_message(msgid, body, subject, extra)
        if headers_only:  # no empty line, no body: legal (RFC 5322 §3.5)
            msg = msg[:-2]
        out.append((msgid, msg))

    for size in sizes:
        for i in range(per_size):
            add(smtp_source_body(size) if i % 2 else random_body(rng, size),
                subject=f"verify {human_size(size)} #{i}")
    add(b"", subject="empty body")
    add(b"", subject="no body, no empty line", headers_only=True)
    add(b".\r\n", subject="a lone dot")
    add(b"..\r\n.\r\n...\r\n. \r\n.x\r\n", subject="dots")
    add(b"text\r\n\r\n\r\n", subject="trailing empty lines")
    add(b"\r\n\r\nleading empty lines\r\n", subject="leading empty lines")
    add(b"x" * 998 + b"\r\n" + b"." + b"y" * 997 + b"\r\n", subject="998-octet lines")
    add(b"body\r\n", subject="folded header",
        extra=b"X-Folded: one\r\n" + b"".join(b"\t" + b"w" * 70 + b"\r\n" for _ in range(30)))
    add("8-bit body: Grüße\r\n".encode(), subject="8-bit header: Grüße",
        extra="X-Eight-Bit: naïve café\r\n".encode())
    add(b"Received: from fake (looks like a header but is body)\r\n", subject="body trace")
    add(random_body(rng, 1024 * 1024), subject="1 MB of random lines")
    return out


def send_messages(port: int, messages: list[tuple[str, bytes]], sessions: int,
                  per_connection: int = 5) -> tuple[set[str], list[str]]:
    """Send (msgid, bytes) to VERIFY_RECIPIENT over `sessions` parallel connections, up to
    per_connection transactions each. Returns (accepted msgids, errors)."""
    todo = list(reversed(messages))
    lock = threading.Lock()
    accepted: set[str] = set()
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                batch = [todo.pop() for _ in range(min(per_connection, len(todo)))]
            if not batch:
                return
            c: SmtpClient | None = None
            try:
                c = SmtpClient(port, 120)
                c.hello()
                for msgid, msg in batch:
                    c.dot_sent = False
                    c.transaction(SENDER, [VERIFY_RECIPIENT], (dot_stuff(msg),))
                    with lock:
                        accepted.add(msgid)
                c.quit()
            except (OSError, SmtpError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                if c is not None:
                    c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return accepted, errors


_MSGID_RE = re.compile(rb"^Message-Id:[ \t]*<([^>\r\n]+)>", re.I | re.M)


def _wait_delivered(server: Any, sink: CaptureSink, total: int, timeout: float) -> str | None:
    """Wait until the sink has `total` messages and the relay logged them sent and emptied
    its queue; an error text on timeout."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        got = sink.received()
        if got != last:
            last, last_change = got, time.monotonic()
        if got >= total and server.count_sent() >= total and server.queue_count() == 0:
            return None
        if not server.alive():
            return "the relay died"
        if time.monotonic() - last_change > timeout / 2 and got < total:
            break
        time.sleep(0.1)
    return (f"sink has {sink.received()}/{total}, relay logged {server.count_sent()} "
            f"status=sent, {server.queue_count()} still queued")


def run_verify(make_server: Callable[[Cell, str, int], Any], label: str, sizes: list[int],
               args: argparse.Namespace, workroot: str) -> dict[str, Any]:
    """--verify for one relay: smtp-source's messages and the bench's own through the relay
    to a CaptureSink; every one must arrive byte-identical apart from the Received: header(s)
    the relay put on top."""
    rundir = tempfile.mkdtemp(prefix=f"verify-{label.replace(' ', '-')}-", dir=workroot)
    os.chmod(rundir, 0o755)
    per_size = args.verify_messages
    res: dict[str, Any] = {"impl": label, "ok": False, "errors": [], "mismatches": []}
    sink = CaptureSink()
    server: Any = None
    try:
        sink.start()
        conc = 20 if args.concurrency == "match" else int(args.concurrency)
        cell = Cell("relay", 4, max(sizes), 0, conc, backlog=args.backlog)
        server = make_server(cell, rundir, sink.port)
        server.start()
        # 1. smtp-source's own messages (the load's content), per size.
        src_sent = 0
        for size in sizes:
            cmd = [SMTP_SOURCE, "-s", "4", "-l", str(size), "-m", str(per_size), "-M",
                   "client.bench.test", "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{server.port}"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                res["errors"].append(f"smtp-source -l {size} exit {r.returncode}: "
                                     f"{(r.stdout + r.stderr).strip()[-300:]}")
            else:
                src_sent += per_size
        # 2. the bench's own, known content.
        ours = verify_messages(sizes, per_size)
        accepted, send_errors = send_messages(server.port, ours, sessions=4)
        res["errors"].extend(f"sending: {e}" for e in send_errors[:5])
        total = src_sent + len(accepted)
        err = _wait_delivered(server, sink, total, max(60.0, args.stall_timeout))
        if err:
            res["errors"].append(err)
        time.sleep(0.3)
        with sink.lock:
            received = list(sink.messages)
        res["sink_errors"] = sink.errors[:5]

        # Compare.
        by_id: dict[str, list[dict[str, Any]]] = {}
        src_ok = 0
        src_bad: list[str] = []
        unknown = 0
        trace_counts: dict[int, int] = {}
        for m in received:
            trace_counts[count_received(m["prefix"])] = (
                trace_counts.get(count_received(m["prefix"]), 0) + 1)
            data = m["data"] or b""
            if any(VERIFY_RECIPIENT in r for r in m["rcpts"]):
                head = data.split(b"\r\n\r\n", 1)[0]
                found = _MSGID_RE.search(head)
                if found:
                    by_id.setdefault(found.group(1).decode(errors="replace"), []).append(m)
                else:
                    unknown += 1
                    res["mismatches"].append(f"a message without our Message-Id: "
                                             f"{data[:200]!r}")
            else:  # smtp-source's
                hm = SMTP_SOURCE_HEAD.match(data)
                body = data[hm.end():] if hm else b""
                if hm and any(body == smtp_source_body(s) for s in sizes) and \
                        data.startswith(f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n".encode()):
                    src_ok += 1
                else:
                    want = smtp_source_body(max(sizes, key=lambda s: -abs(len(body) - s)))
                    src_bad.append("smtp-source message: " + (
                        first_difference(want, body) if hm else
                        f"headers not as smtp-source writes them: {data[:200]!r}"))
        missing = duplicated = differ = identical = 0
        for msgid, msg in ours:
            copies = by_id.get(msgid, [])
            if msgid not in accepted:
                continue
            if not copies:
                missing += 1
                res["mismatches"].append(f"{msgid}: missing")
                continue
            if len(copies) > 1:
                duplicated += 1
                res["mismatches"].append(f"{msgid}: arrived {len(copies)} times")
            got = copies[0]
            if got["data"] == msg and count_received(got["prefix"]) >= 1:
                identical += 1
            else:
                differ += 1
                why = ("no Received: header added" if got["data"] == msg
                       else first_difference(msg, got["data"] or b""))
                subject = re.search(rb"^Subject: ([^\r\n]*)", msg, re.M)
                res["mismatches"].append(
                    f"{msgid} ({subject.group(1).decode(errors='replace') if subject else '?'}):"
                    f" {why}")
        res["mismatches"][:0] = src_bad
        res.update({
            "sent_ours": len(accepted), "sent_smtp_source": src_sent,
            "received": len(received), "identical_ours": identical,
            "identical_smtp_source": src_ok, "differ": differ + len(src_bad),
            "missing": missing + max(0, src_sent - src_ok - len(src_bad)),
            "duplicated": duplicated, "unknown": unknown,
            "received_headers_added": {str(k): v for k, v in sorted(trace_counts.items())},
        })
        checked = len(accepted) + src_sent
        res["checked"] = checked
        res["identical"] = identical + src_ok
        res["ok"] = (not res["errors"] and res["identical"] == checked
                     and len(received) == checked and checked > 0)
    except Exception as e:
        res["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        if server is not None:
            server.stop()
        sink.stop()
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            res["rundir"] = rundir
    return res


def verify_lines(results: list[dict[str, Any]]) -> list[str]:
    out = ["", "--verify: every message through the relay to a capturing sink, compared byte "
           "for byte with what was sent, apart from the Received: header(s) the relay adds on "
           "top (smtp-source's messages: apart from the Date: and Message-Id: it generates)"]
    for r in results:
        if r.get("checked") is None:
            out.append(f"  {r['impl']:<14} FAILED: {'; '.join(r['errors'])}")
            continue
        traces = ", ".join(f"{v} with {k}" for k, v in r["received_headers_added"].items())
        status = "verified" if r["ok"] else "FAILED:"
        out.append(
            f"  {r['impl']:<14} {status} {r['identical']}/{r['checked']} byte-identical "
            f"({r['identical_smtp_source']}/{r['sent_smtp_source']} smtp-source, "
            f"{r['identical_ours']}/{r['sent_ours']} bench messages incl. edge cases); "
            f"{r['received']} received; Received: headers added: {traces or '-'}"
            + (f"; {r['differ']} differ, {r['missing']} missing, {r['duplicated']} duplicated"
               if not r["ok"] else ""))
        for e in r["errors"]:
            out.append(f"      error: {e}")
        for mm in r["mismatches"][:10]:
            out.append(f"      {mm}")
        if len(r["mismatches"]) > 10:
            out.append(f"      ... and {len(r['mismatches']) - 10} more")
    return out


def big_message_stream(size: int, digest: Any) -> Iterable[bytes]:
    """A message of about `size` bytes, generated in ~1 MB chunks and dot-stuffed as it goes
    (every 500th line starts with "."); `digest` is fed the unstuffed bytes."""
    head = bench_message(f"big.{os.getpid()}.{time.time():.0f}@bench.test", b"",
                         subject=f"big message {human_size(size)}")
    digest.update(head)
    yield head
    sent = len(head)
    i = 0
    pattern = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/" * 2
    while sent < size:
        lines, stuffed = [], []
        n = 0
        while n < 1 << 20 and sent + n < size:
            line = (b"." if i % 500 == 0 else b"") + b"%08d " % i + pattern[i % 64:i % 64 + 66] \
                + b"\r\n"
            lines.append(line)
            stuffed.append(b"." + line if line.startswith(b".") else line)
            n += len(line)
            i += 1
        digest.update(b"".join(lines))
        sent += n
        yield b"".join(stuffed)


def run_big(make_server: Callable[[Cell, str, int], Any], label: str, size: int,
            args: argparse.Namespace, workroot: str) -> dict[str, Any]:
    """--big for one relay: one message of `size` through the relay (relay workload) to a
    CaptureSink, the relay's RSS (summed VmRSS of its processes) sampled every 20 ms from
    before the message until it has been delivered and the relay is idle again."""
    rundir = tempfile.mkdtemp(prefix=f"big-{label.replace(' ', '-')}-", dir=workroot)
    os.chmod(rundir, 0o755)
    res: dict[str, Any] = {"impl": label, "size": size, "ok": False, "errors": []}
    sink = CaptureSink(keep_limit=0)
    server: Any = None
    sampler: RssSampler | None = None
    try:
        sink.start()
        conc = 20 if args.concurrency == "match" else int(args.concurrency)
        cell = Cell("relay", 1, size, 1, conc, backlog=args.backlog,
                    max_message_size=2 * size + (1 << 20))
        server = make_server(cell, rundir, sink.port)
        server.start()
        time.sleep(1.0)
        wait_idle(server.root_pid)
        sampler = RssSampler(server.root_pid, 0.02)
        before, before_proc = sampler.current()
        sampler.start()
        digest = hashlib.sha256()
        c = SmtpClient(server.port, timeout=600)
        t0 = time.monotonic()
        c.hello()
        t_dot, t_250 = c.transaction(SENDER, [RECIPIENT], big_message_stream(size, digest))
        c.quit()
        err = _wait_delivered(server, sink, 1, 300)
        t_arrived = sink.messages[0]["t"] if sink.messages else None
        if err:
            res["errors"].append(err)
        wait_idle(server.root_pid)
        time.sleep(0.2)
        sampler.stop()
        after, _ = sampler.current()
        got = sink.messages[0] if sink.messages else None
        t_end = t_arrived or time.monotonic()
        res.update({
            # Which phase holds the memory: receiving (until the 250), relaying (until the
            # sink has it), or after (spool clean-up, idle).
            "rss_peak_receiving_mb": round(sampler.peak_between(t0, t_250) / 1024, 1),
            "rss_peak_relaying_mb": round(sampler.peak_between(t_250, t_end) / 1024, 1),
            "rss_peak_after_mb": round(sampler.peak_between(t_end, time.monotonic()) / 1024, 1),
            "rss_before_mb": round(before / 1024, 1),
            "rss_peak_mb": round(sampler.peak_kb / 1024, 1),
            "rss_growth_mb": round((sampler.peak_kb - before) / 1024, 1),
            "rss_after_mb": round(after / 1024, 1),
            "largest_process_before_mb": round(before_proc / 1024, 1),
            "largest_process_peak_mb": round(sampler.peak_proc_kb / 1024, 1),
            "peak_after_start_s": round(sampler.peak_at - t0, 2) if sampler.peak_at else None,
            "samples": sampler.samples,
            "accept_s": round(t_250 - t0, 2),
            "end_of_data_to_250_ms": round(1000 * (t_250 - t_dot), 1),
            "arrived_s": round(t_arrived - t0, 2) if t_arrived else None,
            "identical": bool(got and got["sha256"] == digest.hexdigest()
                              and count_received(got["prefix"]) >= 1),
            "received_length": got["length"] if got else None,
        })
        if got and not res["identical"]:
            res["errors"].append("the message did not arrive byte-identical (SHA-256 differs)")
        res["pass"] = res["rss_growth_mb"] < BIG_GROWTH_LIMIT_MB
        res["ok"] = not res["errors"]
    except Exception as e:
        res["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        if sampler is not None:
            sampler.stop()
        if server is not None:
            server.stop()
        sink.stop()
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            res["rundir"] = rundir
    return res


def big_lines(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    size = human_size(results[0]["size"])
    out = ["", f"--big: one {size} message through the relay (relay workload) to a capturing "
           "sink; RSS = sum of VmRSS over the relay's processes, sampled every 20 ms; "
           f"limit: growth < {BIG_GROWTH_LIMIT_MB:.0f} MB (relayd)"]
    for r in results:
        if r.get("rss_peak_mb") is None:
            out.append(f"  {r['impl']:<14} FAILED: {'; '.join(r['errors'])}")
            continue
        verdict = ("PASS" if r["pass"] else "FAIL") if r["impl"].startswith("relayd") else \
            "(for comparison: Postfix forks smtpd/cleanup/smtp for the message)"
        out.append(
            f"  {r['impl']:<14} RSS before {r['rss_before_mb']:.1f} MB, peak "
            f"{r['rss_peak_mb']:.1f} MB, growth {r['rss_growth_mb']:.1f} MB {verdict}; "
            f"peak while receiving {r['rss_peak_receiving_mb']:.1f} MB, while relaying "
            f"{r['rss_peak_relaying_mb']:.1f} MB, after {r['rss_after_mb']:.1f} MB; "
            f"largest process {r['largest_process_before_mb']:.1f} -> "
            f"{r['largest_process_peak_mb']:.1f} MB; accepted in {r['accept_s']:.1f} s "
            f"('.' -> 250: {r['end_of_data_to_250_ms']:.0f} ms), at the sink after "
            f"{_fmt(r['arrived_s'], '.1f')} s, "
            + ("byte-identical" if r["identical"] else "NOT identical")
            + (f"; ERRORS: {'; '.join(r['errors'])}" if r["errors"] else ""))
    return out


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


IMPORT_CODE = (
    "import relayd.cli, relayd.tap, twisted.scripts.twistd\n"
    "from twisted.internet import reactor\n"
    "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS:')][0])"
)
IMPORT_CODE_SHOWN = ("python -c 'import relayd.cli, relayd.tap, twisted.scripts.twistd; "
                     "from twisted.internet import reactor', VmRSS, median of 3")


def import_rss_mb(relayd_cmd: str) -> float | None:
    """The interpreter's import footprint for relayd: VmRSS after importing what `relayd run`
    imports before it reads the config (median of 3 fresh interpreters)."""
    py = os.path.join(os.path.dirname(relayd_cmd), "python")
    values = []
    for _ in range(3):
        try:
            r = subprocess.run([py, "-c", IMPORT_CODE], capture_output=True, text=True,
                               timeout=120, env=_RELAYD_ENV)
            values.append(int(r.stdout.strip()) / 1024)
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
    return round(statistics.median(values), 1) if values else None


def _nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


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
                        "relayd's own (1024). Postfix's smtpd listens with a backlog "
                        "of 100 (default_process_limit)")
    p.add_argument("--relayd-extra", metavar="FILE",
                   help="TOML appended to relayd's config, e.g. a [[dkim]] table for "
                        "domain bench.test (smtp-source's From: domain) to measure signing")
    p.add_argument("--reuse-connections", action="store_true",
                   help="smtp-source -d: send all of a session's messages over one connection")
    p.add_argument("--probe-interval", type=float, default=0.05,
                   help="latency probe: seconds between the end of one probe session and the "
                        "start of the next, while smtp-source runs; 0 = no probe (no p50/p99)")
    p.add_argument("--verify", action="store_true",
                   help="before the matrix, send smtp-source's and the bench's own messages "
                        "(edge cases included) through every relay to a capturing sink and check "
                        "each arrived byte-identical apart from the added Received: header; "
                        "exit 1 on any difference")
    p.add_argument("--verify-messages", type=int, default=20, metavar="K",
                   help="--verify: per size, K messages from smtp-source and K of the bench's "
                        "own (plus ~11 edge cases)")
    p.add_argument("--big", nargs="?", type=parse_size, const=50 * 1024 * 1024, default=None,
                   metavar="SIZE",
                   help="after the matrix, relay one message of SIZE (default 50MB) through every "
                        "relay and report the relay's RSS before, peak (sampled every 20 ms) and "
                        f"growth; relayd PASSes below {BIG_GROWTH_LIMIT_MB:.0f} MB growth")
    p.add_argument("--no-matrix", dest="matrix", action="store_false",
                   help="skip the measured matrix (only --verify and/or --big)")
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
    if not args.matrix and not (args.verify or args.big):
        p.error("--no-matrix: give --verify and/or --big")
    if args.verify_messages < 1:
        p.error("--verify-messages: at least 1")
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
                              args.reuse_connections, args.backlog,
                              relayd_extra=_read_extra(args.relayd_extra)))
    return cells


def _read_extra(path: str | None) -> str:
    if path is None:
        return ""
    with open(path) as f:
        return "\n" + f.read()


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
        + f", accept latency p50 {_fmt(r.get('accept_p50_ms'), '.1f')} ms, p99 "
        f"{_fmt(r.get('accept_p99_ms'), '.1f')} ms ({r.get('latency_samples', 0)} samples, "
        f"{r.get('probe_messages', 0)} probe msgs)"
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

    cells = make_cells(args) if args.matrix else []
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "workdir": args.workdir, "workdir_fs": _fs_type(os.path.realpath(args.workdir)),
        "relayd_commit": _git("rev-parse", "--short", "HEAD") or "?",
        "relayd_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "relayd")),
        "argv": sys.argv,
        "nproc": _nproc(), "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "workload": {"workload": args.workload, "sessions": args.sessions, "sizes": args.sizes,
                     "messages": args.messages, "runs": args.runs,
                     "reuse_connections": args.reuse_connections,
                     "concurrency": args.concurrency, "relayd_backlog": args.backlog,
                     "probe_interval": args.probe_interval, "matrix": args.matrix,
                     "verify": args.verify, "big": args.big},
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
    verify_results: list[dict[str, Any]] = []
    big_results: list[dict[str, Any]] = []
    def extra_lines() -> list[str]:
        return ((verify_lines(verify_results) if verify_results else [])
                + big_lines(big_results) + (["", peer_note] if peer_note else []))

    def write_json(interrupted: bool = False) -> None:
        if not args.json:
            return
        cells_out = [{"cell": r["cell_obj"].as_dict(), "medians": r["medians"],
                      "ratios_vs_postfix": cell_ratios(r["medians"]), "runs": r["runs"],
                      "elapsed_s": r.get("elapsed_s")} for r in results]
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "cells": cells_out, "verify": verify_results,
                       "big": big_results,
                       "table": render_table(meta, results, cells, has_peer, extra_lines()),
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
    # The interpreters' import footprint (the baseline of the per-process memory limit).
    meta["import_rss_mb"] = {key: import_rss_mb(PYTHONS[key]) for key in keys}
    for key in keys:
        log(f"relayd {key}: import RSS {_fmt(meta['import_rss_mb'][key], '.1f')} MB "
            f"({IMPORT_CODE_SHOWN})")
    interrupted = False
    t_bench = time.monotonic()
    try:
        if args.verify:
            sizes = args.sizes  # the matrix's (also with --no-matrix)
            for label, make in impls:
                log(f"{label}: --verify ({args.verify_messages} smtp-source + "
                    f"{args.verify_messages} own messages per size {sizes}, and edge cases)")
                v = run_verify(make, label, sizes, args, workroot)
                verify_results.append(v)
                for line in verify_lines([v])[2:]:
                    log(line)
            write_json()
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
                                 *table_rows(cell, res["medians"], has_peer), "",
                                 _detail_columns(relay),
                                 *detail_rows(meta, cell, res["medians"])]) + "\n",
                      flush=True)
            write_json()
        if args.big:
            for label, make in impls:
                log(f"{label}: --big: one {human_size(args.big)} message")
                b = run_big(make, label, args.big, args, workroot)
                big_results.append(b)
                for line in big_lines([b])[2:]:
                    log(line)
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
    table = render_table(meta, results, cells, has_peer, extra_lines())
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
    bad_checks = [v for v in verify_results if not v["ok"]] + [b for b in big_results
                                                              if not b["ok"]]
    return 1 if failed or bad_checks else 0


if __name__ == "__main__":
    sys.exit(main())
