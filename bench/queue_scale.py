#!/usr/bin/env python3
"""Queue at scale: relayd starting on a spool of N (default 100,000) messages.

Writes N queued messages straight into a fresh spool (the on-disk format of
relayd.queue.spool, one sync at the end rather than an fsync per file: this
is a fixture, not a durability test), then starts relayd on it with a
maildir route and reports:

- seconds from start to the first delivered message, and to N delivered
  (unless --no-drain);
- relayd's peak RSS while it works;
- `relayd queue list --json` on the stopped spool (offline) and against the
  running daemon (online): wall time and the CLI's own peak RSS, to show
  that listing streams.

Usage: python3 bench/queue_scale.py [--messages N] [--python PATH] [--no-drain]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relayd.envelope import Envelope, new_queue_id  # noqa: E402
from relayd.queue.spool import _header  # noqa: E402

BODY = b"Subject: scale test\r\nFrom: a@example.org\r\n\r\n" + b"x" * 1000 + b"\r\n"


def fill(spool: Path, count: int) -> float:
    for sub in ("tmp", "messages", "state", "corrupt"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    now = time.time() - 60
    for i in range(count):
        qid = new_queue_id(now + i * 1e-6)
        env = Envelope(sender=f"s{i}@example.org", recipients=(f"r{i}@example.net",),
                       route="outbox", arrival=now + i * 1e-6, listener="bench")
        with open(spool / "messages" / qid, "wb") as f:
            f.write(_header(qid, env) + BODY)
    os.sync()
    return time.monotonic() - start


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def count_files(path: Path) -> int:
    try:
        with os.scandir(path) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def time_list(python: str, config: Path) -> tuple[float, int, float]:
    start = time.monotonic()
    proc = subprocess.Popen([python, "-m", "relayd.cli", "queue", "--config", str(config),
                             "list", "--json"], stdout=subprocess.PIPE, cwd=config.parent)
    lines = 0
    assert proc.stdout is not None
    for _ in proc.stdout:
        lines += 1
    proc.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - start, lines, usage.ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--no-drain", action="store_true", help="stop after the first delivery")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relayd-scale-"))
    proc = None
    try:
        spool, outbox = work / "spool", work / "outbox"
        took = fill(spool, args.messages)
        print(f"filled {args.messages} messages in {took:.1f}s")
        config = work / "relayd.toml"
        config.write_text(f"""
[server]
hostname = "bench.test"
spool = "{spool}"
[http]
listen = "tcp:0:interface=127.0.0.1"
[[listener]]
name = "bench"
listen = "tcp:0:interface=127.0.0.1"
route = "outbox"
[route.outbox]
maildir = "{outbox}"
concurrency = 20
""")
        t, lines, cli_rss = time_list(args.python, config)
        print(f"offline: relayd queue list --json: {lines} lines in {t:.1f}s, CLI peak RSS "
              f"{cli_rss:.0f} MB")
        log = open(work / "relayd.log", "wb")
        start = time.monotonic()
        proc = subprocess.Popen([args.python, "-m", "relayd.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=work)
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        new = outbox / "new"
        while count_files(new) == 0:
            if proc.poll() is not None:
                raise SystemExit(f"relayd exited:\n{(work / 'relayd.log').read_text()[-3000:]}")
            time.sleep(0.01)
        first = time.monotonic() - start
        print(f"first delivery {first:.2f}s after start (RSS now {rss_mb(proc.pid):.0f} MB)")
        text = (work / "relayd.log").read_text()
        m = re.search(r"recovered (\d+) queued messages", text)
        print(f"log: {m.group(0) if m else 'no recovery line yet'}")
        if not args.no_drain:
            t, lines, cli_rss = time_list(args.python, config)
            print(f"online:  relayd queue list --json: {lines} lines in {t:.1f}s, CLI peak RSS "
                  f"{cli_rss:.0f} MB")
            while count_files(new) < args.messages:
                if proc.poll() is not None:
                    raise SystemExit("relayd exited while draining")
                time.sleep(0.2)
            print(f"all {args.messages} delivered {time.monotonic() - start:.1f}s after start")
        stop.set()
        print(f"relayd peak RSS {peak[0]:.0f} MB")
        print(json.dumps({"messages": args.messages, "first_delivery_s": round(first, 3),
                          "peak_rss_mb": round(peak[0], 1)}))
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
