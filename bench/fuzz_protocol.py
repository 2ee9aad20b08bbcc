#!/usr/bin/env python3
"""Fuzz the ESMTP server protocol for a fixed time with tests/unit/test_fuzz_protocol.py's properties.

Plain ``random`` (no hypothesis database, no shrinking): each input is a
session of random bytes or SMTP-like pieces (commands, dots, CR/LF fragments,
whole transactions with end-of-data look-alikes), cut at random places, with
clock ticks, held/released/failed commits and a disconnect sprinkled in, on a
random listener config.  The properties are ``tests.unit.test_fuzz_protocol.check``.
A failing input is printed (repr of its ops) with the assertion, and the run
goes on to the end unless --stop.

Usage: python3 bench/fuzz_protocol.py [--seconds 60] [--seed N] [--stop]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.unit.test_fuzz_protocol import COMMANDS, FRAGMENTS, check, run_session  # noqa: E402

LISTENERS: list[dict[str, Any]] = [
    {},
    {},
    {"bare_newline": "reject"},
    {"max_message_size": "64", "max_recipients": 1},
    {"max_errors_per_session": 2, "timeout": 5},
    {"mynetworks": ["192.0.2.0/24"]},
]
OPENINGS = [
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
    b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\n",
]
ENDINGS = [b"\r\n.\r\n"] * 4 + [b".\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r\n", b"\r\n", b"\r\n\x00.\r\n"]


def random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def payload(rng: random.Random) -> bytes:
    if rng.random() < 0.25:
        return random_bytes(rng, rng.randint(0, 4096))
    parts = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        if r < 0.35:
            body = b"".join(rng.choice(FRAGMENTS) if rng.random() < 0.6
                            else random_bytes(rng, rng.randint(0, 16))
                            for _ in range(rng.randint(0, 12)))
            parts.append(rng.choice(OPENINGS) + body + rng.choice(ENDINGS))
        elif r < 0.65:
            parts.append(rng.choice(COMMANDS))
        elif r < 0.9:
            parts.append(rng.choice(FRAGMENTS))
        elif r < 0.97:
            parts.append(random_bytes(rng, rng.randint(0, 24)))
        else:
            parts.append(b"X" * rng.randint(500, 13000))
    return b"".join(parts)


def session_ops(rng: random.Random) -> list[tuple[str, Any]]:
    data = payload(rng)
    cuts = sorted({rng.randint(0, len(data)) for _ in range(rng.randint(0, 30))})
    bounds = [0, *cuts, len(data)]
    ops: list[tuple[str, Any]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            ops.append(("data", data[a:b]))
        r = rng.random()
        if r < 0.02:
            ops.append(("tick", rng.choice([301.0, 700.0])))
        elif r < 0.08:
            ops.append(("tick", rng.uniform(0, 10)))
        elif r < 0.2:
            ops.append(("release", None))
        elif r < 0.23:
            ops.append(("fail", None))
    if ops and rng.random() < 0.15:
        ops.insert(rng.randint(0, len(ops)), ("lose", None))
    return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="store_true", help="stop at the first failure")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(seed)
    print(f"fuzzing relayd.smtpd.protocol for {args.seconds:.0f}s, seed {seed}", flush=True)
    deadline = time.monotonic() + args.seconds
    tried = failures = messages = fed = 0
    while time.monotonic() < deadline:
        ops = session_ops(rng)
        hold = rng.random() < 0.4
        listener = rng.choice(LISTENERS)
        try:
            out = run_session(ops, hold=hold, **listener)
            check(out)
            messages += len(out.messages)
            fed += len(out.fed)
        except Exception:
            failures += 1
            print(f"\nFAILURE #{failures} (hold={hold}, listener={listener}):\nops = {ops!r}",
                  flush=True)
            traceback.print_exc()
            if args.stop:
                break
        tried += 1
    print(f"{tried} inputs tried ({fed / 1e6:.1f} MB fed, {messages} messages queued), "
          f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
