"""How the config spells sizes, durations, rates and strings, both ways.

Parsing (``"25MB"`` -> bytes) and formatting (bytes -> ``"25MB"``) live
together so that ``check-config``'s output always parses back to the same
value: one owner for each spelling.  Other modules (the limiters, the
couriers) parse the same spellings through the public ``parse_*`` functions.
"""

from __future__ import annotations

import math
import re

from relayd.config.types import DAY, HOUR, MINUTE, WEEK, GiB, KiB, MiB, Rate
from relayd.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE | re.ASCII)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": MINUTE, "h": HOUR, "d": DAY, "w": WEEK}


def parse_size(value: object, source: str, key: str) -> int:
    """Bytes from an integer or ``"25MB"`` (powers of 1024, as Postfix users
    expect from ``message_size_limit`` arithmetic).

    Zero is allowed here because some sizes use it for "no check"; callers
    that need a positive size say so.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(
            source, key, f'must be a size (bytes, or a string like "25MB"), not {type_name(value)}'
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
            f'must be a duration (seconds, or a string like "5m"), not {type_name(value)}',
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
            source, key, f'must be a rate string like "100/h" or "10/5m", not {type_name(value)}'
        )
    count_text, slash, per_text = value.partition("/")
    count_text = count_text.strip()
    per_text = per_text.strip()
    if not slash or not is_decimal(count_text) or not per_text:
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


def is_decimal(text: str) -> bool:
    # str.isdigit() accepts "²", which int() then rejects: ASCII digits only.
    return text.isascii() and text.isdigit()


def type_name(value: object) -> str:
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


def key_label(name: str) -> str:
    """A table name as it would be written in TOML, so error keys can be
    pasted back into the file's section headers."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return toml_string(name)


# --- formatting (check-config) ---------------------------------------------


def toml_string(value: str) -> str:
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


def format_duration(seconds: float) -> str:
    for unit, size in (("w", WEEK), ("d", DAY), ("h", HOUR), ("m", MINUTE)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{_fmt_number(seconds)}s"


def format_size(size: int) -> str:
    for unit, factor in (("GB", GiB), ("MB", MiB), ("KB", KiB)):
        if size >= factor and size % factor == 0:
            return toml_string(f"{size // factor}{unit}")
    return str(size)


def format_rate(rate: Rate) -> str:
    units = {1.0: "s", MINUTE: "m", HOUR: "h", DAY: "d"}
    per = units.get(rate.per) or format_duration(rate.per)
    return toml_string(f"{rate.count}/{per}")
