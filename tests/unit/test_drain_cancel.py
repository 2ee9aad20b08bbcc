"""``relayd drain --cancel`` in memory: the SMTP factory serves again and a
listener rebinds the address it had (the process test is in
tests/system/test_queue_admin.py)."""

from __future__ import annotations

import pytest

from relayd.listeners import same_port
from relayd.testing import smtp_server


@pytest.mark.parametrize(("description", "rebound"), [
    ("tcp:0", "tcp:2525"),
    ("tcp:0:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1"),
    ("tcp:interface=127.0.0.1:port=0", "tcp:interface=127.0.0.1:port=2525"),
    ("tcp6:0:interface=\\:\\:1", "tcp6:2525:interface=\\:\\:1"),
    ("tcp:25:backlog=0", "tcp:25:backlog=0"),
    ("tcp:587", "tcp:587"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_a_listener_rebinds_the_port_it_had(description: str, rebound: str) -> None:
    assert same_port(description, 2525) == rebound


def test_resume_serves_a_session_in_transaction_on_and_ends_the_shutdown() -> None:
    """A drain's shutdown waits for a session in mid-transaction; a cancel ends
    that wait, the session is not told 421 and not cut off after the grace."""
    protocol, transport, clock, sink, metrics = smtp_server()
    factory = protocol.factory
    protocol.dataReceived(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
    transport.clear()
    done = factory.shutdown(30.0)
    assert not done.called and factory.shutting_down
    factory.resume()
    assert done.called and not factory.shutting_down
    clock.advance(31)
    protocol.dataReceived(b"RCPT TO:<b@example.net>\r\n")
    assert transport.value().startswith(b"250")
    assert not transport.disconnecting
