"""TLS handshakes in memory (pyOpenSSL connections over memory BIOs): real
OpenSSL on both sides, no socket, so unit tests can probe a server context."""

from __future__ import annotations

from OpenSSL import SSL


def handshake(client: SSL.Connection, server: SSL.Connection) -> bool:
    """Drive both ends until the handshake completes (True) or either end
    fails (False).  Both connections must be made with a ``None`` socket."""
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return False
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
        try:
            server.do_handshake()
            client.do_handshake()
            return True
        except SSL.WantReadError:
            continue
        except SSL.Error:
            return False
    return False
