"""DKIM signing of one message as cleanup streams it to the spool.

Cleanup knows the header section before any of the body has arrived, and
the body hash only at the end; the signature must still go at the top
(RFC 6376 §5.6: prepended, like a trace field).  So signing has two steps:

1. :meth:`Signer.plan` (header section complete): which keys sign, and the
   exact bytes the signatures will take.  Every part of a DKIM-Signature
   has a length known in advance (``bh=`` is 44 base64 characters, ``b=``
   the key's fixed signature size, ``t=`` the arrival time), and the header
   is folded by length alone, so cleanup writes a placeholder of that size
   and streams on.
2. :meth:`MessageSigning.signatures` (message complete): the body hash,
   then the header hash by dkimpy (relaxed header canonicalisation, header
   selection with From oversigned, ``b=`` removal) and the signature; the
   result is written over the placeholder before the message is made
   durable.  A retried delivery reads the signed file: signed once.

relaxed/relaxed throughout: a smarthost that refolds a header or changes
trailing whitespace does not break the signature.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from email.utils import getaddresses

import dkim
from attrs import frozen
from dkim.canonicalization import CanonicalizationPolicy

from relayd.dkim.bodyhash import RelaxedBodyHash
from relayd.dkim.keys import SigningKey

__all__ = ["SIGNED_HEADERS", "DomainKey", "MessageSigning", "Signer", "SigningFailed"]

#: The header fields signed, each as often as it occurs; From once more
#: (oversigned), so a From added later breaks the signature.
SIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)
RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
#: Lines of the DKIM-Signature header are folded at this width.
WIDTH = 78
_SIG_NAME = b"DKIM-Signature"

Count = Callable[[str, str, str], None]


class SigningFailed(Exception):
    """A message could not be signed (cleanup answers 451 4.3.0)."""

    def __init__(self, key: DomainKey, reason: str) -> None:
        super().__init__(f"d={key.domain} s={key.selector}: {reason}")
        self.key = key


@frozen
class DomainKey:
    """One ``[[dkim]]`` entry with its key loaded."""

    domain: str
    selector: str
    key: SigningKey


def _domain(name: str) -> str:
    """A domain as ``d=`` carries it and as From: domains are compared:
    lower case, no trailing dot, A-labels for internationalised names."""
    name = name.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def header_fields(block: bytes) -> list[list[bytes]]:
    """Split a header section (CRLF lines) into ``[name, value]`` pairs as
    dkimpy holds them: the value is everything after the colon, folded
    lines and final CRLF included."""
    fields: list[list[bytes]] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += line
        else:
            name, _, value = line.partition(b":")
            fields.append([name, value])
    return fields


def _from_domain(fields: list[list[bytes]]) -> str | None:
    """The domain of the (single) From: header, None when there is not
    exactly one From: or its addresses name different domains."""
    values = [v for n, v in fields if n.rstrip().lower() == b"from"]
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    domains = {_domain(addr.rpartition("@")[2]) for _, addr in getaddresses([text]) if "@" in addr}
    return domains.pop() if len(domains) == 1 else None


def _format(tags: Sequence[tuple[str, str]]) -> bytes:
    """The header line, folded at :data:`WIDTH` by length alone.

    Tags are separated by ``"; "``; inside ``h=`` a fold may follow a colon
    and inside ``b=`` it may come anywhere (RFC 6376 §3.5 allows FWS in
    both).  Equal-length values give equal-length output: what makes the
    placeholder exact.
    """
    atoms: list[tuple[str, bool]] = []  # (text, joins the previous atom without a space)
    for i, (tag, value) in enumerate(tags):
        end = ";" if i < len(tags) - 1 else ""
        if tag == "h":
            names = value.split(":")
            atoms.append((f"h={names[0]}" + (":" if len(names) > 1 else end), False))
            atoms += [(n + (":" if j < len(names) - 1 else end), True)
                      for j, n in enumerate(names[1:], 1)]
        elif tag == "b":
            atoms.append(("b=", False))
            atoms += [(value[j : j + 4], True) for j in range(0, len(value), 4)]
            if end:
                atoms[-1] = (atoms[-1][0] + end, True)
        else:
            atoms.append((f"{tag}={value}{end}", False))
    lines = [_SIG_NAME.decode() + ":"]
    for text, glued in atoms:
        piece = text if glued else " " + text
        if len(lines[-1]) + len(piece) > WIDTH:
            lines.append("\t" + text)
        else:
            lines[-1] += piece
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


class Signer:
    """The ``[[dkim]]`` entries in force: which keys sign which From: domain.

    Replaced whole on SIGHUP (keys reread); a message being received keeps
    the :class:`MessageSigning` it started with.

    :param count: told ``(domain, selector, result)`` for every signature
        made (``signed``) or not (``error``): the metric.
    :param unsigned_listeners: listeners with ``dkim = false`` (mail that
        only passes through).
    """

    def __init__(self, keys: Sequence[DomainKey], count: Count | None = None,
                 unsigned_listeners: frozenset[str] = frozenset()) -> None:
        self.unsigned_listeners = unsigned_listeners
        self.by_domain: dict[str, list[DomainKey]] = {}
        for entry in keys:
            self.by_domain.setdefault(_domain(entry.domain), []).append(entry)
        self.count = count or (lambda domain, selector, result: None)

    def plan(self, header_block: bytes, now: float, listener: str = "") -> MessageSigning | None:
        """Signing for a message with this header section (the one that will
        be spooled, after every fix-up), or None when no key is for its
        From: domain (a subdomain is another domain) or its listener does
        not sign."""
        if not self.by_domain or listener in self.unsigned_listeners:
            return None
        fields = header_fields(header_block)
        domain = _from_domain(fields)
        keys = self.by_domain.get(domain) if domain else None
        if not keys:
            return None
        wanted = set(SIGNED_HEADERS)
        names = [n.rstrip().lower().decode("ascii", "replace") for n, _ in fields]
        signed = [n for n in names if n in wanted] + ["from"]
        return MessageSigning(keys, int(now), signed, self.count)


class MessageSigning:
    """One message's signatures: fed the spooled bytes after the placeholder."""

    def __init__(self, keys: Sequence[DomainKey], timestamp: int, signed: list[str],
                 count: Count) -> None:
        self._keys = list(keys)
        self._timestamp = timestamp
        self._signed = signed
        self._count = count
        self._body = RelaxedBodyHash()
        #: The header section until its blank line has been seen.
        self._head: bytearray | None = bytearray()
        self._header_block = b""
        self.placeholder = b"".join(
            _format(self._tags(k, "A" * 44, "A" * _b64len(k.key.signature_size)))
            for k in self._keys)

    def _tags(self, k: DomainKey, bh: str, b: str) -> list[tuple[str, str]]:
        return [("v", "1"), ("a", k.key.algorithm), ("c", "relaxed/relaxed"),
                ("d", _domain(k.domain)), ("s", k.selector), ("t", str(self._timestamp)),
                ("h", ":".join(self._signed)), ("bh", bh), ("b", b)]

    def update(self, data: bytes) -> None:
        """The next spooled bytes: header lines until the blank line, then body."""
        if self._head is None:
            self._body.update(data)
            return
        start = max(0, len(self._head) - 3)
        self._head += data
        if self._head.startswith(b"\r\n"):  # no header fields at all
            end, body = 0, 2
        else:
            end = self._head.find(b"\r\n\r\n", start) + 2
            body = end + 2
            if end < 2:
                return
        head, self._head = self._head, None
        self._header_block = bytes(head[:end])
        self._body.update(bytes(head[body:]))

    def signatures(self) -> bytes:
        """The DKIM-Signature headers, exactly ``len(placeholder)`` bytes.

        :raises SigningFailed: a key failed to sign (each failure counted).
        """
        if self._head is not None:  # no blank line: all header, empty body
            self._header_block, self._head = bytes(self._head), None
        bh = base64.b64encode(self._body.digest()).decode("ascii")
        headers = RELAXED.canonicalize_headers(header_fields(self._header_block))
        include = tuple(n.encode("ascii") for n in self._signed)
        out = []
        for k in self._keys:
            try:
                unsigned = _format(self._tags(k, bh, ""))
                value = unsigned[len(_SIG_NAME) + 1 :].rstrip(b"\r\n")
                h = hashlib.sha256()
                dkim.hash_headers(h, RELAXED, headers, include, (_SIG_NAME, value), {})
                b = base64.b64encode(k.key.sign(h.digest())).decode("ascii")
                out.append(_format(self._tags(k, bh, b)))
            except Exception as e:
                self._count(k.domain, k.selector, "error")
                raise SigningFailed(k, str(e) or type(e).__name__) from e
        result = b"".join(out)
        if len(result) != len(self.placeholder):
            raise SigningFailed(self._keys[0], "signature length differs from its reservation")
        for k in self._keys:
            self._count(k.domain, k.selector, "signed")
        return result

    @property
    def keys(self) -> list[DomainKey]:
        return list(self._keys)


def _b64len(size: int) -> int:
    return 4 * ((size + 2) // 3)
