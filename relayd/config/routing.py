"""``[[routing]]``, ``[aliases]`` and ``[rewrite]``: read and checked.

Values only; the matching is :mod:`relayd.routing`'s.  Every mistake is
found here with ``FILE: routing[N].key: reason`` (a rule naming an unknown
route or listener, a domain IDNA refuses, a reject that is not 5xx), so a
bad rule never reaches a running relay.
"""

from __future__ import annotations

import re

from attrs import frozen

from relayd.address import DomainError, address_key, domain_key, lenient_domain_key
from relayd.address import split_address as _split
from relayd.config.fields import _array, _bool, _networks, _pattern, _string, _Table
from relayd.config.units import toml_string as _toml_string
from relayd.errors import ConfigError
from relayd.ipaddr import IPNetwork

ROUTING_KEYS = ("recipients", "recipient_domains", "senders", "sender_domains", "listeners",
                "users", "clients", "route", "reject", "discard")
MATCH_KEYS = ROUTING_KEYS[:7]
ALIASES_KEYS = ("domains", "file")
REWRITE_KEYS = ("senders", "senders_file", "headers")


@frozen
class RoutingRule:
    """One ``[[routing]]`` entry.  A match key left out is None (not looked
    at); exactly one action is set."""

    recipients: tuple[str, ...] | None = None
    recipient_domains: tuple[str, ...] | None = None
    senders: tuple[str, ...] | None = None
    sender_domains: tuple[str, ...] | None = None
    listeners: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None
    clients: tuple[IPNetwork, ...] | None = None
    route: str | None = None
    reject: str | None = None
    discard: bool = False


@frozen
class AliasesConfig:
    """``[aliases]``: the domains whose addresses the file owns."""

    domains: tuple[str, ...]
    file: str


@frozen
class RewriteConfig:
    """``[rewrite]``: the sender map (inline ``senders`` and/or a Postfix
    canonical(5)-style ``senders_file``; inline entries win) and whether the
    From:/Sender:/Reply-To: headers are rewritten too."""

    senders: tuple[tuple[str, str], ...] = ()
    senders_file: str | None = None
    headers: bool = False


_REPLY = re.compile(r"^(5[0-5][0-9]) (5\.[0-9]{1,3}\.[0-9]{1,3})(?: (.*))?\Z", re.S)


def parse_reply(text: str) -> tuple[int, str, str]:
    """``"550 5.7.1 text"`` -> ``(550, "5.7.1", "text")``.

    :raise ValueError: not a 5xx reply with a 5.X.Y enhanced code.
    """
    m = _REPLY.match(text.strip())
    if m is None or any(ord(c) < 0x20 for c in text):
        raise ValueError('must be a permanent reply "5xx 5.X.Y text", e.g. '
                         '"550 5.7.1 Mail to this domain is not relayed"')
    return int(m.group(1)), m.group(2), m.group(3) or "Recipient address rejected"


def map_key(text: str) -> str:
    """The lookup key of a sender map entry's left side (``a@b`` or ``@b``).

    :raise ValueError: anything else.
    """
    text = text.strip()
    local, domain = _split(text)
    if not domain or any(c.isspace() or c in "<>," for c in text) or (
            not local and not text.startswith("@")):
        raise ValueError(f"{text!r}: expected user@domain or @domain")
    try:
        dkey = domain_key(domain)
    except DomainError as e:
        raise ValueError(str(e)) from None
    return address_key(text) if local else "@" + dkey


def map_value(text: str) -> str:
    """A sender map entry's right side, checked: ``user@domain`` or ``@domain``."""
    map_key(text)
    return text.strip()


def _strings(t: _Table, name: str) -> tuple[str, ...] | None:
    if not t.has(name):
        return None
    key = t.key(name)
    items = _array(t.data[name], t.source, key)
    if not items:
        raise t.error(name, "must not be empty (leave the key out to match anything)")
    return tuple(_string(item, t.source, f"{key}[{i}]") for i, item in enumerate(items))


def _check_domain(t: _Table, name: str, i: int, text: str) -> str:
    try:
        return domain_key(text)
    except DomainError as e:
        raise ConfigError(t.source, f"{t.key(name)}[{i}]", str(e)) from None


def _domains(t: _Table, name: str, wildcards: bool = True) -> tuple[str, ...] | None:
    entries = _strings(t, name) or ()
    for i, entry in enumerate(entries):
        if wildcards and entry == "*":
            continue
        key = _check_domain(t, name, i, entry[1:] if wildcards and entry[:1] == "." else entry)
        if not key or any(c.isspace() or c in "@*<>,[]" for c in key) or ".." in key:
            hint = ' (exact, ".sub" for subdomains, or "*")' if wildcards else ""
            raise ConfigError(t.source, f"{t.key(name)}[{i}]",
                              f"{_toml_string(entry)} is not a domain{hint}")
    return entries or None


def _addresses(t: _Table, name: str, null: bool) -> tuple[str, ...] | None:
    entries = _strings(t, name) or ()
    for i, entry in enumerate(entries):
        if not (null and entry == "<>"):
            _pattern(entry, t.source, f"{t.key(name)}[{i}]")
            domain = _split(entry)[1]
            if domain and "*" not in domain:
                _check_domain(t, name, i, domain)
    return entries or None


def _rule(source: str, index: int, data: object, routes: frozenset[str],
          listeners: frozenset[str]) -> RoutingRule:
    t = _Table(source, f"routing[{index}]", data, ROUTING_KEYS)
    listed = _strings(t, "listeners")
    for i, name in enumerate(listed or ()):
        if name not in listeners:
            raise ConfigError(source, f"{t.key('listeners')}[{i}]",
                              f"unknown listener {_toml_string(name)}")
    rule = RoutingRule(
        recipients=_addresses(t, "recipients", null=False),
        recipient_domains=_domains(t, "recipient_domains"),
        senders=_addresses(t, "senders", null=True),
        sender_domains=_domains(t, "sender_domains"),
        listeners=listed,
        users=_strings(t, "users"),
        clients=_networks(t.data["clients"], source, t.key("clients")) if t.has("clients")
        else None,
        route=t.optional("route", _string),
        reject=t.optional("reject", _string),
        discard=t.get("discard", _bool, False),
    )
    if t.has("clients") and not rule.clients:
        raise t.error("clients", "must not be empty (leave the key out to match anything)")
    actions = [k for k in ("route", "reject") if t.has(k)] + (["discard"] if rule.discard else [])
    if len(actions) != 1:
        raise ConfigError(source, t.path, 'needs exactly one action: route = "NAME", '
                          'reject = "5xx 5.X.Y text" or discard = true'
                          + (f" (has {', '.join(actions)})" if actions else ""))
    if rule.route is not None and rule.route not in routes:
        raise t.error("route", f"unknown route {_toml_string(rule.route)}")
    if rule.reject is not None:
        try:
            parse_reply(rule.reject)
        except ValueError as e:
            raise t.error("reject", str(e)) from None
    return rule


def parse_routing(source: str, data: object, routes: frozenset[str],
                  listeners: frozenset[str]) -> tuple[RoutingRule, ...]:
    """``[[routing]]`` (absent: no rules)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(source, "routing",
                          "must be an array of tables: write [[routing]], not [routing]")
    return tuple(_rule(source, i, item, routes, listeners) for i, item in enumerate(data))


def parse_aliases_section(source: str, data: object) -> AliasesConfig | None:
    """``[aliases]`` (absent: no alias domains).  The file itself is read
    by the caller's file check (``relayd.aliases``), as at run time."""
    if data is None:
        return None
    t = _Table(source, "aliases", data, ALIASES_KEYS)
    domains = _domains(t, "domains", wildcards=False)
    if not domains:
        raise t.error("domains", "required: the domains whose addresses the file owns")
    keys = [lenient_domain_key(d) for d in domains]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ConfigError(source, f"aliases.domains[{i}]", f"{_toml_string(domains[i])} "
                              "is listed twice")
    return AliasesConfig(domains=domains, file=t.required("file", _string))


def parse_rewrite(source: str, data: object) -> RewriteConfig:
    """``[rewrite]`` (absent: nothing is rewritten)."""
    if data is None:
        return RewriteConfig()
    t = _Table(source, "rewrite", data, REWRITE_KEYS)
    pairs: list[tuple[str, str]] = []
    if t.has("senders"):
        table = t.data["senders"]
        if not isinstance(table, dict):
            raise t.error("senders", 'must be a table like { "@app.internal" = "@example.org" }')
        for k, v in table.items():
            key = f'rewrite.senders."{k}"'
            try:
                map_key(k)
            except ValueError as e:
                raise ConfigError(source, key, str(e)) from None
            text = _string(v, source, key)
            try:
                pairs.append((k, map_value(text)))
            except ValueError as e:
                raise ConfigError(source, key, str(e)) from None
    return RewriteConfig(senders=tuple(pairs), senders_file=t.optional("senders_file", _string),
                         headers=t.get("headers", _bool, False))


def render_routing(rules: tuple[RoutingRule, ...], aliases: AliasesConfig | None,
                   rewrite: RewriteConfig | None) -> list[str]:
    """check-config's lines for these sections (valid TOML, parses back)."""
    def strings(values: tuple[object, ...]) -> str:
        return "[" + ", ".join(_toml_string(str(v)) for v in values) + "]"

    lines: list[str] = []
    for rule in rules:
        lines += ["", "[[routing]]"]
        for key in MATCH_KEYS:
            value = getattr(rule, key)
            if value is not None:
                lines.append(f"{key} = {strings(value)}")
        if rule.route is not None:
            lines.append(f"route = {_toml_string(rule.route)}")
        if rule.reject is not None:
            lines.append(f"reject = {_toml_string(rule.reject)}")
        if rule.discard:
            lines.append("discard = true")
    if aliases is not None:
        lines += ["", "[aliases]", f"domains = {strings(aliases.domains)}",
                  f"file = {_toml_string(aliases.file)}"]
    if rewrite is not None:
        lines += ["", "[rewrite]"]
        lines.append("# senders_file = (unset)" if rewrite.senders_file is None
                     else f"senders_file = {_toml_string(rewrite.senders_file)}")
        lines.append(f"headers = {'true' if rewrite.headers else 'false'}")
        if rewrite.senders:
            lines += ["", "[rewrite.senders]"]
            lines += [f"{_toml_string(k)} = {_toml_string(v)}" for k, v in rewrite.senders]
    return lines
