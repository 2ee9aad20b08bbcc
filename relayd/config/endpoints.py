"""The listen endpoint grammar: what Twisted's ``serverFromString`` will bind,
checked before anything binds.

Only ``tcp:``, ``tcp6:`` and ``systemd:`` are accepted: TLS and the PROXY
protocol are listener keys, so they can be reloaded.  :func:`_clash` finds
two listeners (or a listener and ``[http]``) that would fight over a port.
"""

from __future__ import annotations

import ipaddress

from relayd.config.fields import _string
from relayd.config.types import Endpoint
from relayd.config.units import is_decimal, toml_string
from relayd.errors import ConfigError

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
    if not is_decimal(text) or int(text) > 65535:
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
            f'{toml_string(description)} is not an endpoint: use "tcp:PORT", '
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
        if not is_decimal(backlog) or int(backlog) < 1:
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
    if index is None or not is_decimal(index):
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
