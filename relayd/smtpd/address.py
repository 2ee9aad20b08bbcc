"""Envelope address syntax: paths in MAIL/RCPT and their parts.

Postfix is lenient about envelope syntax (``strict_rfc821_envelopes = no``)
and so is this: what matters for a relay is finding the path reliably,
keeping it byte-exact (UTF-8 included) and never misreading where the domain
is, because the relay decision and ``allowed_*`` patterns depend on it.
"""

from __future__ import annotations

import re

from relayd.address import split_address

__all__ = ["AddressSyntaxError", "parse_params", "parse_path", "split_address"]

_SOURCE_ROUTE = re.compile(r"^@[^:]*:")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>]")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


class AddressSyntaxError(ValueError):
    """The text is not a path we can act on."""


def parse_path(text: str) -> tuple[str, str]:
    """Split ``<path> params`` (what follows ``FROM:``/``TO:``).

    :return: ``(address, params_text)``; the address without angle brackets
        and without any RFC 5321 source route (which servers ignore, §C).
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = _closing_bracket(text)
        inner, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressSyntaxError("junk after the path")
    else:
        # Postfix accepts a bare address without angle brackets.
        inner, _, rest = text.partition(" ")
        if not inner:
            raise AddressSyntaxError("missing path")
    address = _SOURCE_ROUTE.sub("", inner) if inner.startswith("@") else inner
    _check(address)
    return address, rest.strip(" ")


def _closing_bracket(text: str) -> int:
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    raise AddressSyntaxError("unbalanced angle bracket or quote")


def _check(address: str) -> None:
    local, domain = split_address(address)
    unquoted = _QUOTED.sub("", local)
    if '"' in unquoted or _FORBIDDEN.search(unquoted):
        raise AddressSyntaxError("invalid character in local part")
    if domain is not None and _FORBIDDEN.search(domain):
        raise AddressSyntaxError("invalid character in domain")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in local):
        raise AddressSyntaxError("control character in address")
    if domain is not None and (not domain or not local):
        raise AddressSyntaxError("empty domain or local part")


def parse_params(text: str) -> list[tuple[str, str | None]]:
    """ESMTP ``KEYWORD[=VALUE]`` parameters, keywords upper-cased."""
    params = []
    for word in text.split():
        key, eq, value = word.partition("=")
        if not key or not key.replace("-", "").isalnum() or not key.isascii():
            raise AddressSyntaxError(f"bad parameter {word!r}")
        params.append((key.upper(), value if eq else None))
    return params
