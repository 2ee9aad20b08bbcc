"""Everything ``relayd run`` reads before it binds, checked the same way by
``relayd check-config``, by ``run`` itself and by a reload.

The config package checks what a file *says*; this module checks what the
files it *names* hold: that each can be read, that certificates and keys
load and match, that auth files parse.  One function, :func:`check_files`,
so the three callers cannot drift apart (issue 14: a missing htpasswd file
used to pass ``check-config`` and then stop ``run`` with a traceback).
Errors are :class:`ConfigError` lines ``FILE: key: reason``.
"""

from __future__ import annotations

import os

import attrs
from twisted.internet.task import Clock

from relayd.config import Config
from relayd.errors import ConfigError
from relayd.parts import dkim_signer, make_auth_backend, server_tls
from relayd.tables import RoutingTables
from relayd.tls import ServerTLS, route_client_tls


def named_files(config: Config) -> list[tuple[str, str]]:
    """``(key, path)`` for every file a key of ``config`` names (secret files
    are read while the config is parsed, so they are not listed)."""
    files: list[tuple[str, str | None]] = []
    if config.tls is not None:
        files += [("tls.cert", config.tls.cert), ("tls.key", config.tls.key)]
    for lc in config.listeners:
        label = f"listener[{lc.name}]"
        files += [(f"{label}.tls_cert", lc.tls_cert), (f"{label}.tls_key", lc.tls_key)]
    for name, ab in config.auth.items():
        files += [(f"auth.{name}.file", ab.file), (f"auth.{name}.senders_file", ab.senders_file),
                  (f"auth.{name}.ca_file", ab.ca_file)]
    for name, rc in config.routes.items():
        files += [(f"route.{name}.ca_file", rc.ca_file),
                  (f"route.{name}.client_cert", rc.client_cert),
                  (f"route.{name}.client_key", rc.client_key)]
    return [(key, path) for key, path in files if path is not None]


def _check_readable(config: Config, key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(config.source, key, f"{path}: cannot read: {e.strerror or e}") from None


def _check_directory(config: Config, key: str, path: str) -> None:
    """A directory ``run`` creates if it is missing: what exists of it must
    be a directory (a file in the way stops the start)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(config.source, key, f"{probe} is not a directory")


def check_files(config: Config) -> None:
    """Read what ``config`` points at now, so a missing or broken file is a
    config error before anything listens, whether or not a listener uses it.

    :raises ConfigError: ``FILE: key: reason`` for the first problem.
    """
    for key, path in named_files(config):
        _check_readable(config, key, path)
    # The alias file and the sender map, parsed as at run time (FILE:LINE).
    RoutingTables(config, Clock())
    # The spool stops a start; a maildir does not (a delivery into a broken
    # one is deferred and retried, so the mail waits in the spool).
    _check_directory(config, "server.spool", config.server.spool)
    if config.tls is not None:
        # The shared certificate, even when no listener uses it yet: a
        # reload that turns TLS on must not be the first to find it broken.
        try:
            ServerTLS(config.tls.cert, config.tls.key, cert_label="tls.cert",
                      key_label="tls.key", name="[tls]")
        except ConfigError as e:
            raise ConfigError(config.source, e.key, f"{e.source}: {e.reason}") from None
    for listener in config.listeners:
        if listener.tls == "none" and listener.tls_cert is not None:
            # Loaded as if it served TLS: the same checks as when it does.
            listener = attrs.evolve(listener, tls="starttls")
        server_tls(config, listener)
    for name in config.auth:
        # Built (which reads and parses its files) and dropped, never started.
        make_auth_backend(config, name, Clock())
    for route in config.routes.values():
        try:
            route_client_tls(route)
        except ConfigError as e:
            raise ConfigError(config.source, e.key, e.reason) from None
    dkim_signer(config)
