"""A real MTA sends to relayd with BDAT (RFC 3030 CHUNKING, issue 14.6).

Exim 4.96 (Debian 12, private: tests/exim.py) relays through relayd as its
smarthost; relayd advertises CHUNKING, so Exim sends the message as BDAT
chunks: its transcript shows ``BDAT n LAST`` answered by relayd's
``250 2.0.0 Ok: queued as``, and the message arrives whole in relayd's outbox.
"""

from __future__ import annotations

import re

from tests.exim import Exim


def test_exim_sends_with_bdat_and_the_message_arrives(relay_factory) -> None:
    relay = relay_factory()
    exim = Exim(relay.smtp_port)
    body = "".join(f"line {n}: .dot ..dots CRLF.CRLF never ends BDAT\n" for n in range(2000))
    message = ("From: app@example.org\nTo: user@example.net\nSubject: via exim bdat\n\n"
               + ".\n" + body + ".\n").encode()
    transcript = exim.send("app@example.org", "user@example.net", message)
    # ">>" a command on its own, "+>" pipelined behind others.
    assert re.search(r"SMTP[>+]> BDAT \d+ LAST", transcript), transcript
    assert re.search(r"SMTP<< 250 2\.0\.0 Ok: queued as \w+", transcript), transcript
    assert not re.search(r"SMTP[>+|]> DATA", transcript), transcript
    # Exim pipelines QUIT and shuts its sending side before relayd's 250 for the
    # last chunk: the 250 still comes (half-close), so Exim does not send it again.
    assert "Remote host closed connection" not in transcript, transcript
    [path] = relay.wait_delivered(1)
    delivered = path.read_bytes().replace(b"\r\n", b"\n")
    assert b"Subject: via exim bdat\n" in delivered
    assert delivered.endswith(b"\n\n.\n" + body.encode() + b".\n") or (
        b"\n.\n" + body.encode() + b".\n") in delivered, delivered[-300:]
