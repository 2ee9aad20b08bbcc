"""Big messages through a real relayd process: memory stays flat, bytes stay exact.

Issue 8: a 50 MB message relays with RSS growth under 10 MB, because it is
streamed (socket -> spool file -> smarthost) and never held whole.  The
relayd process's VmRSS is sampled every 20 ms for the whole transfer
(receive, fsync, delivery), against its RSS when idle after a small
warm-up message.  A second test checks that a multi-MB message full of dot
lines, 8-bit bytes and lines of every length arrives byte for byte.
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

from tests.postfix import Sink
from tests.relay import Relay, config_text, wait_for

MB = 1024 * 1024
#: Allowed RSS growth over idle while a 50 MB message goes through.
RSS_BUDGET = 10 * MB
_RECEIVED = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*\Z")


def smarthost_relay(relay_factory, port: int, extra: str = "") -> Relay:
    """A relay whose route goes to 127.0.0.1:port without TLS, taking 64 MB messages
    (``extra``: more config, e.g. ``[[dkim]]`` tables)."""
    listener = 'max_message_size = "64MB"'
    queue = 'retry = ["1h"]'
    relay = relay_factory(start=False, listener_extra=listener, queue=queue)
    text = config_text(relay.spool, relay.outbox, listener_extra=listener, queue=queue,
                       extra=extra).replace(
        f'[route.outbox]\nmaildir = "{relay.outbox}"\n',
        f'[route.outbox]\nsmarthost = ["127.0.0.1:{port}"]\ntls = "none"\n',
    )
    relay.config_path.write_text(text)
    return relay.start()


def send(relay: Relay, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, local_hostname="client.test",
                      timeout=120) as s:
        s.sendmail("app@example.org", ["user@example.net"], message)


def headers(subject: str) -> bytes:
    return (f"From: app@example.org\r\nTo: user@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.test>\r\n"
            "Date: Sun, 22 Nov 2026 12:00:00 +0000\r\n\r\n").encode()


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RSSSampler:
    """VmRSS of a process every ``interval`` seconds, in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss(self.pid))
            self.times.append(time.monotonic())
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss(self.pid))
        self.times.append(time.monotonic())

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        """The highest sample taken between ``start`` and ``end`` (monotonic)."""
        return max((s for s, t in zip(self.samples, self.times) if start <= t <= end), default=0)


def idle_rss(pid: int, settle: float = 0.5, window: float = 0.3) -> int:
    """RSS once the process has been quiet for a while (highest of a short window)."""
    time.sleep(settle)
    with RSSSampler(pid) as sampler:
        time.sleep(window)
    return max(sampler.samples)


def test_50mb_message_relays_with_flat_memory(relay_factory, tmp_path: Path) -> None:
    """50 MB in and out to smtp-sink: RSS never grows by 10 MB over idle."""
    sink = Sink(tmp_path / "sink").start()
    try:
        relay = smarthost_relay(relay_factory, sink.port)
        assert relay.proc is not None
        pid = relay.proc.pid
        send(relay, headers("warm up") + b"small\r\n")
        wait_for(lambda: len(sink.messages()) == 1, timeout=30, what="the warm-up message")
        idle = idle_rss(pid)

        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-.+/01234567\r\n"
        body = bytearray()
        while len(body) < 50 * MB:
            body += line * 1000 + b".dot line\r\n"
        big = headers("big") + bytes(body)
        del body
        started = time.monotonic()
        with RSSSampler(pid) as sampler:
            send(relay, big)
            accepted = time.monotonic()
            wait_for(lambda: relay.log().count("status=sent") >= 2, timeout=120,
                     what="the 50 MB message to be sent")
        done = time.monotonic()
        peak = max(sampler.samples)
        growth = peak - idle
        receiving = sampler.peak(end=accepted) - idle
        delivering = sampler.peak(start=accepted) - idle
        print(f"\n50 MB message: idle RSS {idle / MB:.1f} MB, peak {peak / MB:.1f} MB, "
              f"growth {growth / MB:.1f} MB (receiving {receiving / MB:.1f}, delivering "
              f"{delivering / MB:.1f}) over {len(sampler.samples)} samples; accepted in "
              f"{accepted - started:.1f} s, delivered {done - accepted:.1f} s later")

        # smtp-sink dumps with LF line ends, its own trace headers first and an
        # empty line last.
        original = big.replace(b"\r\n", b"\n")
        tail = original[original.index(b"\n\n"):] + b"\n"

        def dumped() -> bytes | None:
            messages = sink.messages()
            biggest = max(messages, key=len)
            return biggest if len(messages) == 2 and biggest.endswith(tail) else None

        received = wait_for(dumped, timeout=60, what="smtp-sink to dump the whole message")
        assert len(received) > len(original)
        assert growth < RSS_BUDGET, f"RSS grew by {growth / MB:.1f} MB"
        wait_for(lambda: relay.queued() == [], what="the queue to empty")
    finally:
        sink.stop()


# -- byte-exactness ------------------------------------------------------------------


class RecordingServer:
    """A minimal SMTP server in a thread that keeps each message's content exactly
    (dot-unstuffed, CRLF kept): what the smarthost got, to compare with what was sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 recorder ESMTP\r\n")
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-recorder\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    lines = []
                    while True:
                        raw = f.readline()
                        if raw in (b".\r\n", b""):
                            break
                        lines.append(raw[1:] if raw.startswith(b".") else raw)
                    self.messages.append(b"".join(lines))
                    conn.sendall(b"250 2.0.0 kept\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        self.sock.close()


def tricky_content(size: int, seed: int = 8) -> bytes:
    """CRLF lines of every length up to 998 octets, 8-bit bytes and NULs, lines that
    are or begin with dots everywhere, and runs of short dot lines around every
    64 KiB of the message (wherever the Received header moves them)."""
    rng = random.Random(seed)
    out = bytearray(headers("tricky"))
    out += b".first body line starts with a dot\r\n"
    dots = [b".\r\n", b"..\r\n", b".x\r\n", b"...\r\n", b". \r\n", b"\r\n", b"a\r\n"]
    while len(out) < size:
        near = (len(out) + 1500) % (64 * 1024) < 3000
        if near:
            out += rng.choice(dots)
        else:
            kind = rng.random()
            if kind < 0.1:
                out += b"." * rng.randint(1, 5) + b"dotted\r\n"
            elif kind < 0.2:
                out += bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 60))) + b"\r\n"
            elif kind < 0.22:
                out += b"x" * 998 + b"\r\n"
            elif kind < 0.25:
                out += b"nul\x00byte\r\n"
            else:
                out += b"w" * rng.randint(0, 200) + b"\r\n"
    out += b".\r\n..\r\n.last\r\n"
    return bytes(out)


def test_multi_megabyte_message_arrives_byte_for_byte(relay_factory) -> None:
    """6 MB of tricky content: the smarthost gets relayd's Received header and then
    exactly the original."""
    server = RecordingServer()
    try:
        relay = smarthost_relay(relay_factory, server.port)
        original = tricky_content(6 * MB)
        send(relay, original)
        wait_for(lambda: server.messages, timeout=60, what="the message at the smarthost")
        [data] = server.messages
        # Byte for byte, but for the NULs the listener strips by default (issue 14.2).
        expected = original.replace(b"\x00", b"")
        assert expected != original and b"nulbyte\r\n" in expected
        assert data.endswith(expected), "content changed on the way"
        assert _RECEIVED.match(data[: len(data) - len(expected)])
        wait_for(lambda: relay.queued() == [], what="the queue to empty")
    finally:
        server.stop()
