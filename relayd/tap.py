"""twistd entry point: where relayd's parts are wired together, and nothing else.

``twistd -n relayd --config FILE`` (and ``relayd run``, which hands twistd the
same service maker) comes here: :class:`Options` reads and checks the config
once, :func:`makeService` builds a :class:`~relayd.service.RelayService`.
The relay itself lives in :mod:`relayd.service`, its ports in
:mod:`relayd.listeners`, the reload in :mod:`relayd.reload`, the parts built
from a config in :mod:`relayd.parts`.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import ServiceMaker
from twisted.python import usage

from relayd.config import Config, load, load_default
from relayd.errors import ConfigError
from relayd.hostname import resolve_hostname
from relayd.listeners import DEFAULT_BACKLOG, ListenerService, SwitchFactory, with_backlog
from relayd.preflight import check_files
from relayd.service import RelayService


def config_path(option: str | None) -> str | None:
    """``--config``, else ``$RELAYD_CONFIG``, else None (the embedded default).

    Never an implicit /etc path: the systemd units name theirs.
    """
    return option or os.environ.get("RELAYD_CONFIG") or None


def load_config(option: str | None) -> Config:
    path = config_path(option)
    return load(path) if path else load_default()


class Options(usage.Options):
    """``relayd``'s twistd options.

    :param config: a config already read and checked (``relayd run`` reads
        it before it starts twistd, to report errors without a traceback);
        then ``--config`` is not read a second time.
    """

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", None,
         "config file (default: $RELAYD_CONFIG, else the embedded try-it-now default)"],
    ]

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self.config: Config | None = config

    def postOptions(self) -> None:
        if self.config is not None:
            return
        try:
            self.config = load_config(self["config"])
            check_files(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class PreloadedServiceMaker(ServiceMaker):
    """The twistd plugin's service maker, handed a config that was read
    already, so ``relayd run`` parses its config file once."""

    def __init__(self, maker: ServiceMaker, config: Config) -> None:
        super().__init__(maker.name, maker.module, maker.description, maker.tapname)
        self._config = config

    @property
    def options(self) -> Any:
        return lambda: Options(self._config)


def makeService(options: Options) -> RelayService:
    from twisted.internet import reactor

    assert options.config is not None
    return RelayService(options.config, reactor)


__all__ = [
    "DEFAULT_BACKLOG",
    "ListenerService",
    "Options",
    "PreloadedServiceMaker",
    "RelayService",
    "SwitchFactory",
    "check_files",
    "config_path",
    "load_config",
    "makeService",
    "resolve_hostname",
    "with_backlog",
]
