#!/usr/bin/env python3
"""Slowloris: does a normal client still get through while 1,000 connections idle?

Starts relayd (a temp config with a maildir route, ``python -m relayd.cli run``),
opens --idle (default 1,000) TCP connections that read the greeting and then
say nothing, plus one slowloris client that drips a transaction at one byte
per second, then times a normal smtplib client's full transaction (EHLO, MAIL,
RCPT, DATA, QUIT) --runs times and prints the median (goal: < 1 s).

RLIMIT_NOFILE is raised to the hard limit here before relayd starts, so the
child inherits it; relayd's own limit is read from /proc/PID/limits and
printed.  Everything started is stopped by PID at the end.

Usage: python3 bench/slowloris.py [--idle 1000] [--runs 5] [--python PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listener bench listening on ([^\s:]+):(\d+)")


def nofile_limit(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"soft {soft}, hard {hard}"
    except OSError:
        pass
    return "unknown"


def open_fds(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return -1


def wait_port(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"relayd exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        m = LISTENING.search(log.read_text(errors="replace"))
        if m:
            return int(m.group(2))
        time.sleep(0.05)
    raise SystemExit(f"relayd did not listen within {timeout}s:\n{log.read_text()[-3000:]}")


def slowloris(port: int, stop: threading.Event, dripped: list[int]) -> None:
    """One byte per second of a transaction that never ends."""
    script = (b"EHLO slow.example\r\nMAIL FROM:<slow@example.org>\r\nRCPT TO:<x@example.net>\r\n"
              b"DATA\r\nSubject: slow\r\n\r\n" + b"x" * 100000)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(0.01)
            for i in range(len(script)):
                if stop.is_set():
                    return
                s.sendall(script[i:i + 1])
                dripped[0] += 1
                try:
                    s.recv(4096)  # keep its replies drained
                except TimeoutError:
                    pass
                stop.wait(1.0)
    except OSError as e:
        print(f"slowloris client: {e}", flush=True)


def transaction(port: int, n: int) -> float:
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.test", timeout=30) as s:
        s.sendmail("app@example.org", ["user@example.net"],
                   f"Subject: timed {n}\r\nFrom: app@example.org\r\n\r\nhello\r\n")
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.idle + 200
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(max(need, soft), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            print(f"warning: RLIMIT_NOFILE hard limit {hard} < {need}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="relayd-slowloris-"))
    proc: subprocess.Popen[bytes] | None = None
    idle: list[socket.socket] = []
    stop = threading.Event()
    drip: threading.Thread | None = None
    try:
        config = work / "relayd.toml"
        config.write_text(f"""
[server]
hostname = "bench.test"
spool = "{work / 'spool'}"
[http]
listen = "none"
[[listener]]
name = "bench"
listen = "tcp:0:interface=127.0.0.1"
route = "outbox"
[route.outbox]
maildir = "{work / 'outbox'}"
""")
        log = work / "relayd.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([args.python, "-m", "relayd.cli", "run", "--config",
                                     str(config)], stdout=f, stderr=subprocess.STDOUT, cwd=work)
        port = wait_port(proc, log)
        print(f"relayd pid {proc.pid} ({args.python}) on port {port}; its RLIMIT_NOFILE: "
              f"{nofile_limit(proc.pid)}", flush=True)
        warm = [transaction(port, -i) for i in range(1, 6)]
        baseline = statistics.median(warm)
        print(f"baseline (no load): median {baseline * 1000:.1f} ms "
              f"({', '.join(f'{t * 1000:.0f}' for t in warm)} ms)", flush=True)

        start = time.monotonic()
        refused = 0
        connect_times = []
        for _ in range(args.idle):
            t0 = time.monotonic()
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                refused += 1
                continue
            connect_times.append(time.monotonic() - t0)
            idle.append(s)
        connected = time.monotonic() - start
        greeted = 0
        for s in idle:
            try:
                if s.recv(512).startswith(b"220"):
                    greeted += 1
            except OSError:
                pass
        slow = sum(1 for t in connect_times if t > 0.5)
        print(f"{len(idle)} idle connections open in {connected:.1f}s ({slow} connects took "
              f"> 0.5 s, max {max(connect_times, default=0):.2f} s), all greeted after "
              f"{time.monotonic() - start:.1f}s ({greeted} greeted, {refused} refused); "
              f"relayd holds {open_fds(proc.pid)} fds", flush=True)

        dripped = [0]
        drip = threading.Thread(target=slowloris, args=(port, stop, dripped), daemon=True)
        drip.start()
        time.sleep(3)
        times = []
        for n in range(args.runs):
            t = transaction(port, n)
            times.append(t)
            print(f"  transaction {n + 1}: {t * 1000:.1f} ms", flush=True)
            time.sleep(1)
        median = statistics.median(times)
        alive = proc.poll() is None
        print(f"slowloris dripped {dripped[0]} bytes; relayd alive: {alive}")
        print(f"median full transaction with {len(idle)} idle + 1 slowloris: "
              f"{median * 1000:.1f} ms (goal < 1000 ms) -> {'OK' if median < 1 else 'SLOW'}")
        tracebacks = log.read_text(errors="replace").count("Traceback")
        if tracebacks:
            print(f"warning: {tracebacks} tracebacks in relayd's log")
        print(json.dumps({"idle": len(idle), "median_s": round(median, 4),
                          "baseline_s": round(baseline, 4), "runs": [round(t, 4) for t in times],
                          "tracebacks": tracebacks}))
        return 0 if median < 1 and alive else 1
    finally:
        stop.set()
        if drip is not None:
            drip.join(timeout=5)
        for s in idle:
            s.close()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
