"""The smarthost connection cache (relayd.courier.smarthost.pool): a cached
connection is only handed to a caller with the same session key —
destination, TLS policy and SASL identity (issue 15.3: two routes to one
host:port with different usernames never share a connection) — and the
concurrency bound holds while idle connections of another session make room."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.config import RouteConfig, Smarthost
from relayd.courier.smarthost import (
    IDLE_TIMEOUT,
    ConnectionPool,
    SessionKey,
    SMTPClientProtocol,
    session_key,
)

HOST = Smarthost("smtp.example.net", 587)


def result(d: Any) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def connect(clock: Clock) -> SMTPClientProtocol:
    proto = SMTPClientProtocol(clock, HOST)
    proto.makeConnection(StringTransport())
    return proto


def opened(pool: ConnectionPool, key: SessionKey, clock: Clock) -> SMTPClientProtocol:
    assert result(pool.acquire(key)) is None  # a slot
    conn = connect(clock)
    pool.add(conn, key)
    return conn


def route(**kw: Any) -> RouteConfig:
    kw.setdefault("smarthost", (HOST,))
    return RouteConfig(name=kw.pop("name", "r"), **kw)


ALICE = session_key(route(username="alice", password="s3cret"))


def test_route_keys_include_sasl_identity_and_tls_policy() -> None:
    assert session_key(route(name="other", username="alice", password="b")) == ALICE
    different = [
        route(username="bob", password="a"),
        route(),
        route(username="alice", password="a", tls="implicit"),
        route(username="alice", password="a", tls_verify=False),
        route(username="alice", password="a", ca_file="/etc/relayd/ca.pem"),
        route(username="alice", password="a", tls_server_name="mail.example.net"),
        route(username="alice", password="a", client_cert="/c.pem", client_key="/k.pem"),
        route(username="alice", password="a", smarthost=(Smarthost("smtp.example.net", 25),)),
    ]
    for r in different:
        assert session_key(r) != ALICE, r
    # The password is not part of the key, and the key never shows it.
    assert "s3cret" not in repr(ALICE) and "s3cret" not in attrs.astuple(ALICE)


def test_idle_connection_only_reused_with_an_equal_key() -> None:
    clock = Clock()
    pool = ConnectionPool("r", 10, clock)
    bob = attrs.evolve(ALICE, username="bob")
    plain = attrs.evolve(ALICE, tls="none")
    conn = opened(pool, ALICE, clock)
    pool.release(conn, reusable=True)
    assert pool.idle_connections == 1
    # Same host:port, another user or another TLS policy: a new slot, never conn.
    assert result(pool.acquire(bob)) is None
    assert result(pool.acquire(plain)) is None
    # The same session: the cached connection.
    assert result(pool.acquire(ALICE)) is conn


def test_full_pool_closes_an_idle_connection_of_another_session_to_make_room() -> None:
    clock = Clock()
    pool = ConnectionPool("r", 1, clock)
    bob = attrs.evolve(ALICE, username="bob")
    conn = opened(pool, ALICE, clock)
    pool.release(conn, reusable=True)
    waiting = pool.acquire(bob)
    # Not handed over: it is QUIT, and the slot frees only once it is gone.
    assert not waiting.called
    assert conn.closing and conn.transport.value().endswith(b"QUIT\r\n")
    assert pool.connections == 1
    conn.connectionLost(Failure(ConnectionError("closed")))
    assert result(waiting) is None and pool.connections == 1


def test_waiter_with_the_same_key_gets_the_released_connection() -> None:
    clock = Clock()
    pool = ConnectionPool("r", 1, clock)
    conn = opened(pool, ALICE, clock)
    waiting = pool.acquire(ALICE)
    assert not waiting.called
    pool.release(conn, reusable=True)
    assert result(waiting) is conn and pool.idle_connections == 0


def test_idle_connections_close_after_the_idle_timeout_and_on_stop() -> None:
    clock = Clock()
    pool = ConnectionPool("r", 2, clock)
    first, second = opened(pool, ALICE, clock), opened(pool, ALICE, clock)
    pool.release(first, reusable=True)
    clock.advance(IDLE_TIMEOUT)
    assert first.closing and pool.idle_connections == 0
    pool.release(second, reusable=True)
    stopped = pool.stop()
    assert second.closing and not stopped.called
    second.connectionLost(Failure(ConnectionError("closed")))
    assert stopped.called
    assert result(pool.acquire(ALICE)).check(Exception)
