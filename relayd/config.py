"""TOML text -> validated, frozen configuration.

Everything that can be wrong with a config file is found here, before the
daemon binds a port or touches the spool, so ``relayd check-config`` can vouch
for a file and a SIGHUP can refuse a bad one while the old one keeps running.
Every error names the file, the key and the reason (:class:`ConfigError`).

The module is pure on purpose: no Twisted, no DNS, no sockets.  The only I/O
is reading the config file itself (:func:`load`) and the ``*_file`` secrets,
which are read at load time so that a missing secret stops start-up instead
of the first delivery.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias, TypeVar

import attrs
from attrs import field, frozen

from relayd.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_SOURCE",
    "DEFAULT_CONFIG_TEXT",
    "AuthBackendConfig",
    "Config",
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
    "load",
    "load_default",
    "parse",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "render",
    "restart_only_changes",
]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

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

SECRET_MASK = "********"

_KiB = 1024
_MiB = 1024 * 1024
_GiB = 1024 * 1024 * 1024

_MINUTE = 60.0
_HOUR = 3600.0
_DAY = 86400.0
_WEEK = 7 * _DAY


# ---------------------------------------------------------------------------
# The configuration values
# ---------------------------------------------------------------------------


@frozen
class Rate:
    """``count`` events per ``per`` seconds: one shape for every rate limit,
    so the limiter needs no knowledge of how the user spelled it."""

    count: int
    per: float


@frozen
class Endpoint:
    """A listening endpoint, checked here and bound later by Twisted.

    ``description`` is the string exactly as written, so the wiring code can
    hand it to ``serverFromString`` unchanged; the parsed fields exist so that
    clashes between listeners are found before anything binds.
    ``interface is None`` means every address of the family.
    """

    description: str
    kind: str
    port: int | None = None
    interface: str | None = None
    index: int | None = None


@frozen
class ServerConfig:
    """Process-wide settings.  ``hostname is None`` means "the FQDN", looked up
    at start-up by the caller because this module must not do DNS."""

    hostname: str | None = None
    spool: str = "/var/spool/relayd"
    log_format: str = "text"
    max_hops: int = 50
    bounce_from: str | None = None
    #: A stop (SIGTERM) lets SMTP transactions and deliveries in flight
    #: finish for this long before it cuts them off.
    stop_timeout: float = 30.0


@frozen
class TLSConfig:
    """The server certificate shared by listeners without their own; paths
    only, because the files are reread on SIGHUP by the TLS module."""

    cert: str
    key: str


_DEFAULT_HTTP_ENDPOINT = Endpoint(
    description="tcp:8025:interface=127.0.0.1", kind="tcp", port=8025, interface="127.0.0.1"
)


@frozen
class HTTPConfig:
    """Status and metrics endpoint; ``listen is None`` turns HTTP off."""

    listen: Endpoint | None = _DEFAULT_HTTP_ENDPOINT


@frozen
class QueueConfig:
    """Retry schedule and the limits that make the spool answer 452 rather
    than fill the disk."""

    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)
    lifetime: float = 5 * _DAY
    max_messages: int = 100000
    min_free_disk: int = 500 * _MiB


@frozen
class Limits:
    """Abuse limits.  ``None`` means unlimited; the server-wide values are the
    defaults of every listener, which may override each key."""

    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    max_messages_per_session: int | None = None
    max_errors_per_session: int = 20
    auth_failures: Rate = Rate(10, 300.0)
    auth_block: float = 600.0
    messages_per_user: Rate | None = None
    messages_per_ip: Rate | None = None


_DEFAULT_MYNETWORKS: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


@frozen
class ListenerConfig:
    """One SMTP port and its policy.  The name labels logs and metrics, so it
    is the tenant; ``limits`` is already merged with the server-wide
    ``[limits]``, so consumers never look in two places."""

    name: str
    listen: Endpoint
    tls: str = "none"
    require_tls: bool = False
    auth: str = "none"
    auth_backend: str | None = None
    mynetworks: tuple[Network, ...] = _DEFAULT_MYNETWORKS
    allowed_senders: tuple[str, ...] = ()
    allowed_recipients: tuple[str, ...] = ()
    max_message_size: int = 25 * _MiB
    max_recipients: int = 100
    timeout: float = 300.0
    route: str = "default"
    bare_newline: str = "normalize"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_min_version: str = "1.2"
    plaintext_auth: bool = False
    proxy_protocol: bool = False
    proxy_trusted: tuple[Network, ...] = ()
    limits: Limits = field(factory=Limits)


@frozen
class AuthBackendConfig:
    """A named credential store.  One class for both types keeps the mapping
    ``Config.auth`` homogeneous; the fields of the other type stay ``None``."""

    name: str
    type: str
    file: str | None = None
    senders_file: str | None = None
    url: str | None = None
    user_dn: str | None = None
    search_base: str | None = None
    search_filter: str | None = None
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    start_tls: bool = False
    ca_file: str | None = None
    sender_attribute: str | None = None
    timeout: float = 10.0


@frozen
class Smarthost:
    """A next hop taken literally: no MX lookup, tried in the listed order."""

    host: str
    port: int


@frozen
class RouteConfig:
    """Where accepted mail goes: a smarthost list (failover) or a maildir."""

    name: str
    smarthost: tuple[Smarthost, ...] = ()
    maildir: str | None = None
    tls: str = "starttls"
    tls_verify: bool = True
    ca_file: str | None = None
    tls_server_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    concurrency: int = 10
    max_rate: Rate | None = None
    max_recipients_per_transaction: int | None = None
    client_cert: str | None = None
    client_key: str | None = None
    soft_bounce: bool = False


@frozen
class Config:
    """The whole validated configuration; ``source`` is where it came from so
    later messages (reload, check-config) can name the file."""

    source: str
    server: ServerConfig = field(factory=ServerConfig)
    tls: TLSConfig | None = None
    http: HTTPConfig = field(factory=HTTPConfig)
    queue: QueueConfig = field(factory=QueueConfig)
    limits: Limits = field(factory=Limits)
    listeners: tuple[ListenerConfig, ...] = ()
    auth: dict[str, AuthBackendConfig] = field(factory=dict)
    routes: dict[str, RouteConfig] = field(factory=dict)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


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


#: What a reload (SIGHUP) cannot change in a running relay: the spool is
#: locked and recovered at start, the HTTP endpoint and the hostname are
#: bound into running parts, and the queue settings shape messages already
#: scheduled.  Everything else (listeners, their policy and limits, [tls],
#: [auth.*], routes) applies live.
RESTART_ONLY = ("server", "queue", "http")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys that differ between ``old`` and ``new`` but need a restart,
    as ``section.key`` (empty: the reload may go ahead)."""
    changed = []
    for section in RESTART_ONLY:
        before, after = getattr(old, section), getattr(new, section)
        for name in attrs.fields_dict(type(before)):
            if getattr(before, name) != getattr(after, name):
                changed.append(f"{section}.{name}")
    return changed


# ---------------------------------------------------------------------------
# Scalar parsers (public: other modules parse the same spellings)
# ---------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": _KiB, "m": _MiB, "g": _GiB}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE | re.ASCII)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": _MINUTE, "h": _HOUR, "d": _DAY, "w": _WEEK}


def parse_size(value: object, source: str, key: str) -> int:
    """Bytes from an integer or ``"25MB"`` (powers of 1024, as Postfix users
    expect from ``message_size_limit`` arithmetic).

    Zero is allowed here because some sizes use it for "no check"; callers
    that need a positive size say so.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            source, key, f'must be a size (bytes, or a string like "25MB"), not {_type_name(value)}'
        )
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(source, key, f"must not be negative, got {value}")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ConfigError(
            source,
            key,
            f'{value!r} is not a size: use bytes or a number with KB, MB or GB ("25MB")',
        )
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]


def parse_duration(value: object, source: str, key: str) -> float:
    """Seconds from a number or ``"30s"``/``"5m"``/``"1h"``/``"5d"``/``"1w"``.

    Every duration in the config is a timeout, an interval or a lifetime, for
    which zero or less means a busy loop or an instant expiry, so those are
    refused here rather than at each caller.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(
            source,
            key,
            f'must be a duration (seconds, or a string like "5m"), not {_type_name(value)}',
        )
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ConfigError(
                source,
                key,
                f'{value!r} is not a duration: use seconds or a number with s, m, h, d or w ("5m")',
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ConfigError(source, key, f"must be a finite duration, got {value!r}")
    if seconds <= 0:
        raise ConfigError(source, key, f"must be a positive duration, got {value!r}")
    return seconds


def parse_rate(value: object, source: str, key: str) -> Rate:
    """``"N/s"``, ``"N/m"``, ``"N/h"``, ``"N/d"`` or ``"N/<duration>"``
    (``"10/5m"``): the window is part of the limit, so it is written with it."""
    if not isinstance(value, str):
        raise ConfigError(
            source, key, f'must be a rate string like "100/h" or "10/5m", not {_type_name(value)}'
        )
    count_text, slash, per_text = value.partition("/")
    count_text = count_text.strip()
    per_text = per_text.strip()
    if not slash or not _is_decimal(count_text) or not per_text:
        raise ConfigError(
            source, key, f'{value!r} is not a rate: use "N/s", "N/m", "N/h" or "N/<duration>"'
        )
    count = int(count_text)
    if count < 1:
        raise ConfigError(source, key, f"{value!r}: the count must be at least 1")
    if per_text.lower() in _DURATION_UNITS:
        # A bare unit ("h") means one of it.
        per = _DURATION_UNITS[per_text.lower()]
    else:
        per = parse_duration(per_text, source, key)
    return Rate(count, per)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

_T = TypeVar("_T")
_Converter: TypeAlias = Callable[[object, str, str], _T]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

_TOP_KEYS = ("server", "tls", "http", "queue", "limits", "listener", "auth", "route")
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
    "tls_cert",
    "tls_key",
    "tls_min_version",
    "plaintext_auth",
    "proxy_protocol",
    "proxy_trusted",
    *_LIMIT_KEYS,
)
_HTPASSWD_KEYS = ("type", "file", "senders_file")
_LDAP_KEYS = (
    "type",
    "url",
    "user_dn",
    "search_base",
    "search_filter",
    "bind_dn",
    "bind_password",
    "bind_password_file",
    "start_tls",
    "ca_file",
    "sender_attribute",
    "timeout",
)
_ROUTE_SMARTHOST_ONLY_KEYS = (
    "tls",
    "tls_verify",
    "ca_file",
    "tls_server_name",
    "username",
    "password",
    "password_file",
    "client_cert",
    "client_key",
    "max_recipients_per_transaction",
)
_ROUTE_KEYS = (
    "smarthost",
    "maildir",
    *_ROUTE_SMARTHOST_ONLY_KEYS,
    "concurrency",
    "max_rate",
    "soft_bounce",
)


def _is_decimal(text: str) -> bool:
    # str.isdigit() accepts "²", which int() then rejects: ASCII digits only.
    return text.isascii() and text.isdigit()


def _type_name(value: object) -> str:
    """TOML's names for types: the user wrote TOML, not Python."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _key_label(name: str) -> str:
    """A table name as it would be written in TOML, so error keys can be
    pasted back into the file's section headers."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return _toml_string(name)


class _Table:
    """One TOML table being read.

    It refuses unknown keys before anything else, because a misspelt key
    otherwise surfaces as a confusing "missing key" error or, worse, as a
    default silently used.  It also knows its dotted path, so every error
    names the key the way the user would look for it.
    """

    def __init__(
        self, source: str, path: str, data: object, allowed: Iterable[str], what: str = "a table"
    ) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, path or "-", f"must be {what}, not {_type_name(data)}")
        self.source = source
        self.path = path
        self.data: dict[str, object] = data
        self.allowed = tuple(allowed)
        for name, value in data.items():
            if name not in self.allowed:
                raise self.error(name, self.unknown_reason(name, value))

    def unknown_reason(self, name: str, value: object) -> str:
        what = "section" if isinstance(value, dict) else "key"
        close = difflib.get_close_matches(name, self.allowed, n=1)
        return f"unknown {what}" + (f" (did you mean {close[0]!r}?)" if close else "")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, convert: _Converter[_T], default: _T) -> _T:
        if name not in self.data:
            return default
        return convert(self.data[name], self.source, self.key(name))

    def optional(self, name: str, convert: _Converter[_T]) -> _T | None:
        if name not in self.data:
            return None
        return convert(self.data[name], self.source, self.key(name))

    def required(self, name: str, convert: _Converter[_T]) -> _T:
        if name not in self.data:
            raise self.error(name, "required")
        return convert(self.data[name], self.source, self.key(name))


def _string(value: object, source: str, key: str) -> str:
    """A non-empty string: every string key names something (a path, a
    host, a choice), and an empty one is always a mistake."""
    if not isinstance(value, str):
        raise ConfigError(source, key, f"must be a string, not {_type_name(value)}")
    if not value.strip():
        raise ConfigError(source, key, "must not be empty")
    return value


def _bool(value: object, source: str, key: str) -> bool:
    # "yes", 1 and "true" are refused: TOML has booleans, and guessing at
    # near-booleans is how security switches end up in the wrong position.
    if not isinstance(value, bool):
        raise ConfigError(source, key, f"must be true or false, not {_type_name(value)}")
    return value


def _int_at_least(minimum: int) -> _Converter[int]:
    def convert(value: object, source: str, key: str) -> int:
        # bool is an int subclass in Python; TOML's true is not a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {_type_name(value)}")
        if value < minimum:
            raise ConfigError(source, key, f"must be at least {minimum}, got {value}")
        return value

    return convert


def _positive_size(value: object, source: str, key: str) -> int:
    size = parse_size(value, source, key)
    if size <= 0:
        raise ConfigError(source, key, "must be a positive size")
    return size


def _choice(*choices: str) -> _Converter[str]:
    def convert(value: object, source: str, key: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"must be a string, not {_type_name(value)}")
        if value not in choices:
            expected = " or ".join(f'"{c}"' for c in choices)
            raise ConfigError(source, key, f"must be {expected}, not {_toml_string(value)}")
        return value

    return convert


def _array(value: object, source: str, key: str) -> list[object]:
    if not isinstance(value, list):
        raise ConfigError(source, key, f"must be an array, not {_type_name(value)}")
    return value


def _network(value: object, source: str, key: str) -> Network:
    """A CIDR or a single address.  Host bits are an error, not silently
    cleared: "10.0.0.1/8" usually means a typo, and guessing wrong here
    widens who may relay."""
    text = _string(value, source, key).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(
            source, key, f"{_toml_string(text)} is not an IP address or network (CIDR)"
        ) from None
    raise ConfigError(
        source, key, f"{_toml_string(text)} has host bits set (did you mean {loose}?)"
    )


def _networks(value: object, source: str, key: str) -> tuple[Network, ...]:
    return tuple(
        _network(item, source, f"{key}[{i}]") for i, item in enumerate(_array(value, source, key))
    )


def _mynetworks(value: object, source: str, key: str) -> tuple[Network, ...]:
    """Networks allowed to relay.  A /0 is refused: it lets every client on
    the internet relay, which is the one mistake a relay must not make."""
    networks = _networks(value, source, key)
    for i, network in enumerate(networks):
        if network.prefixlen == 0:
            raise ConfigError(
                source,
                f"{key}[{i}]",
                f'"{network}" would let every client relay (an open relay); list your networks',
            )
    return networks


def _pattern(value: object, source: str, key: str) -> str:
    text = _string(value, source, key)
    if any(c.isspace() or c in "<>," for c in text):
        raise ConfigError(
            source, key, f'{_toml_string(text)} is not an address pattern (like "*@example.org")'
        )
    return text


def _patterns(value: object, source: str, key: str) -> tuple[str, ...]:
    return tuple(
        _pattern(item, source, f"{key}[{i}]") for i, item in enumerate(_array(value, source, key))
    )


def _is_hostname(text: str) -> bool:
    if len(text) > 253:
        return False
    labels = text.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return False
    # An all-numeric last label is an IP address written where a name belongs.
    return not labels[-1].isdigit()


def _hostname(value: object, source: str, key: str) -> str:
    text = _string(value, source, key)
    if not _is_hostname(text):
        raise ConfigError(
            source,
            key,
            f"{_toml_string(text)} is not a host name (letters, digits, hyphens and dots, "
            'like "relay.example.org")',
        )
    return text


def _address(value: object, source: str, key: str) -> str:
    text = _string(value, source, key)
    local, at, domain = text.rpartition("@")
    if (
        not at
        or not local
        or any(c.isspace() or c in "<>," for c in local)
        or not _is_hostname(domain)
    ):
        raise ConfigError(
            source,
            key,
            f'{_toml_string(text)} is not a mail address (like "MAILER-DAEMON@example.org")',
        )
    return text


def _rate(value: object, source: str, key: str) -> Rate:
    return parse_rate(value, source, key)


def _duration(value: object, source: str, key: str) -> float:
    return parse_duration(value, source, key)


def _read_secret(path: str, source: str, key: str) -> str:
    """The secret held in ``path``: one line, surrounding whitespace stripped
    (editors add a final newline that is never part of a password)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(source, key, f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(source, key, f"{path} is not valid UTF-8") from e
    secret = text.strip()
    if not secret:
        raise ConfigError(source, key, f"{path} is empty")
    if "\n" in secret or "\r" in secret:
        raise ConfigError(source, key, f"{path} must hold a single line")
    return secret


def _secret(table: _Table, name: str) -> str | None:
    """A secret given inline as ``name`` or in a file as ``name_file``."""
    file_key = f"{name}_file"
    if table.has(name) and table.has(file_key):
        raise table.error(file_key, f"give either {name} or {file_key}, not both")
    if table.has(file_key):
        path = table.required(file_key, _string)
        return _read_secret(path, table.source, table.key(file_key))
    return table.optional(name, _string)


# --- endpoints --------------------------------------------------------------

_REFUSED_ENDPOINTS = {
    "ssl": "TLS endpoints are refused: TLS comes from the listener's tls key, "
    "so certificates can be reloaded",
    "tls": "TLS endpoints are refused: TLS comes from the listener's tls key, "
    "so certificates can be reloaded",
    "haproxy": "haproxy: endpoints are refused: PROXY protocol is the listener's "
    "proxy_protocol key",
    "unix": "Unix socket endpoints are not supported: use tcp:, tcp6: or systemd:",
}


def _split_endpoint(description: str, source: str, key: str) -> tuple[list[str], dict[str, str]]:
    """Positional and keyword arguments, tokenised exactly as Twisted's
    ``serverFromString`` does (``:`` separates, ``\\`` escapes, the first
    ``=`` in a field makes it a keyword), so we check what Twisted will bind."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    fields: list[tuple[str | None, str]] = []
    name: str | None = None
    current = ""
    chars = iter(description)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise ConfigError(source, key, "the endpoint ends with a lone backslash")
            current += nxt
        elif c == ":":
            fields.append((name, current))
            name, current = None, ""
        elif c == "=" and name is None:
            name, current = current, ""
        else:
            current += c
    fields.append((name, current))
    for field_name, field_value in fields:
        if field_name is None:
            args.append(field_value)
        elif field_name in kwargs:
            raise ConfigError(source, key, f"option {field_name!r} given twice")
        else:
            kwargs[field_name] = field_value
    return args, kwargs


def _port(text: str, source: str, key: str) -> int:
    if not _is_decimal(text) or int(text) > 65535:
        raise ConfigError(source, key, f"{text!r} is not a port number (0-65535)")
    return int(text)


def _endpoint(value: object, source: str, key: str) -> Endpoint:
    """Accept the endpoint kinds relayd can manage itself: ``tcp:``, ``tcp6:``
    and ``systemd:``.  TLS and PROXY protocol are listener keys instead, so
    they can be reloaded and combined with the SMTP state machine."""
    description = _string(value, source, key)
    args, kwargs = _split_endpoint(description, source, key)
    kind = args[0] if args else ""
    if len(args) + len(kwargs) < 2 and kind not in _REFUSED_ENDPOINTS:
        raise ConfigError(
            source,
            key,
            f'{_toml_string(description)} is not an endpoint: use "tcp:PORT", '
            '"tcp6:PORT" or "systemd:domain=INET:index=N"',
        )
    if kind in _REFUSED_ENDPOINTS:
        raise ConfigError(source, key, _REFUSED_ENDPOINTS[kind])
    if kind not in ("tcp", "tcp6", "systemd"):
        raise ConfigError(
            source,
            key,
            f"unsupported endpoint type {kind!r}: use tcp:, tcp6: or systemd:",
        )
    rest = args[1:]
    if kind == "systemd":
        return _systemd_endpoint(description, rest, kwargs, source, key)
    return _tcp_endpoint(description, kind, rest, kwargs, source, key)


def _tcp_endpoint(
    description: str, kind: str, args: list[str], kwargs: dict[str, str], source: str, key: str
) -> Endpoint:
    for option in kwargs:
        if option not in ("port", "interface", "backlog"):
            raise ConfigError(
                source, key, f"unknown {kind}: option {option!r} (use port, interface, backlog)"
            )
    if len(args) > 1 or (args and "port" in kwargs):
        hint = ""
        if kind == "tcp6":
            hint = r"; escape the colons of IPv6 addresses: interface=\:\:1 (in TOML: 'tcp6:25:interface=\:\:1')"
        raise ConfigError(source, key, f"unexpected arguments in {description!r}{hint}")
    if args:
        port_text = args[0]
    elif "port" in kwargs:
        port_text = kwargs["port"]
    else:
        raise ConfigError(source, key, f"{description!r} has no port")
    port = _port(port_text, source, key)
    interface: str | None = None
    if kwargs.get("interface"):
        family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address] = (
            ipaddress.IPv4Address if kind == "tcp" else ipaddress.IPv6Address
        )
        try:
            interface = str(family(kwargs["interface"]))
        except ValueError:
            version = "IPv4" if kind == "tcp" else "IPv6"
            raise ConfigError(
                source,
                key,
                f"interface {kwargs['interface']!r} is not an {version} address "
                f"({kind}: binds addresses, not names)",
            ) from None
    if "backlog" in kwargs:
        backlog = kwargs["backlog"]
        if not _is_decimal(backlog) or int(backlog) < 1:
            raise ConfigError(source, key, f"backlog {backlog!r} is not a positive integer")
    return Endpoint(description=description, kind=kind, port=port, interface=interface)


def _systemd_endpoint(
    description: str, args: list[str], kwargs: dict[str, str], source: str, key: str
) -> Endpoint:
    if args:
        raise ConfigError(source, key, f"unexpected arguments in {description!r}")
    for option in kwargs:
        if option not in ("domain", "index"):
            raise ConfigError(
                source, key, f"unknown systemd: option {option!r} (use domain and index)"
            )
    if kwargs.get("domain") not in ("INET", "INET6"):
        raise ConfigError(source, key, "systemd: endpoints need domain=INET or domain=INET6")
    index = kwargs.get("index")
    if index is None or not _is_decimal(index):
        raise ConfigError(source, key, "systemd: endpoints need index=N (N = 0, 1, ...)")
    return Endpoint(description=description, kind="systemd", index=int(index))


def _optional_endpoint(value: object, source: str, key: str) -> Endpoint | None:
    """HTTP may be switched off with ``""`` or ``"none"``."""
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    return _endpoint(value, source, key)


def _clash(a: Endpoint, b: Endpoint) -> str | None:
    """Why ``a`` and ``b`` cannot both be bound, or ``None``.

    A missing or unspecified interface means every address of the family, so
    it clashes with any specific address on the same port.
    """
    if a.kind == "systemd" or b.kind == "systemd":
        if a.kind == b.kind and a.index == b.index:
            return f"duplicate systemd index {a.index}"
        return None
    if a.kind != b.kind or a.port != b.port or a.port == 0:
        return None
    wild = ("0.0.0.0", "::")
    if a.interface in (None, *wild) or b.interface in (None, *wild) or a.interface == b.interface:
        return f"duplicate port {a.port}"
    return None


# --- sections ---------------------------------------------------------------


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
    listen: Endpoint | None = _DEFAULT_HTTP_ENDPOINT
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
        raise ConfigError(source, f"listener[{index}]", f"must be a table, not {_type_name(data)}")
    if "name" not in data:
        raise ConfigError(
            source, f"listener[{index}].name", "required: every listener needs a name"
        )
    name = _string(data["name"], source, f"listener[{index}].name")
    if not _NAME_RE.match(name):
        raise ConfigError(
            source,
            f"listener[{index}].name",
            f"{_toml_string(name)}: use letters, digits, '_', '.' and '-' only "
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
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_min_version=t.get("tls_min_version", _choice("1.0", "1.1", "1.2", "1.3"), d.tls_min_version),
        plaintext_auth=plaintext_auth,
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
        limits=_limits(t, limits),
    )


def _check_name(source: str, section: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            source,
            f"{section}.{_key_label(name)}",
            "use letters, digits, '_', '.' and '-' only in names",
        )


def _auth_backend(source: str, name: str, data: object) -> AuthBackendConfig:
    _check_name(source, "auth", name)
    path = f"auth.{_key_label(name)}"
    t = _Table(source, path, data, dict.fromkeys((*_HTPASSWD_KEYS, *_LDAP_KEYS)))  # ordered, unique
    kind = t.required("type", _choice("htpasswd", "ldap"))
    own, other = (_HTPASSWD_KEYS, "ldap") if kind == "htpasswd" else (_LDAP_KEYS, "htpasswd")
    for key in t.data:
        if key not in own:
            raise t.error(key, f"only for {other} backends, not {kind}")

    if kind == "htpasswd":
        return AuthBackendConfig(
            name=name,
            type=kind,
            file=t.required("file", _string),
            senders_file=t.optional("senders_file", _string),
        )

    url = t.required("url", _string)
    if not re.match(r"^ldaps?://[^/?#]+", url, re.IGNORECASE):
        raise t.error(
            "url", f"{_toml_string(url)} must be ldap://HOST[:PORT] or ldaps://HOST[:PORT]"
        )
    start_tls = t.get("start_tls", _bool, False)
    if start_tls and url.lower().startswith("ldaps://"):
        raise t.error("start_tls", "ldaps:// is TLS already; start_tls is for ldap:// URLs")
    user_dn = t.optional("user_dn", _string)
    search_base = t.optional("search_base", _string)
    search_filter = t.optional("search_filter", _string)
    if user_dn is not None:
        if search_base is not None or search_filter is not None:
            key = "search_base" if search_base is not None else "search_filter"
            raise t.error(key, "give either user_dn (direct bind) or search_base/search_filter")
        if "{user}" not in user_dn:
            raise t.error(
                "user_dn", 'must contain {user}, e.g. "uid={user},ou=people,dc=example,dc=org"'
            )
    else:
        if search_base is None:
            raise t.error(
                "search_base", "required without user_dn: give user_dn or search_base/search_filter"
            )
        if search_filter is None:
            raise t.error("search_filter", "required with search_base")
        if "{user}" not in search_filter:
            raise t.error("search_filter", 'must contain {user}, e.g. "(uid={user})"')
    bind_dn = t.optional("bind_dn", _string)
    bind_password = _secret(t, "bind_password")
    if bind_dn is not None and bind_password is None:
        # A simple bind with a DN and no password is an unauthenticated bind
        # that "succeeds": never what was meant.
        raise t.error("bind_password", "required with bind_dn (or bind_password_file)")
    if bind_dn is None and bind_password is not None:
        key = "bind_password_file" if t.has("bind_password_file") else "bind_password"
        raise t.error(key, "needs bind_dn")
    return AuthBackendConfig(
        name=name,
        type=kind,
        url=url,
        user_dn=user_dn,
        search_base=search_base,
        search_filter=search_filter,
        bind_dn=bind_dn,
        bind_password=bind_password,
        start_tls=start_tls,
        ca_file=t.optional("ca_file", _string),
        sender_attribute=t.optional("sender_attribute", _string),
        timeout=t.get("timeout", _duration, 10.0),
    )


def _smarthost(value: object, source: str, key: str, default_port: int) -> Smarthost:
    """``host``, ``host:port``, ``[v6addr]`` or ``[v6addr]:port``; brackets make
    an IPv6 address's colons unambiguous, as in Postfix's relayhost."""
    text = _string(value, source, key).strip()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(source, key, f"{_toml_string(text)}: missing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                source, key, f"{_toml_string(text)}: brackets hold an IPv6 address"
            ) from None
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(source, key, f"{_toml_string(text)}: expected ':PORT' after ']'")
            port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ConfigError(
                source,
                key,
                f"{_toml_string(text)}: write IPv6 addresses in brackets, like [2001:db8::1]:25",
            )
        host, colon, port_part = text.partition(":")
        if colon:
            port_text = port_part
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _is_hostname(host):
                raise ConfigError(
                    source, key, f"{_toml_string(host)} is not a host name or address"
                ) from None
    if port_text is None:
        return Smarthost(host=host, port=default_port)
    if not _is_decimal(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(source, key, f"{_toml_string(text)}: port must be 1-65535")
    return Smarthost(host=host, port=int(port_text))


def _route(source: str, name: str, data: object) -> RouteConfig:
    _check_name(source, "route", name)
    t = _Table(source, f"route.{_key_label(name)}", data, _ROUTE_KEYS)
    d = RouteConfig(name=name)
    if t.has("smarthost") and t.has("maildir"):
        raise t.error("maildir", "give either smarthost or maildir, not both")
    if not t.has("smarthost") and not t.has("maildir"):
        raise ConfigError(source, t.path, "needs smarthost (a list of hosts) or maildir (a path)")
    concurrency = t.get("concurrency", _int_at_least(1), d.concurrency)
    max_rate = t.optional("max_rate", _rate)
    soft_bounce = t.get("soft_bounce", _bool, d.soft_bounce)

    if t.has("maildir"):
        for key in _ROUTE_SMARTHOST_ONLY_KEYS:
            if t.has(key):
                raise t.error(key, "only for smarthost routes; this route delivers to a maildir")
        return RouteConfig(
            name=name,
            maildir=t.required("maildir", _string),
            concurrency=concurrency,
            max_rate=max_rate,
            soft_bounce=soft_bounce,
        )

    tls = t.get("tls", _choice("starttls", "implicit", "opportunistic", "none"), d.tls)
    default_port = 465 if tls == "implicit" else 25
    hosts = _array(t.data["smarthost"], source, t.key("smarthost"))
    if not hosts:
        raise t.error("smarthost", "must list at least one host")
    smarthosts = tuple(
        _smarthost(item, source, f"{t.key('smarthost')}[{i}]", default_port)
        for i, item in enumerate(hosts)
    )
    username = t.optional("username", _string)
    password = _secret(t, "password")
    if username is not None and password is None:
        raise t.error("password", "username needs password or password_file")
    if username is None and password is not None:
        raise t.error("username", "required with a password")
    if username is not None and tls in ("none", "opportunistic"):
        raise t.error(
            "tls",
            f'tls = "{tls}" would let the password go out in the clear; '
            'use "starttls" or "implicit" with username/password',
        )
    client_cert = t.optional("client_cert", _string)
    client_key = t.optional("client_key", _string)
    if (client_cert is None) != (client_key is None):
        missing = "client_key" if client_key is None else "client_cert"
        raise t.error(missing, "client_cert and client_key go together: give both or neither")
    return RouteConfig(
        name=name,
        smarthost=smarthosts,
        tls=tls,
        tls_verify=t.get("tls_verify", _bool, d.tls_verify),
        ca_file=t.optional("ca_file", _string),
        tls_server_name=t.optional("tls_server_name", _hostname),
        username=username,
        password=password,
        concurrency=concurrency,
        max_rate=max_rate,
        max_recipients_per_transaction=t.optional(
            "max_recipients_per_transaction", _int_at_least(1)
        ),
        client_cert=client_cert,
        client_key=client_key,
        soft_bounce=soft_bounce,
    )


def _named_tables(source: str, section: str, data: object) -> dict[str, object]:
    """``[auth.NAME]`` / ``[route.NAME]``: a table of tables."""
    if not isinstance(data, dict):
        raise ConfigError(
            source, section, f"must be tables [{section}.NAME], not {_type_name(data)}"
        )
    for name, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(
                source,
                f"{section}.{_key_label(name)}",
                f"must be a table [{section}.NAME], not {_type_name(value)}",
            )
    return data


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

    seen: dict[str, int] = {}
    for i, listener in enumerate(listeners):
        if listener.name in seen:
            raise ConfigError(
                source,
                f"listener[{i}].name",
                f"duplicate listener name {_toml_string(listener.name)} "
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
                source, f"{label}.route", f"unknown route {_toml_string(listener.route)}"
            )
        if listener.auth_backend is not None and listener.auth_backend not in auth:
            raise ConfigError(
                source,
                f"{label}.auth_backend",
                f"unknown auth backend {_toml_string(listener.auth_backend)}",
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
    )


# ---------------------------------------------------------------------------
# Rendering (relayd check-config)
# ---------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    """A TOML basic string.  Not json.dumps: TOML forbids a raw DEL, which
    JSON allows."""
    out = []
    for c in value:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _fmt_duration(seconds: float) -> str:
    for unit, size in (("w", _WEEK), ("d", _DAY), ("h", _HOUR), ("m", _MINUTE)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{_fmt_number(seconds)}s"


def _fmt_size(size: int) -> str:
    for unit, factor in (("GB", _GiB), ("MB", _MiB), ("KB", _KiB)):
        if size >= factor and size % factor == 0:
            return _toml_string(f"{size // factor}{unit}")
    return str(size)


def _fmt_rate(rate: Rate) -> str:
    units = {1.0: "s", _MINUTE: "m", _HOUR: "h", _DAY: "d"}
    per = units.get(rate.per) or _fmt_duration(rate.per)
    return _toml_string(f"{rate.count}/{per}")


def _fmt_bool(value: bool) -> str:
    return "true" if value else "false"


def _fmt_strings(values: Iterable[object]) -> str:
    return "[" + ", ".join(_toml_string(str(v)) for v in values) + "]"


class _Writer:
    """Collects ``key = value`` lines; unset optional keys become comments so
    the output still lists every setting and still parses as TOML."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, header: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(header)

    def set(self, key: str, value: str) -> None:
        self.lines.append(f"{key} = {value}")

    def unset(self, key: str, meaning: str) -> None:
        self.lines.append(f"# {key} = ({meaning})")

    def maybe(self, key: str, value: str | None, meaning: str, *, secret: bool = False) -> None:
        if value is None:
            self.unset(key, meaning)
        else:
            self.set(key, _toml_string(SECRET_MASK) if secret else _toml_string(value))


def _write_limits(w: _Writer, limits: Limits) -> None:
    for name in ("max_connections", "max_connections_per_ip", "max_messages_per_session"):
        value = getattr(limits, name)
        if value is None:
            w.unset(name, "unlimited")
        else:
            w.set(name, str(value))
    w.set("max_errors_per_session", str(limits.max_errors_per_session))
    w.set("auth_failures", _fmt_rate(limits.auth_failures))
    w.set("auth_block", _toml_string(_fmt_duration(limits.auth_block)))
    for name in ("messages_per_user", "messages_per_ip"):
        rate = getattr(limits, name)
        if rate is None:
            w.unset(name, "unlimited")
        else:
            w.set(name, _fmt_rate(rate))


def render(config: Config) -> str:
    """The effective configuration, every default spelled out, secrets masked.

    The output is valid TOML that parses back to the same settings (apart from
    the masked secrets), so an operator can start a config file from it.
    """
    w = _Writer()
    w.lines.append(f"# relayd effective configuration, from {config.source}")

    s = config.server
    w.section("[server]")
    w.maybe("hostname", s.hostname, "unset: the FQDN of this machine")
    w.set("spool", _toml_string(s.spool))
    w.set("log_format", _toml_string(s.log_format))
    w.set("max_hops", str(s.max_hops))
    w.maybe("bounce_from", s.bounce_from, "unset: MAILER-DAEMON@<hostname>")
    w.set("stop_timeout", _toml_string(_fmt_duration(s.stop_timeout)))

    if config.tls is not None:
        w.section("[tls]")
        w.set("cert", _toml_string(config.tls.cert))
        w.set("key", _toml_string(config.tls.key))

    w.section("[http]")
    listen = config.http.listen
    w.set("listen", _toml_string("none" if listen is None else listen.description))

    q = config.queue
    w.section("[queue]")
    w.set("retry", _fmt_strings(_fmt_duration(r) for r in q.retry))
    w.set("lifetime", _toml_string(_fmt_duration(q.lifetime)))
    w.set("max_messages", str(q.max_messages))
    w.set("min_free_disk", _fmt_size(q.min_free_disk))

    w.section("[limits]")
    _write_limits(w, config.limits)

    for lc in config.listeners:
        w.section("[[listener]]")
        w.set("name", _toml_string(lc.name))
        w.set("listen", _toml_string(lc.listen.description))
        w.set("tls", _toml_string(lc.tls))
        w.set("require_tls", _fmt_bool(lc.require_tls))
        w.set("auth", _toml_string(lc.auth))
        w.maybe("auth_backend", lc.auth_backend, "unset")
        w.set("mynetworks", _fmt_strings(lc.mynetworks))
        w.set("allowed_senders", _fmt_strings(lc.allowed_senders))
        w.set("allowed_recipients", _fmt_strings(lc.allowed_recipients))
        w.set("max_message_size", _fmt_size(lc.max_message_size))
        w.set("max_recipients", str(lc.max_recipients))
        w.set("timeout", _toml_string(_fmt_duration(lc.timeout)))
        w.set("route", _toml_string(lc.route))
        w.set("bare_newline", _toml_string(lc.bare_newline))
        w.maybe("tls_cert", lc.tls_cert, "unset: the [tls] certificate")
        w.maybe("tls_key", lc.tls_key, "unset: the [tls] key")
        w.set("tls_min_version", _toml_string(lc.tls_min_version))
        w.set("plaintext_auth", _fmt_bool(lc.plaintext_auth))
        w.set("proxy_protocol", _fmt_bool(lc.proxy_protocol))
        w.set("proxy_trusted", _fmt_strings(lc.proxy_trusted))
        _write_limits(w, lc.limits)

    for name, ab in config.auth.items():
        w.section(f"[auth.{_key_label(name)}]")
        w.set("type", _toml_string(ab.type))
        if ab.type == "htpasswd":
            w.maybe("file", ab.file, "unset")
            w.maybe("senders_file", ab.senders_file, "unset: no sender restrictions")
            continue
        w.maybe("url", ab.url, "unset")
        w.maybe("user_dn", ab.user_dn, "unset: search instead")
        w.maybe("search_base", ab.search_base, "unset")
        w.maybe("search_filter", ab.search_filter, "unset")
        w.maybe("bind_dn", ab.bind_dn, "unset: anonymous search")
        w.maybe("bind_password", ab.bind_password, "unset", secret=True)
        w.set("start_tls", _fmt_bool(ab.start_tls))
        w.maybe("ca_file", ab.ca_file, "unset: the system CA store")
        w.maybe("sender_attribute", ab.sender_attribute, "unset: no sender restrictions")
        w.set("timeout", _toml_string(_fmt_duration(ab.timeout)))

    for name, rc in config.routes.items():
        w.section(f"[route.{_key_label(name)}]")
        if rc.maildir is not None:
            w.set("maildir", _toml_string(rc.maildir))
        else:
            w.set("smarthost", _fmt_strings(_fmt_smarthost(h) for h in rc.smarthost))
            w.set("tls", _toml_string(rc.tls))
            w.set("tls_verify", _fmt_bool(rc.tls_verify))
            w.maybe("ca_file", rc.ca_file, "unset: the system CA store")
            w.maybe("tls_server_name", rc.tls_server_name, "unset: the smarthost's name")
            w.maybe("username", rc.username, "unset: no AUTH")
            w.maybe("password", rc.password, "unset", secret=True)
            if rc.max_recipients_per_transaction is None:
                w.unset("max_recipients_per_transaction", "unlimited")
            else:
                w.set("max_recipients_per_transaction", str(rc.max_recipients_per_transaction))
            w.maybe("client_cert", rc.client_cert, "unset")
            w.maybe("client_key", rc.client_key, "unset")
        w.set("concurrency", str(rc.concurrency))
        if rc.max_rate is None:
            w.unset("max_rate", "unlimited")
        else:
            w.set("max_rate", _fmt_rate(rc.max_rate))
        w.set("soft_bounce", _fmt_bool(rc.soft_bounce))

    return "\n".join(w.lines) + "\n"


def _fmt_smarthost(host: Smarthost) -> str:
    name = f"[{host.host}]" if ":" in host.host else host.host
    return f"{name}:{host.port}"
