"""Send a reply now instead of on the reactor's next turn.

Twisted's ``transport.write`` only buffers: it registers the socket for
writing (an ``epoll_ctl``), and the send happens on the next loop iteration,
after which the socket is unregistered again (another ``epoll_ctl``).  An
SMTP exchange is a string of small request/reply turns, so on a busy relay
that is two system calls and one extra trip round the loop per reply: the
profile of the 20-session bench showed ~10% of the reactor thread in
``epoll_ctl`` for it.  When nothing is waiting in the transport's buffer, a
plain TCP connection can send at once; anything else (TLS, a partial send,
data already queued, a pull producer that waits for the buffer to drain)
takes Twisted's path, so ordering and flow control are unchanged.

This is the one module of relayd that reads a private attribute of Twisted,
and it stays here alone: whether a transport still holds unsent data is
answered by no public interface (``ITransport``/``IConsumer`` have no
"buffered bytes" query; ``IReactorFDSet.getWriters()`` builds a list of
every writing connection, a cost per reply that grows with the connections).  ``FileDescriptor``
keeps data written but not yet sent in ``_tempDataBuffer`` (appended by
``write``) and ``dataBuffer[offset:]`` (being sent by ``doWrite``), the same
in Twisted 22.4 (Debian 12) and 26.x; ``tests/unit/test_netio_twisted_pin.py``
pins that on both, so a Twisted that changes it fails the tests before it
can reorder a reply in production.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once when that is safe."""
    if (
        type(transport) in _PLAIN_TCP
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
        and (transport.producer is None or transport.streamingProducer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # An error: Twisted's own write path meets it again and closes the
        # connection the usual way.
    transport.write(data)
