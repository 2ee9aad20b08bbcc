"""RFC 3464 delivery status notifications, written the way Postfix's bounce(8) writes them.

A DSN is the only way a sender learns that relayd gave up on a message it
accepted with a 250, so it has to reach them:
it is built here as finished bytes, ready to be spooled and sent with
``MAIL FROM:<>`` through the original message's route like any other message.
Everything here is a pure function of its arguments (``now`` included), so
the same failure always gives the same notification and tests need no clock.
It stays one module (past 400 lines) because its helpers (folding, wrapping,
boundaries, the UTF-8 "global" variants) serve this one message format and
nothing else; split up they would only be imported back here.

The message is assembled by hand rather than with ``email.message``: a DSN
carries the original header section (and maybe the whole message) verbatim,
8-bit bytes and odd line breaks included, and the generator in the ``email``
package re-encodes, re-folds and re-wraps what it is given.  By hand, every
octet is known: CRLF line endings only, no line longer than 998 octets
(RFC 5322 §2.1.1, what an SMTP server has to accept), a MIME boundary that
cannot occur in the content.

Shape (RFC 6522 multipart/report, RFC 3464, RFC 3834, RFC 6533)::

    multipart/report; report-type=delivery-status
      text/plain                     what happened, in Postfix's words
      message/delivery-status        per-message and per-recipient fields
      text/rfc822-headers            the original header section (default), or
      message/rfc822                 the whole original message

and for SMTPUTF8 mail (or any UTF-8 address) the ``global`` variants:
``message/global-delivery-status``, ``message/global-headers`` and
``message/global``, with ``report-type=global-delivery-status``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from relayd.content import Content, as_content
from relayd.envelope import Envelope, RecipientResult

__all__ = [
    "FAILED",
    "RETURN_FULL",
    "RETURN_HEADERS",
    "build_dsn",
    "diagnostic_status",
    "is_bounce",
]

FAILED = "failed"
"""The Action of every recipient relayd reports: it sends non-delivery
reports only (no delay warnings: Postfix's delay_warning_time is off by
default too, and nothing here asks for one)."""

RETURN_HEADERS, RETURN_FULL = "headers", "full"
"""How much of the original goes back (RFC 3461's RET=HDRS / RET=FULL)."""

HEADER_READ_LIMIT = 256 * 1024
"""How much of the original is read for its header section (cleanup's limit
for finding one): a 50 MB message costs a bounce 256 KiB, not 50 MB."""

_SUBJECT = "Undelivered Mail Returned to Sender"

MAX_LINE = 998
"""RFC 5322 §2.1.1: octets per line, not counting the CRLF."""

FOLD_AT = 78
"""RFC 5322 §2.1.1's "SHOULD": where fields are folded when there is a space to fold at."""

_CRLF = b"\r\n"

# The leading basic code (RFC 5321 §4.2) and, optionally, the enhanced
# code after it (RFC 3463 §2: class.subject.detail, 1-3 and 1-3 digits).
_REPLY_RE = re.compile(
    r"^([245])[0-9]{2}(?:[ -]|$)(?:\s*([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.]))?"
)
# A reply text that starts with an enhanced code alone (local failures).
_ENHANCED_RE = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9.])")
# "smtp.example.org[192.0.2.1]:587" as couriers report a relay.
_RELAY_RE = re.compile(r"^(?P<name>[0-9A-Za-z._-]*)(?P<addr>\[[^\]]*\])?(?::[0-9]+)?$")
# Characters RFC 2046 allows in a boundary (bchars), space excluded.
_NOT_BCHAR = re.compile(r"[^0-9A-Za-z'()+_,\-./:=?]")
_BOUNDARY_MAX = 70
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# A line break inside a reply, with the blanks around it: one space, as Postfix joins them.
_MULTILINE = re.compile(r"[ \t]*(?:\r\n|\r|\n)+[ \t]*")


def is_bounce(envelope: Envelope) -> bool:
    """True for a message with the null reverse-path: a DSN (or an MDN, a vacation reply).

    RFC 5321 §4.5.5: such mail must never cause another notification, or two
    systems that cannot reach each other would bounce bounces forever.
    """
    return envelope.sender == ""


def diagnostic_status(reply: str, default_class: str = "5") -> str:
    """The RFC 3463 status for a reply: its enhanced code, else one derived from its basic code.

    ``550 5.1.1 ...`` gives ``5.1.1``; ``554 no`` gives ``5.0.0``; ``451 ...``
    gives ``4.0.0``.  When the two disagree on the class (``550 4.2.2``), the
    basic code wins, as in Postfix: the reply code is what the server acted on.
    A text without any code (a connection failure, a local error) gets
    ``default_class``.0.0.
    """
    text = reply.strip()
    match = _REPLY_RE.match(text)
    if match is not None:
        cls, _, subject, detail = match.groups()
        if subject is not None:
            return f"{cls}.{int(subject)}.{int(detail)}"
        return f"{cls}.0.0"
    enhanced = _ENHANCED_RE.match(text)
    if enhanced is not None:
        cls, subject, detail = enhanced.groups()
        return f"{cls}.{int(subject)}.{int(detail)}"
    return f"{default_class}.0.0"


def build_dsn(
    *,
    queue_id: str,
    envelope: Envelope,
    failed: Sequence[RecipientResult],
    content: Content | bytes,
    reporting_mta: str,
    bounce_from: str,
    now: float,
    remote_mta: str | None = None,
    return_content: str = RETURN_HEADERS,
) -> bytes:
    """The complete DSN message for ``failed`` recipients of a queued message, as spool-ready bytes.

    :param queue_id: the original message's queue id; shown in the report and
        part of the Message-ID, so the postmaster can find the log lines.
    :param envelope: the original envelope: the DSN goes to its sender.
    :param failed: one result per recipient to report, in the order given.
    :param content: the original message as spooled (header section, blank
        line, body); line endings are normalised to CRLF.  For ``"headers"``
        only its first :data:`HEADER_READ_LIMIT` bytes are read; a header
        section longer than that is returned up to its last complete line.
    :param reporting_mta: our host name (``[server] hostname``).
    :param bounce_from: the DSN's From: address (``[server] bounce_from``);
        empty means ``MAILER-DAEMON@<reporting_mta>``.
    :param now: seconds since the epoch: the Date and the Message-ID.
    :param remote_mta: the server that gave the replies, as a courier reports
        a relay (``mx.example.org[192.0.2.1]:25``); None when the failure was
        local (no connection, expiry, a maildir).
    :param return_content: ``"headers"`` (the default, and Postfix's choice for
        all but small messages: a bounce should not ship megabytes back) or
        ``"full"``.

    :raises ValueError: for the null sender (never bounce a bounce: check
        ``is_bounce`` first), an empty ``failed``, or an unknown
        ``return_content``.
    """
    if is_bounce(envelope):
        raise ValueError("a message with the null sender is never bounced")
    if return_content not in (RETURN_HEADERS, RETURN_FULL):
        raise ValueError(
            f"return_content must be {RETURN_HEADERS!r} or {RETURN_FULL!r}, not {return_content!r}"
        )
    if not failed:
        raise ValueError("a DSN needs at least one recipient to report")

    # RFC 6533: UTF-8 addresses can only be carried by the "global" types, and
    # a message that needed SMTPUTF8 can only be returned in message/global.
    utf8 = (
        envelope.smtputf8
        or not envelope.sender.isascii()
        or any(not r.recipient.isascii() for r in failed)
    )
    sender_addr = envelope.sender
    from_addr = bounce_from or f"MAILER-DAEMON@{reporting_mta}"
    remote_name, remote_shown = _split_relay(remote_mta)

    content = as_content(content)
    if return_content == RETURN_HEADERS:
        returned = _header_section(_normalise(_head(content)))
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"
        returned_desc = "Undelivered Message Headers"
    else:
        returned = _normalise(content.read())
        returned_type = "message/global" if utf8 else "message/rfc822"
        returned_desc = "Undelivered Message"
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"

    notification = _notification(failed, reporting_mta, remote_shown, utf8)
    report = _report(queue_id, envelope, failed, reporting_mta, remote_name, utf8)

    text_charset = "utf-8" if not notification.isascii() else "us-ascii"
    parts = [
        (
            [
                "Content-Description: Notification",
                f"Content-Type: text/plain; charset={text_charset}",
            ]
            + (["Content-Transfer-Encoding: 8bit"] if text_charset == "utf-8" else []),
            notification,
        ),
        (
            [
                "Content-Description: Delivery report",
                f"Content-Type: {status_type}",
            ]
            + (["Content-Transfer-Encoding: 8bit"] if not report.isascii() else []),
            report,
        ),
        (
            [
                f"Content-Description: {returned_desc}",
                f"Content-Type: {returned_type}",
            ]
            + (["Content-Transfer-Encoding: 8bit"] if not returned.isascii() else []),
            returned,
        ),
    ]

    boundary = _boundary(queue_id, now, reporting_mta, [body for _, body in parts])
    eight_bit = any(not body.isascii() for _, body in parts)
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    header_fields = [
        ("From", f"Mail Delivery System <{from_addr}>"),
        ("To", f"<{sender_addr}>"),
        ("Subject", _SUBJECT),
        ("Date", _rfc5322_date(now)),
        ("Message-ID", _message_id(queue_id, now, FAILED, reporting_mta)),
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        (
            "Content-Type",
            f'multipart/report; report-type={report_type}; boundary="{boundary}"',
        ),
        ("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ]

    out: list[bytes] = []
    for name, value in header_fields:
        out.extend(_fold_field(name, _clean(value, utf8)))
    out.append(b"")
    out.append(b"This is a MIME-encapsulated message.")
    for headers, body in parts:
        out.append(b"")
        out.append(b"--" + boundary.encode("ascii"))
        out.extend(h.encode("ascii") for h in headers)
        out.append(b"")
        # Every body ends in CRLF; the CRLF before the next delimiter belongs
        # to the delimiter (RFC 2046 §5.1.1), so the body's own last CRLF is
        # written as the empty line before it and nothing of the body is lost.
        if body:
            out.append(body[: -len(_CRLF)])
    out.append(b"")
    out.append(b"--" + boundary.encode("ascii") + b"--")
    return _CRLF.join(out) + _CRLF


# -- the three parts ---------------------------------------------------------


def _notification(
    failed: Sequence[RecipientResult], reporting_mta: str, remote_shown: str | None, utf8: bool,
) -> bytes:
    """Part 1, for people: Postfix's bounce template text, so that it reads familiar."""
    host = _clean(reporting_mta, utf8)
    lines = [f"This is the mail system at host {host}.", ""]
    lines += [
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
    ]
    lines += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    out = [line.encode("ascii") for line in lines]
    for result in failed:
        rcpt = _clean(result.recipient, utf8)
        reply = _clean(result.reply, utf8)
        said = f"host {remote_shown} said: " if remote_shown else ""
        out.extend(_wrap(f"<{rcpt}>: {said}{reply}", indent="    "))
    return _CRLF.join(out) + _CRLF


def _report(
    queue_id: str,
    envelope: Envelope,
    failed: Sequence[RecipientResult],
    reporting_mta: str,
    remote_name: str | None,
    utf8: bool,
) -> bytes:
    """Part 2, for programs: RFC 3464 §2.2 per-message and §2.3 per-recipient fields."""
    fields: list[bytes] = []
    if envelope.dsn.envid is not None:
        # RFC 3464 §2.2.1: the client's ENVID (RFC 3461 §4.4), before Reporting-MTA.
        fields += _fold_field("Original-Envelope-Id", _clean(envelope.dsn.envid, utf8))
    fields += _fold_field("Reporting-MTA", f"dns; {_clean(reporting_mta, utf8)}")
    fields += _fold_field("X-Relayd-Queue-ID", _clean(queue_id, utf8))
    fields += _fold_field("X-Relayd-Sender", _address_field(envelope.sender, utf8))
    fields += _fold_field("Arrival-Date", _rfc5322_date(envelope.arrival))
    for result in failed:
        reply = _clean(result.reply, utf8)
        fields.append(b"")
        fields += _fold_field("Final-Recipient", _address_field(result.recipient, utf8))
        # Original-Recipient (RFC 3464 §2.3.1) only when the client gave ORCPT.
        orcpt = envelope.dsn.of(result.recipient).orcpt
        if orcpt:
            fields += _fold_field("Original-Recipient", _clean(orcpt, utf8))
        fields += _fold_field("Action", FAILED)
        fields += _fold_field("Status", diagnostic_status(reply))
        if remote_name:
            fields += _fold_field("Remote-MTA", f"dns; {_clean(remote_name, utf8)}")
        if _REPLY_RE.match(reply):
            fields += _fold_field("Diagnostic-Code", f"smtp; {reply}")
        elif reply:
            # Not an SMTP reply (a connection error, a local failure): the
            # "smtp" type would be a lie; Postfix says "X-Postfix" here.
            fields += _fold_field("Diagnostic-Code", f"X-Relayd; {reply}")
    return _CRLF.join(fields) + _CRLF


def _head(content: Content) -> bytes:
    """Enough of the original for its header section, ending with a complete line."""
    head = content.head(HEADER_READ_LIMIT)
    if len(head) < content.size:
        head = head[: head.rfind(b"\n") + 1]
    return head


def _header_section(message: bytes) -> bytes:
    """The original's header lines, up to (not including) the blank line that ends them."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(_CRLF):
        return b""  # no header section at all
    if end < 0:
        return message  # headers only, no body
    return message[: end + len(_CRLF)]


# -- helpers -----------------------------------------------------------------


def _normalise(content: bytes) -> bytes:
    """CRLF line endings, no line over 998 octets, ending in CRLF.

    Bare CR or LF would make the DSN ambiguous on the wire (SMTP smuggling);
    an over-long line is broken by inserting CRLF SPACE, which is what Postfix's
    smtp_line_length_limit does "to minimize the damage to MIME formatted mail"
    (in a header it is just a fold).
    """
    if not content:
        return b""
    lines = _LINE_BREAK.split(content)
    if lines[-1] == b"":
        lines.pop()
    out: list[bytes] = []
    for line in lines:
        while len(line) > MAX_LINE:
            out.append(line[:MAX_LINE])
            line = b" " + line[MAX_LINE:]
        out.append(line)
    return _CRLF.join(out) + _CRLF


def _clean(text: str, utf8: bool) -> str:
    """Text safe to put on one line of the DSN.

    Line breaks and tabs (a multi-line reply) become spaces, so nothing from a
    remote server can inject a header or a boundary line; other control
    characters become ``?``, as Postfix's printable() does, and so does
    non-ASCII text unless the DSN is an SMTPUTF8 one.
    """
    text = _MULTILINE.sub(" ", text)
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif not ch.isprintable() or (not utf8 and not ch.isascii()):
            out.append("?")
        else:
            out.append(ch)
    return "".join(out).strip()


def _address_field(address: str, utf8: bool) -> str:
    """An RFC 3464 address with its type: ``rfc822`` or, for UTF-8 addresses, RFC 6533's ``utf-8``."""
    if address.isascii():
        return f"rfc822; {_clean(address, utf8)}"
    return f"utf-8; {_clean(address, utf8)}"


def _split_relay(relay: str | None) -> tuple[str | None, str | None]:
    """``("mx.example.org", "mx.example.org[192.0.2.1]")`` from a relay as couriers log it.

    Remote-MTA takes a host name (RFC 3464 §2.3.5, type dns); the text part
    shows name and address without the port, as Postfix's "host X[a] said".
    """
    if not relay:
        return None, None
    relay = relay.strip()
    match = _RELAY_RE.match(relay)
    if match is None:
        # Not a host (``maildir:/var/lib/relayd/outbox``): no Remote-MTA to name.
        return None, relay
    name, addr = match.group("name"), match.group("addr") or ""
    return (name or addr), f"{name}{addr}"


def _wrap(text: str, *, indent: str) -> list[bytes]:
    """Body text wrapped at spaces near 78 columns, continuation lines indented; never over 998."""
    pieces = text.split(" ")
    lines: list[str] = []
    current = ""
    for piece in pieces:
        if not piece:
            continue
        candidate = f"{current} {piece}" if current else piece
        if current and len(candidate.encode()) > FOLD_AT:
            lines.append(current)
            current = indent + piece
        else:
            current = candidate
    lines.append(current)
    out: list[bytes] = []
    for line in lines:
        out.extend(_hard_split(line.encode(), indent.encode()))
    return out


def _fold_field(name: str, value: str) -> list[bytes]:
    """A header-style field, folded (RFC 5322 §2.2.3) before spaces to stay near 78 octets.

    Folding only inserts CRLF before existing whitespace, so unfolding gives the
    value back unchanged.  A single word too long for any line (a reply with no
    spaces) is cut at 998 octets with a CRLF SPACE: the one case where the
    unfolded value gains a space, and still better than a line the next MTA
    must reject.
    """
    pieces = re.findall(r" *[^ ]+", f"{name}: {value}")
    lines: list[bytes] = []
    current = b""
    for piece in pieces:
        encoded = piece.encode()
        if current and len(current) + len(encoded) > FOLD_AT:
            lines.append(current)
            current = encoded  # starts with the space(s) it was folded before
        else:
            current += encoded
    lines.append(current)
    out: list[bytes] = []
    for line in lines:
        out.extend(_hard_split(line, b" "))
    return out


def _hard_split(line: bytes, continuation: bytes) -> list[bytes]:
    """Cut ``line`` into lines of at most 998 octets, never inside a UTF-8 sequence."""
    out: list[bytes] = []
    while len(line) > MAX_LINE:
        cut = MAX_LINE
        while cut > 0 and (line[cut] & 0xC0) == 0x80:  # a UTF-8 continuation byte
            cut -= 1
        out.append(line[:cut])
        line = continuation + line[cut:]
    out.append(line)
    return out


def _boundary(queue_id: str, now: float, host: str, bodies: Iterable[bytes]) -> str:
    """A Postfix-style boundary (``QUEUEID.TIME/host``) that occurs in none of the parts.

    The parts carry text chosen by others (the original message, remote
    replies), so a fixed boundary could be forged to end a part early.  Made
    longer with a counter until it does not occur anywhere; deterministic, so
    the same input gives the same bytes.
    """
    base = _NOT_BCHAR.sub("", f"{queue_id}.{int(now)}/{host}")[: _BOUNDARY_MAX - 8]
    texts = list(bodies)
    candidate = base
    counter = 0
    while any(candidate.encode("ascii") in text for text in texts):
        counter += 1
        candidate = f"{base}={counter}"
    return candidate


def _rfc5322_date(when: float) -> str:
    """RFC 5322 §3.3 date-time in UTC (``+0000``: the time is known to be UTC, unlike ``-0000``)."""
    moment = datetime.fromtimestamp(when, UTC)
    return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")


def _message_id(queue_id: str, now: float, reason: str, host: str) -> str:
    """``<YYYYMMDDHHMMSS.micro.QUEUEID.reason@host>``: unique per message and notification.

    Postfix uses the time and the queue id; the microseconds and the reason
    keep a delay warning and a bounce for the same message apart.
    """
    moment = datetime.fromtimestamp(now, UTC)
    stamp = moment.strftime("%Y%m%d%H%M%S") + f".{moment.microsecond:06d}"
    local = re.sub(r"[^0-9A-Za-z.\-_]", "", f"{stamp}.{queue_id}.{reason[0].upper()}")
    domain = re.sub(r"[^0-9A-Za-z.\-]", "", host) or "localhost"
    return f"<{local}@{domain}>"
