"""A start that fails binds nothing: every port bound before the failure is
released (issue 14.3), seen in memory (the process tests see the same from
outside, tests/system/test_start_checks.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from relayd.config import parse
from relayd.errors import ConfigError
from relayd.service import RelayService


class _Port:
    def __init__(self, reactor: _Reactor, port: int) -> None:
        self.reactor, self.port = reactor, port

    def getHost(self) -> Any:
        return None

    def stopListening(self) -> None:
        self.reactor.bound.remove(self.port)


class _Reactor(MemoryReactorClock):
    """Binds every TCP port but ``busy``; remembers which are bound."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy
        self.bound: list[int] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        if port == self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.bound.append(port)
        return _Port(self, port)


def test_http_failure_releases_the_listeners_bound_before_it(tmp_path: Path) -> None:
    config = parse(f"""
[server]
hostname = "relay.test"
spool = "{tmp_path / 'spool'}"
[http]
listen = "tcp:8025:interface=127.0.0.1"
[[listener]]
name = "a"
listen = "tcp:2525:interface=127.0.0.1"
route = "r"
[[listener]]
name = "b"
listen = "tcp:2526:interface=127.0.0.1"
route = "r"
[route.r]
maildir = "{tmp_path / 'outbox'}"
""", "relayd.toml")
    reactor = _Reactor(busy=8025)
    relay = RelayService(config, reactor)
    with pytest.raises(ConfigError) as raised:
        relay.privilegedStartService()
    assert str(raised.value) == ("relayd.toml: http.listen: cannot listen on "
                                 "tcp:8025:interface=127.0.0.1: Address already in use")
    assert reactor.bound == []
    assert all(svc.port is None for svc in relay.listeners)
    # The spool is free again: another start may take it.
    lock = relay.spool.lock()
    assert lock is not None
    os.close(lock)
