"""``[rewrite]``: sender addresses rewritten on the way in (Postfix
``sender_canonical_maps`` and masquerading).

A map from ``user@domain`` or ``@domain`` to ``address`` or ``@domain``
(``@old`` -> ``@new`` keeps the user part).  Lookup: the full address, then
with its ``+tag`` dropped, then ``@domain``.  The envelope sender is always
rewritten (the Return-Path, where bounces go); with ``headers = true`` so
are the addresses in ``From:``, ``Sender:`` and ``Reply-To:``.

Cleanup applies it to the header section *before* anything signs the
message (DKIM), since a signature over the old From: would break.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from email.utils import getaddresses

from attrs import field, frozen

from relayd.address import address_key, lenient_domain_key, split_address
from relayd.config.routing import map_key, map_value

#: Header fields rewritten with ``headers = true`` (Postfix's canonical
#: ``header`` class for senders).
SENDER_HEADERS = (b"from", b"sender", b"reply-to")

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


class MapSyntaxError(ValueError):
    """A line of the sender map file is wrong: ``FILE:LINE: reason``."""


def parse_map(text: str, path: str) -> dict[str, str]:
    """A Postfix canonical(5)-style file: ``KEY VALUE`` per line, ``#``
    comments.  :raise MapSyntaxError: ``FILE:LINE: reason``."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected KEY VALUE")
            key = map_key(parts[0])
            if key in out:
                raise ValueError(f"{parts[0]!r} is defined twice")
            out[key] = map_value(parts[1])
        except ValueError as e:
            raise MapSyntaxError(f"{path}:{number}: {e}") from None
    return out


@frozen
class SenderRewriter:
    """The sender map, ready to apply; empty = rewrite nothing."""

    entries: Mapping[str, str] = field(factory=dict)
    headers: bool = False

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]], headers: bool = False) -> SenderRewriter:
        return cls({map_key(k): map_value(v) for k, v in pairs}, headers)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def rewrite(self, address: str) -> str:
        """The new address, or ``address`` unchanged (the null sender always)."""
        if not address or not self.entries:
            return address
        local, domain = split_address(address)
        if domain is None:
            return address
        key = address_key(address)
        value = self.entries.get(key)
        if value is None and "+" in local[1:]:
            value = self.entries.get(address_key(local.split("+", 1)[0] + "@" + domain))
        if value is None:
            value = self.entries.get("@" + lenient_domain_key(domain))
        if value is None:
            return address
        return local + value if value.startswith("@") else value

    def rewrite_headers(self, section: bytes) -> bytes:
        """The header section with sender addresses in From:/Sender:/Reply-To:
        rewritten; display names, comments and folding are kept."""
        if not self.headers or not self.entries:
            return section
        out = []
        fields = list(_FIELD.finditer(section))
        pos = 0
        for i, m in enumerate(fields):
            end = fields[i + 1].start() if i + 1 < len(fields) else len(section)
            if m.group(1).lower() in SENDER_HEADERS:
                out.append(section[pos:m.end()])
                out.append(self._rewrite_value(section[m.end():end]))
                pos = end
        out.append(section[pos:])
        return b"".join(out)

    def _rewrite_value(self, value: bytes) -> bytes:
        text = value.decode("utf-8", "surrogateescape")
        for _, addr in getaddresses([text.replace("\r\n", "")]):
            if not addr:
                continue
            new = self.rewrite(addr)
            if new != addr:
                text = re.sub(r"(?<![\w.+-])" + re.escape(addr) + r"(?![\w.-])",
                              new.replace("\\", "\\\\"), text)
        return text.encode("utf-8", "surrogateescape")
