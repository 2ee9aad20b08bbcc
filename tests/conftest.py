import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from tests.relay import Relay


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator:
    """Start relays in a test's own directory; every one is stopped after."""
    started: list[Relay] = []

    def make(subdir: str = "relay", start: bool = True, **kwargs) -> Relay:
        d = tmp_path / subdir
        d.mkdir(exist_ok=True)
        relay = Relay(d, **kwargs)
        started.append(relay)
        if start:
            relay.start()
        return relay

    yield make
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(relay_factory) -> Relay:
    return relay_factory()


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture
def auth_events() -> Iterator[list[dict[str, Any]]]:
    """The log events of the ``relayd.auth`` namespace emitted during the test."""
    captured: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "relayd.auth":
            captured.append(event)

    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)
