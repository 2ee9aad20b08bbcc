"""The live routing tables: the config's rules, the watched alias file and
the sender map, as cleanup and ``relayd address`` use them.

:class:`relayd.routing.Router` is a pure value; this is the one place that
reads the files behind it (the alias file, the sender map file), so
``check-config``, ``run``, a reload and ``relayd address`` read them the
same way and fail with the same ``FILE: key: reason``.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from relayd.address import address_key
from relayd.aliases import AliasFile, AliasFileError, AliasTable
from relayd.config import Config
from relayd.errors import ConfigError
from relayd.rewrite import MapSyntaxError, SenderRewriter, parse_map
from relayd.routing import ROUTE, Context, Decision, Resolution, Router


def load_rewriter(config: Config) -> SenderRewriter:
    """``[rewrite]``: the file's entries, then the inline ones (which win)."""
    rw = config.rewrite
    if rw is None:
        return SenderRewriter()
    entries: dict[str, str] = {}
    if rw.senders_file is not None:
        try:
            with open(rw.senders_file, encoding="utf-8") as f:
                entries.update(parse_map(f.read(), rw.senders_file))
        except OSError as e:
            raise ConfigError(config.source, "rewrite.senders_file",
                              f"cannot read {rw.senders_file}: {e.strerror or e}") from None
        except (MapSyntaxError, UnicodeDecodeError) as e:
            raise ConfigError(config.source, "rewrite.senders_file", str(e)) from None
    inline = SenderRewriter.of(rw.senders)
    return SenderRewriter({**entries, **inline.entries}, rw.headers)


class RoutingTables:
    """What cleanup consults for every recipient and sender.

    :raise ConfigError: the alias file or the sender map cannot be read or
        has a bad line (at start and at reload: the running tables stay).
    """

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self.alias_file: AliasFile | None = None
        if config.aliases is not None:
            try:
                self.alias_file = AliasFile(config.aliases.file, config.aliases.domains, clock)
            except OSError as e:
                raise ConfigError(config.source, "aliases.file",
                                  f"cannot read {config.aliases.file}: {e.strerror or e}"
                                  ) from None
            except (AliasFileError, UnicodeDecodeError) as e:
                raise ConfigError(config.source, "aliases.file", str(e)) from None
        self.rules = Router.of(config.routing).rules
        self.rewriter = load_rewriter(config)
        self._router = Router(self.rules, self._table())

    def _table(self) -> AliasTable:
        return self.alias_file.table if self.alias_file is not None else AliasTable()

    @property
    def router(self) -> Router:
        """The router, with the alias file reread first if it changed."""
        if self.alias_file is not None:
            table = self.alias_file.refresh()
            if table is not self._router.aliases:
                self._router = Router(self.rules, table)
        return self._router

    def resolve(self, recipient: str, ctx: Context) -> Resolution:
        return self.router.resolve(recipient, ctx)


@frozen
class Plan:
    """The recipients of one message as cleanup queues them.

    :param routes: per recipient; ``()`` when all take the listener's route
        (the envelope then looks exactly as before routing existed).
    :param dropped: decisions that are logged and never delivered: discards,
        and alias targets a rule rejects when the RCPT itself was accepted.
    """

    recipients: tuple[str, ...]
    routes: tuple[str, ...]
    originals: tuple[str, ...]
    dropped: tuple[Decision, ...]


def plan(resolutions: Iterable[Resolution], listener_route: str) -> Plan:
    """Flatten the RCPTs' resolutions: duplicates go (first one wins, as
    Postfix's cleanup does), discards and rejected alias targets are set
    aside for the log."""
    seen: set[str] = set()
    rcpts: list[str] = []
    routes: list[str] = []
    originals: list[str] = []
    dropped: list[Decision] = []
    for resolution in resolutions:
        for d in resolution.decisions:
            if d.action != ROUTE:
                dropped.append(d)
                continue
            key = address_key(d.recipient)
            if key in seen:
                continue
            seen.add(key)
            rcpts.append(d.recipient)
            routes.append(d.route)
            originals.append(d.original)
    return Plan(
        tuple(rcpts),
        () if all(r == listener_route for r in routes) else tuple(routes),
        tuple(originals) if any(originals) else (),
        tuple(dropped),
    )
