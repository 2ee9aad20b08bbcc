"""TOML text -> validated, frozen configuration.

Everything that can be wrong with a config file is found here, before the
daemon binds a port or touches the spool, so ``relayd check-config`` can vouch
for a file and a SIGHUP can refuse a bad one while the old one keeps running.
Every error names the file, the key and the reason (:class:`ConfigError`).

The package is pure on purpose: no Twisted, no DNS, no sockets.  The only I/O
is reading the config file itself (:func:`load`) and the ``*_file`` secrets,
which are read at load time so that a missing secret stops start-up instead
of the first delivery.

Over 400 lines because the checks that span sections (listener names, port
clashes, routes and auth backends that must exist) belong with the
top-level walk that sees every section; new sections of their own
(``[auth.*]``, ``[route.*]``) live in :mod:`relayd.config.backends`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs

from relayd.config.backends import _auth_backend, _named_tables, _route
from relayd.config.endpoints import _clash, _endpoint, _optional_endpoint
from relayd.config.fields import (
    _NAME_RE,
    _address,
    _array,
    _bool,
    _choice,
    _Converter,
    _duration,
    _hostname,
    _int_at_least,
    _mynetworks,
    _networks,
    _patterns,
    _positive_size,
    _rate,
    _string,
    _Table,
)
from relayd.config.routing import parse_aliases_section, parse_rewrite, parse_routing
from relayd.config.types import (
    DEFAULT_HTTP_ENDPOINT,
    Config,
    DkimConfig,
    Endpoint,
    HTTPConfig,
    Limits,
    ListenerConfig,
    QueueConfig,
    ServerConfig,
    TLSConfig,
)
from relayd.config.units import parse_duration, parse_size, toml_string, type_name
from relayd.errors import ConfigError

DEFAULT_CONFIG_SOURCE = "<embedded default>"

DEFAULT_CONFIG_TEXT = """\
# relayd's embedded default: try-it-now, not production.
# One listener on 127.0.0.1:1025 relaying for this machine only; accepted mail
# lands in the maildir ./relayd-data/outbox (paths are relative to the working
# directory).  Write a config file for anything else (see
# etc/relayd/relayd.toml) and pass it with --config.

[server]
spool = "relayd-data/spool"

[http]
listen = "tcp:8025:interface=127.0.0.1"

[[listener]]
name = "default"
listen = "tcp:1025:interface=127.0.0.1"
mynetworks = ["127.0.0.0/8", "::1/128"]
route = "outbox"

[route.outbox]
maildir = "relayd-data/outbox"
"""

_TOP_KEYS = ("server", "tls", "http", "queue", "limits", "listener", "auth", "route", "dkim",
             "routing", "aliases", "rewrite")
_DKIM_KEYS = ("domain", "selector", "key_file")
_SERVER_KEYS = ("hostname", "spool", "log_format", "max_hops", "bounce_from", "stop_timeout")
_TLS_KEYS = ("cert", "key")
_HTTP_KEYS = ("listen",)
_QUEUE_KEYS = ("retry", "lifetime", "max_messages", "min_free_disk")
_LIMIT_KEYS = (
    "max_connections",
    "max_connections_per_ip",
    "max_messages_per_session",
    "max_errors_per_session",
    "auth_failures",
    "auth_block",
    "messages_per_user",
    "messages_per_ip",
)
_LISTENER_KEYS = (
    "name",
    "listen",
    "tls",
    "require_tls",
    "auth",
    "auth_backend",
    "mynetworks",
    "allowed_senders",
    "allowed_recipients",
    "max_message_size",
    "max_recipients",
    "timeout",
    "route",
    "bare_newline",
    "nul",
    "tls_cert",
    "tls_key",
    "tls_min_version",
    "plaintext_auth",
    "proxy_protocol",
    "proxy_trusted",
    "dkim",
    *_LIMIT_KEYS,
)


def parse(text: str, source: str = "<string>") -> Config:
    """Validate ``text`` completely, then refuse what this version cannot do.

    Refusing after validation means a user fixing a file sees real mistakes
    first and the "not yet" answers last.
    """
    config = _validate(text, source)
    return config


def load(path: str) -> Config:
    """Read and parse the file at ``path``.

    Problems with the file as a whole use the key ``-``: there is no key to
    blame when the file cannot be read or decoded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read the config file: {e.strerror or e}") from e
    try:
        # utf-8-sig: editors on some systems prepend a BOM, which TOML forbids
        # but which is no reason to refuse an otherwise good file.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, "-", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from e
    return parse(text, path)


def load_default() -> Config:
    """The embedded try-it-now config, used when no file is given."""
    return parse(DEFAULT_CONFIG_TEXT, DEFAULT_CONFIG_SOURCE)


def _server(source: str, data: object) -> ServerConfig:
    t = _Table(source, "server", data, _SERVER_KEYS)
    d = ServerConfig()
    return ServerConfig(
        hostname=t.optional("hostname", _hostname),
        spool=t.get("spool", _string, d.spool),
        log_format=t.get("log_format", _choice("text", "json"), d.log_format),
        max_hops=t.get("max_hops", _int_at_least(1), d.max_hops),
        bounce_from=t.optional("bounce_from", _address),
        stop_timeout=t.get("stop_timeout", _duration, d.stop_timeout),
    )


def _tls(source: str, data: object) -> TLSConfig:
    t = _Table(source, "tls", data, _TLS_KEYS)
    return TLSConfig(cert=t.required("cert", _string), key=t.required("key", _string))


def _http(source: str, data: object) -> HTTPConfig:
    t = _Table(source, "http", data, _HTTP_KEYS)
    listen: Endpoint | None = DEFAULT_HTTP_ENDPOINT
    if t.has("listen"):
        listen = _optional_endpoint(t.data["listen"], source, t.key("listen"))
    return HTTPConfig(listen=listen)


def _retry(value: object, source: str, key: str) -> tuple[float, ...]:
    items = _array(value, source, key)
    if not items:
        raise ConfigError(source, key, "must list at least one retry interval")
    return tuple(parse_duration(item, source, f"{key}[{i}]") for i, item in enumerate(items))


def _queue(source: str, data: object) -> QueueConfig:
    t = _Table(source, "queue", data, _QUEUE_KEYS)
    d = QueueConfig()
    return QueueConfig(
        retry=t.get("retry", _retry, d.retry),
        lifetime=t.get("lifetime", _duration, d.lifetime),
        max_messages=t.get("max_messages", _int_at_least(1), d.max_messages),
        min_free_disk=t.get("min_free_disk", parse_size, d.min_free_disk),
    )


_LIMIT_CONVERTERS: Mapping[str, _Converter[object]] = {
    "max_connections": _int_at_least(1),
    "max_connections_per_ip": _int_at_least(1),
    "max_messages_per_session": _int_at_least(1),
    "max_errors_per_session": _int_at_least(1),
    "auth_failures": _rate,
    "auth_block": _duration,
    "messages_per_user": _rate,
    "messages_per_ip": _rate,
}


def _limits(table: _Table, base: Limits) -> Limits:
    """``base`` with the limit keys ``table`` sets, which is both how
    ``[limits]`` overrides the defaults and how a listener overrides
    ``[limits]``."""
    changes: dict[str, Any] = {
        name: convert(table.data[name], table.source, table.key(name))
        for name, convert in _LIMIT_CONVERTERS.items()
        if table.has(name)
    }
    return attrs.evolve(base, **changes)


def _listener(
    source: str, index: int, data: object, server_tls: bool, limits: Limits
) -> ListenerConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, f"listener[{index}]", f"must be a table, not {type_name(data)}")
    if "name" not in data:
        raise ConfigError(
            source, f"listener[{index}].name", "required: every listener needs a name"
        )
    name = _string(data["name"], source, f"listener[{index}].name")
    if not _NAME_RE.match(name):
        raise ConfigError(
            source,
            f"listener[{index}].name",
            f"{toml_string(name)}: use letters, digits, '_', '.' and '-' only "
            "(the name labels logs and metrics)",
        )
    t = _Table(source, f"listener[{name}]", data, _LISTENER_KEYS)
    listen = t.required("listen", _endpoint)
    d = ListenerConfig(name=name, listen=listen)

    tls = t.get(
        "tls", _choice("none", "starttls", "implicit"), "starttls" if server_tls else "none"
    )
    require_tls = t.get("require_tls", _bool, d.require_tls)
    auth = t.get("auth", _choice("none", "optional", "required"), d.auth)
    tls_cert = t.optional("tls_cert", _string)
    tls_key = t.optional("tls_key", _string)
    plaintext_auth = t.get("plaintext_auth", _bool, d.plaintext_auth)
    proxy_protocol = t.get("proxy_protocol", _bool, d.proxy_protocol)
    proxy_trusted = t.get("proxy_trusted", _networks, d.proxy_trusted)

    if (tls_cert is None) != (tls_key is None):
        missing = "tls_key" if tls_key is None else "tls_cert"
        raise t.error(missing, "tls_cert and tls_key go together: give both or neither")
    if tls != "none" and tls_cert is None and not server_tls:
        raise t.error(
            "tls",
            f'tls = "{tls}" needs a certificate: configure [tls] or this listener\'s '
            "tls_cert and tls_key",
        )
    if require_tls and tls == "none":
        raise t.error("require_tls", 'require_tls needs tls = "starttls" or "implicit"')
    if auth != "none" and not t.has("auth_backend"):
        raise t.error("auth_backend", f'required when auth = "{auth}"')
    if auth != "none" and tls == "none" and not plaintext_auth:
        # Invariant: AUTH only over TLS.  Without TLS it would never be offered.
        raise t.error(
            "auth",
            "AUTH is only offered over TLS: set tls, or plaintext_auth = true "
            "to allow it from loopback clients",
        )
    if proxy_protocol and not proxy_trusted:
        # PROXY headers set the client address that mynetworks trusts; taking
        # them from anyone would make the relay open.
        raise t.error("proxy_trusted", "proxy_protocol = true needs the proxies' networks here")

    return ListenerConfig(
        name=name,
        listen=listen,
        tls=tls,
        require_tls=require_tls,
        auth=auth,
        auth_backend=t.optional("auth_backend", _string),
        mynetworks=t.get("mynetworks", _mynetworks, d.mynetworks),
        allowed_senders=t.get("allowed_senders", _patterns, d.allowed_senders),
        allowed_recipients=t.get("allowed_recipients", _patterns, d.allowed_recipients),
        max_message_size=t.get("max_message_size", _positive_size, d.max_message_size),
        max_recipients=t.get("max_recipients", _int_at_least(1), d.max_recipients),
        timeout=t.get("timeout", _duration, d.timeout),
        route=t.get("route", _string, d.route),
        bare_newline=t.get("bare_newline", _choice("normalize", "reject"), d.bare_newline),
        nul=t.get("nul", _choice("strip", "reject"), d.nul),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_min_version=t.get("tls_min_version", _choice("1.0", "1.1", "1.2", "1.3"), d.tls_min_version),
        plaintext_auth=plaintext_auth,
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
        limits=_limits(t, limits),
        dkim=t.get("dkim", _bool, d.dkim),
    )


_SELECTOR_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def _selector(value: object, source: str, key: str) -> str:
    """A DKIM selector: DNS labels (RFC 6376 §3.1), digits alone allowed."""
    text = _string(value, source, key)
    if not _SELECTOR_RE.match(text):
        raise ConfigError(source, key, f"{toml_string(text)} is not a selector (DNS labels: "
                                       'letters, digits and hyphens, like "s2026")')
    return text


def _dkim(source: str, data: object) -> tuple[DkimConfig, ...]:
    """``[[dkim]]``: domain, selector and key file of each signature."""
    if not isinstance(data, list):
        raise ConfigError(source, "dkim", "must be an array of tables: write [[dkim]], not [dkim]")
    entries: list[DkimConfig] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ConfigError(source, f"dkim[{i}]", f"must be a table, not {type_name(item)}")
        t = _Table(source, f"dkim[{i}]", item, _DKIM_KEYS)
        entry = DkimConfig(
            domain=t.required("domain", _hostname).rstrip(".").lower(),
            selector=t.required("selector", _selector).lower(),
            key_file=t.required("key_file", _string),
        )
        for j, other in enumerate(entries):
            if (other.domain, other.selector) == (entry.domain, entry.selector):
                raise t.error("selector", f"{toml_string(entry.selector)} is already used for "
                                          f"{toml_string(entry.domain)} by dkim[{j}]")
        entries.append(entry)
    return tuple(entries)


def _validate(text: str, source: str) -> Config:
    """Everything :func:`parse` checks except the "not built yet" refusals;
    separate so tests can see how future features are read."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "-", f"invalid TOML: {e}") from None
    top = _Table(source, "", data, _TOP_KEYS)

    server = _server(source, data.get("server", {}))
    tls = _tls(source, data["tls"]) if "tls" in data else None
    http = _http(source, data.get("http", {}))
    queue = _queue(source, data.get("queue", {}))
    limits = _limits(_Table(source, "limits", data.get("limits", {}), _LIMIT_KEYS), Limits())

    auth = {
        name: _auth_backend(source, name, value)
        for name, value in _named_tables(source, "auth", data.get("auth", {})).items()
    }
    routes = {
        name: _route(source, name, value)
        for name, value in _named_tables(source, "route", data.get("route", {})).items()
    }

    raw_listeners = top.data.get("listener", [])
    if not isinstance(raw_listeners, list):
        raise ConfigError(
            source, "listener", "must be an array of tables: write [[listener]], not [listener]"
        )
    if not raw_listeners:
        raise ConfigError(source, "listener", "at least one [[listener]] is required")
    listeners = tuple(
        _listener(source, i, item, tls is not None, limits) for i, item in enumerate(raw_listeners)
    )
    dkim = _dkim(source, data.get("dkim", []))

    seen: dict[str, int] = {}
    for i, listener in enumerate(listeners):
        if listener.name in seen:
            raise ConfigError(
                source,
                f"listener[{i}].name",
                f"duplicate listener name {toml_string(listener.name)} "
                f"(also listener[{seen[listener.name]}])",
            )
        seen[listener.name] = i

    bound: list[tuple[str, Endpoint]] = []
    for listener in listeners:
        label = f"listener[{listener.name}]"
        for other_label, other in bound:
            why = _clash(other, listener.listen)
            if why:
                raise ConfigError(source, f"{label}.listen", f"{why}: also used by {other_label}")
        bound.append((label, listener.listen))
    if http.listen is not None:
        for other_label, other in bound:
            why = _clash(other, http.listen)
            if why:
                raise ConfigError(source, "http.listen", f"{why}: also used by {other_label}")

    for listener in listeners:
        label = f"listener[{listener.name}]"
        if listener.route not in routes:
            raise ConfigError(
                source, f"{label}.route", f"unknown route {toml_string(listener.route)}"
            )
        if listener.auth_backend is not None and listener.auth_backend not in auth:
            raise ConfigError(
                source,
                f"{label}.auth_backend",
                f"unknown auth backend {toml_string(listener.auth_backend)}",
            )

    return Config(
        source=source,
        server=server,
        tls=tls,
        http=http,
        queue=queue,
        limits=limits,
        listeners=listeners,
        auth=auth,
        routes=routes,
        dkim=dkim,
        routing=parse_routing(source, data.get("routing"), frozenset(routes),
                              frozenset(seen)),
        aliases=parse_aliases_section(source, data.get("aliases")),
        rewrite=parse_rewrite(source, data["rewrite"]) if "rewrite" in data else None,
    )


