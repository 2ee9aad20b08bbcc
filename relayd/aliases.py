"""``[aliases]``: the few addresses a relay owns (Postfix ``virtual_alias_maps``).

File format (design §1b), one entry a line::

    # comment
    uss@uss.example.org: alice@example.net, bob      # bob = bob@uss.example.org
    postmaster: root@example.org                     # this user in every alias domain
    @uss.example.org: desk@example.org               # catch-all
    @old.example.org: @new.example.org               # domain rename (keeps the user)
        continued@example.org                        # indented: more targets for the line above

Lookup for ``user+tag@domain``, first hit wins: ``user+tag@domain``,
``user@domain``, ``user+tag``, ``user``, ``@domain`` (the ``+tag`` is tried,
then dropped, as Postfix's ``recipient_delimiter``).  Expansion is recursive
to :data:`MAX_DEPTH` levels, an address that lists itself is kept as a
final recipient (Postfix's idiom for "deliver here too"), any other loop is
an error, and duplicates are removed.

Why this cannot make an open relay: only addresses in ``domains`` are ever
looked up; the targets are the ones the file names, and a domain rename
(``@a: @b``) refuses local parts that route on (``x%evil@a``), so a client
outside mynetworks reaches nothing the file does not name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayd.address import (
    DomainError,
    address_key,
    domain_key,
    lenient_domain_key,
    routes_onward,
    split_address,
)

log = Logger(namespace="relayd.aliases")

#: Levels of alias-of-alias (chasquid's limit; Postfix allows 1000).
MAX_DEPTH = 10
#: Recipients one address may expand to (Postfix virtual_alias_expansion_limit).
MAX_TARGETS = 1000
#: Seconds between stat() calls on the alias file.
CHECK_INTERVAL = 1.0

_TARGET = re.compile(r"^[^\s<>()\[\],;:\"\\]+$")


class AliasError(Exception):
    """Expansion cannot finish (loop, too deep, too wide)."""


class AliasFileError(ValueError):
    """A line of the alias file is wrong: ``FILE:LINE: reason``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@frozen
class AliasTable:
    """The parsed alias file: lookup key -> targets as written.

    Keys are ``user@domain``, ``user`` (any alias domain) or ``@domain``,
    in :func:`relayd.address.address_key` form.
    """

    domains: frozenset[str] = frozenset()
    entries: Mapping[str, tuple[str, ...]] = field(factory=dict)
    source: str = ""

    def covers(self, address: str) -> bool:
        """Is ``address`` in an alias domain (so the table decides it)?"""
        if not self.domains:
            return False
        _, domain = split_address(address)
        return domain is not None and lenient_domain_key(domain) in self.domains

    def lookup(self, address: str) -> tuple[str, ...] | None:
        """One level: the targets for ``address`` (bare users and domain
        renames made full addresses), or None when the table has no entry."""
        local, domain = split_address(address)
        if domain is None:
            return None
        dkey = lenient_domain_key(domain)
        lkey = local.lower()
        base = lkey.split("+", 1)[0] if "+" in lkey[1:] else None
        keys = [f"{lkey}@{dkey}"]
        if base:
            keys.append(f"{base}@{dkey}")
        keys.append(lkey)
        if base:
            keys.append(base)
        keys.append("@" + dkey)
        for key in keys:
            targets = self.entries.get(key)
            if targets is None:
                continue
            out = []
            for target in targets:
                if target.startswith("@"):
                    if routes_onward(local):
                        # x%evil.example@old -> x%evil.example@new could be
                        # routed on by the next hop: not for a rename.
                        return None
                    out.append(local + target)
                elif "@" not in target:
                    out.append(f"{target}@{domain}")
                else:
                    out.append(target)
            return tuple(out)
        return None

    def expand(self, address: str) -> tuple[str, ...]:
        """Every final recipient for ``address``, in order, without duplicates;
        ``()`` when ``address`` is in an alias domain but not in the table.

        Targets in an alias domain that the table does not list are dropped
        (logged): they could only be delivered nowhere.
        """
        out: dict[str, str] = {}
        self._expand(address, (), out)
        return tuple(out.values())

    def _expand(self, address: str, ancestry: tuple[str, ...], out: dict[str, str]) -> None:
        if len(ancestry) > MAX_DEPTH:
            raise AliasError(f"alias expansion deeper than {MAX_DEPTH} levels")
        key = address_key(address)
        if not self.covers(address):
            out.setdefault(key, address)
        else:
            targets = self.lookup(address)
            if targets is None:
                if ancestry:
                    log.warn("alias {parent} names {target}, which is in an alias domain but "
                             "not in {source}: dropped", parent=ancestry[-1], target=address,
                             source=self.source)
                return
            for target in targets:
                tkey = address_key(target)
                if tkey == key:
                    out.setdefault(key, target)
                    continue
                if tkey in ancestry:
                    raise AliasError(f"alias loop through {target}")
                self._expand(target, ancestry + (key,), out)
        if len(out) > MAX_TARGETS:
            raise AliasError(f"alias expands to more than {MAX_TARGETS} recipients")


def _key(text: str, domains: frozenset[str]) -> str:
    """The lookup key of the left-hand side, or ValueError."""
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"bad alias {text!r}")
    local, domain = split_address(text)
    if domain is None:
        return local.lower()
    try:
        dkey = domain_key(domain)
    except DomainError as e:
        raise ValueError(str(e)) from None
    if dkey not in domains:
        raise ValueError(f"{domain!r} is not one of [aliases] domains")
    return f"{local.lower()}@{dkey}"


def _targets(text: str) -> list[str]:
    out = []
    for target in re.split(r"[,\s]+", text.strip()):
        if not target:
            continue
        if target.startswith(("|", "/", ":include:")):
            raise ValueError(f"{target!r}: relayd delivers to addresses only "
                             "(no pipes, files or includes)")
        if not _TARGET.match(target) or target.count("@") > 1 or target.endswith("@"):
            raise ValueError(f"{target!r} is not an address")
        local, domain = split_address(target)
        if domain is not None:
            try:
                domain_key(domain)
            except DomainError as e:
                raise ValueError(str(e)) from None
        elif not local:
            raise ValueError("empty target")
        out.append(target)
    return out


def parse_aliases(text: str, path: str, domains: Iterable[str]) -> AliasTable:
    """Parse the alias file; the first bad line raises :class:`AliasFileError`."""
    keyed = frozenset(lenient_domain_key(d) for d in domains)
    entries: dict[str, list[str]] = {}
    where: dict[str, int] = {}
    last: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        try:
            if line[0].isspace():
                if last is None:
                    raise ValueError("indented continuation line without an alias above it")
                entries[last] += _targets(line)
                continue
            left, colon, right = line.partition(":")
            if not colon:
                raise ValueError('expected "alias: target, target"')
            key = _key(left.strip(), keyed)
            if key in where:
                raise ValueError(f"{left.strip()!r} is already defined on line {where[key]}")
            targets = _targets(right)
            if not targets:
                raise ValueError(f"{left.strip()!r} has no target")
        except ValueError as e:
            raise AliasFileError(path, number, str(e)) from None
        entries[key] = targets
        where[key] = number
        last = key
    return AliasTable(keyed, {k: tuple(v) for k, v in entries.items()}, path)


def read_aliases(path: str, domains: Iterable[str]) -> AliasTable:
    """Read and parse; OSError and :class:`AliasFileError` go to the caller."""
    with open(path, encoding="utf-8") as f:
        return parse_aliases(f.read(), path, domains)


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class AliasFile:
    """The alias file, reread when it changes (inode, size or mtime), at
    most once per :data:`CHECK_INTERVAL`.  A broken line or an unreadable
    file keeps the table in force and logs ``FILE:LINE: reason`` once per
    change, so an editor's half-saved file never loses the good table.

    :param on_change: called with each new table.
    """

    def __init__(self, path: str, domains: Iterable[str], clock: IReactorTime,
                 on_change: Callable[[AliasTable], None] | None = None) -> None:
        self.path = path
        self.domains = tuple(domains)
        self._clock = clock
        self._on_change = on_change
        self._ident = _identity(path)
        self.table = read_aliases(path, self.domains)
        self._checked = clock.seconds()
        self._bad: object = None

    def refresh(self) -> AliasTable:
        """The table, reread first if the file changed."""
        now = self._clock.seconds()
        if now - self._checked < CHECK_INTERVAL:
            return self.table
        self._checked = now
        try:
            ident = _identity(self.path)
            if ident == self._ident or ident == self._bad:
                return self.table
            table = read_aliases(self.path, self.domains)
        except (OSError, UnicodeDecodeError, AliasFileError) as e:
            try:
                bad: object = _identity(self.path)
            except OSError:
                bad = "unreadable"
            if bad != self._bad:
                log.error("cannot reload the alias file, the previous table stays: {error}",
                          error=str(e))
            self._bad = bad
            return self.table
        self._ident, self._bad = ident, None
        self.table = table
        log.info("reloaded {path}: {count} aliases", path=self.path, count=len(table.entries))
        if self._on_change is not None:
            self._on_change(table)
        return table
