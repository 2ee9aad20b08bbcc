"""DSN parameters on MAIL and RCPT (RFC 3461 §4): RET, ENVID, NOTIFY, ORCPT.

Parsed strictly, because relayd passes them on to the next hop and puts
them into its own delivery reports: a malformed one is ``501 5.5.4`` (the
session goes on), a repeated one too.  ENVID and ORCPT arrive as xtext
(``+HH`` escapes) and are kept decoded; ``xtext`` encodes them again for
the next hop.
"""

from __future__ import annotations

import re

from relayd.envelope import RecipientDSN, xtext
from relayd.errors import SMTPReply

__all__ = ["parse_envid", "parse_notify", "parse_orcpt", "parse_ret", "xtext", "xtext_decode"]

#: RFC 3461 §4.4: an ENVID is at most 100 characters; §4.2: ORCPT 500.
ENVID_MAX = 100
ORCPT_MAX = 500

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _bad(key: str) -> SMTPReply:
    return SMTPReply(501, "5.5.4", f"Bad {key} parameter syntax")


def xtext_decode(text: str, key: str) -> str:
    if not _XTEXT.fullmatch(text):
        raise _bad(key)
    out = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    if any(not (0x20 <= ord(c) < 0x7F) for c in out):
        raise _bad(key)
    return out


def parse_ret(value: str | None) -> str:
    if value is None or value.upper() not in ("FULL", "HDRS"):
        raise _bad("RET")
    return value.upper()


def parse_envid(value: str | None) -> str:
    if value is None or not value or len(value) > ENVID_MAX:
        raise _bad("ENVID")
    return xtext_decode(value, "ENVID")


def parse_notify(value: str | None) -> tuple[str, ...]:
    """``NEVER`` alone, or a list of SUCCESS, FAILURE, DELAY (RFC 3461 §4.1)."""
    if not value:
        raise _bad("NOTIFY")
    words = [w.upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return ("NEVER",)
    if not words or len(set(words)) != len(words) or not set(words) <= _NOTIFY:
        raise _bad("NOTIFY")
    return tuple(w for w in ("SUCCESS", "FAILURE", "DELAY") if w in words)


def parse_orcpt(value: str | None) -> str:
    """``addr-type;xtext`` (RFC 3461 §4.2), kept as ``type;decoded``."""
    if value is None or len(value) > ORCPT_MAX or ";" not in value:
        raise _bad("ORCPT")
    kind, _, address = value.partition(";")
    if not _ATOM.fullmatch(kind) or not address:
        raise _bad("ORCPT")
    return f"{kind};{xtext_decode(address, 'ORCPT')}"


def rcpt_dsn(params: list[tuple[str, str | None]]) -> tuple[RecipientDSN, list[str]]:
    """The DSN parameters among RCPT's, and the names of the others."""
    notify: tuple[str, ...] = ()
    orcpt = ""
    seen: set[str] = set()
    other = []
    for key, value in params:
        if key in seen:
            raise SMTPReply(501, "5.5.4", f"Duplicate {key} parameter")
        seen.add(key)
        if key == "NOTIFY":
            notify = parse_notify(value)
        elif key == "ORCPT":
            orcpt = parse_orcpt(value)
        else:
            other.append(key)
    return RecipientDSN(notify, orcpt), other
