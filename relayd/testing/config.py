"""Listener configs for tests, built through the real parser so they get
its defaults and validation."""

from __future__ import annotations

import json
from typing import Any

from relayd.config import ListenerConfig, parse


def _toml_value(value: object) -> str:
    """TOML spelling of a Python value; JSON's string escapes are TOML's too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def listener_toml(**overrides: Any) -> str:
    """A complete config file with one listener named ``test``.

    Keyword arguments are listener keys (``mynetworks=[...]``,
    ``max_recipients=3``, ``bare_newline="reject"``, ``timeout=60``, also the
    ``[limits]`` keys such as ``max_errors_per_session``); the route the
    listener names is generated as a maildir route, which nothing here
    touches.
    """
    keys: dict[str, object] = {
        "name": "test",
        "listen": "tcp:0:interface=127.0.0.1",
        "route": "default",
    }
    keys.update(overrides)
    lines = ["[http]", 'listen = "none"', "", "[[listener]]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
    lines += ["", f"[route.{keys['route']}]", 'maildir = "/nonexistent/relayd-test-outbox"']
    return "\n".join(lines) + "\n"


def listener_config(**overrides: Any) -> ListenerConfig:
    """A ``ListenerConfig`` made the way the daemon makes one: through
    ``relayd.config.parse``, so tests get its defaults and validation."""
    return parse(listener_toml(**overrides), "<test>").listeners[0]
