"""Address parts and the comparison keys routing, aliases and rewriting use.

One normaliser for every table relayd looks addresses up in: domains
compare case-insensitively and as IDNA A-labels (so an SMTPUTF8 domain and
its ``xn--`` form are the same key), local parts case-insensitively (as
Postfix's tables do).  The address itself is never changed by this: what
the client sent is what the next hop gets.
"""

from __future__ import annotations

import re

import idna


def split_address(address: str) -> tuple[str, str | None]:
    """``(local_part, domain)`` split at the last ``@`` outside quotes.

    A quoted local part may itself contain ``@`` (``"a@b"@example.org``); the
    domain is what follows the last unquoted one, which is where the mail
    is actually routed.
    """
    quoted = escaped = False
    at = -1
    for i, c in enumerate(address):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "@" and not quoted:
            at = i
    if at < 0:
        return address, None
    return address[:at], address[at + 1 :]


class DomainError(ValueError):
    """The text cannot be a domain (IDNA refuses it)."""


def domain_key(domain: str) -> str:
    """The lookup form of a domain: lower case, no trailing dot, A-labels.

    :raise DomainError: for a non-ASCII domain that IDNA 2008 (with UTS #46
        mapping, as browsers and MTAs use it) cannot encode.
    """
    domain = domain.rstrip(".")
    if domain.isascii():
        domain = domain.lower()
        if "xn--" in domain:
            try:
                idna.decode(domain)
            except (idna.IDNAError, UnicodeError) as e:
                raise DomainError(f"{domain!r} is not a valid IDNA domain: {e}") from None
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise DomainError(f"{domain!r} is not a valid IDNA domain: {e}") from None


def lenient_domain_key(domain: str) -> str:
    """:func:`domain_key`, or the lower-cased text for a domain IDNA refuses
    (such a domain matches only a rule that names it the same way)."""
    try:
        return domain_key(domain)
    except DomainError:
        return domain.rstrip(".").lower()


def address_key(address: str) -> str:
    """``local@domain`` lower-cased with the domain as :func:`lenient_domain_key`."""
    local, domain = split_address(address)
    if domain is None:
        return local.lower()
    return f"{local.lower()}@{lenient_domain_key(domain)}"


def routes_onward(local: str) -> bool:
    """``user%host@``, ``host!user@``, ``"user@host"@``: a local part the
    next hop may route on to a domain other than the one we checked."""
    return any(c in local for c in "%!@")


def address_pattern(text: str) -> re.Pattern[str]:
    """``*@example.org``, ``app@example.org``, ``example.org`` (any user).

    Only ``*`` is special; matching is against :func:`address_key`, so it
    ignores case and an IDNA domain matches in either form.
    """
    text = text.strip()
    if "@" not in text:
        text = "*@" + text
    local, _, domain = text.rpartition("@")
    if "*" not in domain:
        domain = lenient_domain_key(domain)
    text = f"{local.lower()}@{domain.lower()}"
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in text) + r"\Z", re.S)

