"""Reading one TOML table: unknown keys refused, values converted, errors
named by their dotted key.

These are the package's own vocabulary (hence the underscore names): the
section parsers in :mod:`relayd.config.parser` and
:mod:`relayd.config.backends` and the endpoint grammar share them, so a
string, a network or a secret file is checked the same way under every key.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TypeAlias, TypeVar

from relayd.config.types import Network, Rate
from relayd.config.units import parse_duration, parse_rate, parse_size, toml_string, type_name
from relayd.errors import ConfigError

_T = TypeVar("_T")
_Converter: TypeAlias = Callable[[object, str, str], _T]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


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
            raise ConfigError(source, path or "-", f"must be {what}, not {type_name(data)}")
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
        raise ConfigError(source, key, f"must be a string, not {type_name(value)}")
    if not value.strip():
        raise ConfigError(source, key, "must not be empty")
    return value


def _bool(value: object, source: str, key: str) -> bool:
    # "yes", 1 and "true" are refused: TOML has booleans, and guessing at
    # near-booleans is how security switches end up in the wrong position.
    if not isinstance(value, bool):
        raise ConfigError(source, key, f"must be true or false, not {type_name(value)}")
    return value


def _int_at_least(minimum: int) -> _Converter[int]:
    def convert(value: object, source: str, key: str) -> int:
        # bool is an int subclass in Python; TOML's true is not a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, not {type_name(value)}")
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
            raise ConfigError(source, key, f"must be a string, not {type_name(value)}")
        if value not in choices:
            expected = " or ".join(f'"{c}"' for c in choices)
            raise ConfigError(source, key, f"must be {expected}, not {toml_string(value)}")
        return value

    return convert


def _array(value: object, source: str, key: str) -> list[object]:
    if not isinstance(value, list):
        raise ConfigError(source, key, f"must be an array, not {type_name(value)}")
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
            source, key, f"{toml_string(text)} is not an IP address or network (CIDR)"
        ) from None
    raise ConfigError(
        source, key, f"{toml_string(text)} has host bits set (did you mean {loose}?)"
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
            source, key, f'{toml_string(text)} is not an address pattern (like "*@example.org")'
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
            f"{toml_string(text)} is not a host name (letters, digits, hyphens and dots, "
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
            f'{toml_string(text)} is not a mail address (like "MAILER-DAEMON@example.org")',
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
