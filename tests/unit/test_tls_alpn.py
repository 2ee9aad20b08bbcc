"""ALPN offers are ignored: a client that offers ``smtp`` or a TLS stack's
default ``h2``/``http/1.1`` completes the handshake with no protocol selected,
as with Postfix (issue 14.1: on the PyPI stack such clients got an
internal-error alert).  In memory, through the connection creator that both
STARTTLS and implicit-TLS listeners use (tests/system/test_tls_alpn.py does it
over TCP with Python's ssl and openssl s_client)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from relayd.tls import ServerTLS
from tests import tlsmem
from tests.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_connection(tls: ServerTLS) -> SSL.Connection:
    """What a listener makes for a new TLS session: the creator's connection,
    its app data the TLS protocol of a real ``TLSMemoryBIOFactory``."""
    factory = TLSMemoryBIOFactory(tls, False, Factory.forProtocol(Protocol))
    return tls.serverConnectionForTLS(factory.buildProtocol(None))


@pytest.mark.parametrize("min_version", ["1.2", "1.1"])
@pytest.mark.parametrize("offer", [[b"smtp"], [b"h2", b"http/1.1"], []],
                         ids=["smtp", "h2+http1.1", "none"])
def test_alpn_offer_is_ignored(pki, offer: list[bytes], min_version: str) -> None:
    tls = ServerTLS(str(pki.server.cert), str(pki.server.key), min_version, name="mta")
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    if offer:
        client.set_alpn_protos(offer)
    assert tlsmem.handshake(client, server_connection(tls))
    assert client.get_alpn_proto_negotiated() == b""


def test_alpn_offer_is_ignored_after_a_certificate_reload(pki) -> None:
    """SIGHUP builds a new context: it must decline ALPN just the same."""
    tls = ServerTLS(str(pki.server.cert), str(pki.server.key), name="mta")
    assert tls.reload()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_alpn_protos([b"h2", b"http/1.1"])
    assert tlsmem.handshake(client, server_connection(tls))
