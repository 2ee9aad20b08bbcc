"""The unit tier runs in memory.  A test here that binds or connects a socket
or starts a process fails at once with a pointer to the tier it belongs in, so
the directory keeps meaning what it says (and stays fast)."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest

WHY = ("tests/unit opens no sockets and starts no processes: put this test in "
       "tests/integration (loopback, real tools) or tests/system (the relayd process)")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(WHY)


@pytest.fixture(autouse=True)
def _in_memory_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse)
