"""relayd's configuration: TOML text -> validated, frozen values.

The package splits one job into its parts: :mod:`~relayd.config.types` (the
frozen values every consumer sees), :mod:`~relayd.config.units` (sizes,
durations, rates), :mod:`~relayd.config.endpoints` (the listen grammar),
:mod:`~relayd.config.parser` with :mod:`~relayd.config.fields` and
:mod:`~relayd.config.backends` (TOML -> Config, pure; the module is named
``parser`` so that ``relayd.config.parse`` stays the function), and
:mod:`~relayd.config.render` (check-config's output).  Everything public is
re-exported here, so ``from relayd.config import X`` is the one import path
the rest of relayd uses.
"""

from __future__ import annotations

from relayd.config.parser import (
    DEFAULT_CONFIG_SOURCE,
    DEFAULT_CONFIG_TEXT,
    _validate,
    load,
    load_default,
    parse,
)
from relayd.config.render import SECRET_MASK, render
from relayd.config.types import (
    RESTART_ONLY,
    AuthBackendConfig,
    Config,
    DkimConfig,
    Endpoint,
    HTTPConfig,
    Limits,
    ListenerConfig,
    Network,
    QueueConfig,
    Rate,
    RouteConfig,
    ServerConfig,
    Smarthost,
    TLSConfig,
    restart_only_changes,
)
from relayd.config.units import parse_duration, parse_rate, parse_size

__all__ = [
    "DEFAULT_CONFIG_SOURCE",
    "DEFAULT_CONFIG_TEXT",
    "RESTART_ONLY",
    "SECRET_MASK",
    "AuthBackendConfig",
    "Config",
    "DkimConfig",
    "Endpoint",
    "HTTPConfig",
    "Limits",
    "ListenerConfig",
    "Network",
    "QueueConfig",
    "Rate",
    "RouteConfig",
    "ServerConfig",
    "Smarthost",
    "TLSConfig",
    "_validate",
    "load",
    "load_default",
    "parse",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "render",
    "restart_only_changes",
]
