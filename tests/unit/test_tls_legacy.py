"""tls_min_version: 1.2 by default; "1.0"/"1.1" let legacy clients in, on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL

from relayd.config import parse
from relayd.tls import ServerTLS
from tests import tlsmem
from tests.certs import make_pki


def handshake(server_ctx: SSL.Context, max_version: int) -> str | None:
    """An in-memory TLS handshake with a client capped at ``max_version``;
    returns the negotiated version, or None when it failed."""
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_max_proto_version(max_version)
    client_ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client = SSL.Connection(client_ctx, None)
    if not tlsmem.handshake(client, SSL.Connection(server_ctx, None)):
        return None
    return client.get_protocol_version_name()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_default_refuses_tls_1_1(pki) -> None:
    """By default a TLS 1.1-only client cannot connect; a TLS 1.2 one can."""
    tls = ServerTLS(str(pki.server.cert), str(pki.server.key), "1.2", name="mta")
    ctx = tls.options.getContext()
    assert handshake(ctx, SSL.TLS1_1_VERSION) is None
    assert handshake(ctx, SSL.TLS1_2_VERSION) == "TLSv1.2"


def test_legacy_minimum_lets_a_tls_1_1_printer_in(pki) -> None:
    """tls_min_version = "1.1" accepts a TLS 1.1 client (and still prefers newer)."""
    tls = ServerTLS(str(pki.server.cert), str(pki.server.key), "1.1", name="printers")
    ctx = tls.options.getContext()
    assert handshake(ctx, SSL.TLS1_1_VERSION) == "TLSv1.1"
    assert handshake(ctx, SSL.TLS1_3_VERSION) == "TLSv1.3"


def test_config_accepts_legacy_versions(tmp_path: Path) -> None:
    text = (f'[tls]\ncert = "{tmp_path}/c"\nkey = "{tmp_path}/k"\n'
            '[[listener]]\nname = "p"\nlisten = "tcp:2525"\ntls_min_version = "1.0"\n'
            '[route.default]\nmaildir = "o"\n')
    assert parse(text).listeners[0].tls_min_version == "1.0"
