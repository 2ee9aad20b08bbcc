"""Plain values that travel between the SMTP server, the spool and couriers.

They are frozen so that a message's envelope read by a courier is exactly the
one that was made durable; a change (a recipient delivered) makes a new value.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

QueueId = str
"""Upper-case hex, 20 digits: 12 of arrival time in microseconds and 8
random.  Unique for the life of the spool (time moves on across restarts;
the random part and an exclusive create cover the same microsecond)."""


def new_queue_id(now: float) -> QueueId:
    """Make a queue id for a message arriving at ``now`` (seconds since the epoch)."""
    micros = int(now * 1_000_000) & 0xFFFF_FFFF_FFFF
    return f"{micros:012X}{secrets.randbits(32):08X}"


def is_queue_id(text: str) -> bool:
    """True for strings that can be a queue id: guards file names from the CLI."""
    return len(text) == 20 and all(c in "0123456789ABCDEF" for c in text)


@frozen
class Envelope:
    """What RFC 5321 calls the envelope, plus where the message came from.

    :param sender: the reverse-path without angle brackets; ``""`` is the null
        sender of bounces.
    :param recipients: forward-paths, exactly as the client sent them (UTF-8
        kept when ``smtputf8``).
    :param route: the name of the route (``[route.NAME]``) that delivers it.
    :param arrival: seconds since the epoch when the message was queued; the
        age that expiry is measured from.
    """

    sender: str
    recipients: tuple[str, ...]
    route: str
    arrival: float
    listener: str = ""
    client_address: str = ""
    helo: str = ""
    user: str | None = None
    smtputf8: bool = False
    body: str | None = None
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "recipients": list(self.recipients),
            "route": self.route,
            "arrival": self.arrival,
            "listener": self.listener,
            "client_address": self.client_address,
            "helo": self.helo,
            "user": self.user,
            "smtputf8": self.smtputf8,
            "body": self.body,
            "size": self.size,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Envelope:
        return cls(
            sender=str(data["sender"]),
            recipients=tuple(str(r) for r in data["recipients"]),
            route=str(data["route"]),
            arrival=float(data["arrival"]),
            listener=str(data.get("listener", "")),
            client_address=str(data.get("client_address", "")),
            helo=str(data.get("helo", "")),
            user=data.get("user"),
            smtputf8=bool(data.get("smtputf8", False)),
            body=data.get("body"),
            size=int(data.get("size", 0)),
        )


@frozen
class QueuedMessage:
    """A message as the spool holds it: its id, envelope and retry state.

    :param attempts: delivery attempts so far that ended in a deferral.
    :param next_attempt: seconds since the epoch before which no attempt is
        made (0: at once).
    :param last_error: the reply of the last deferral, for ``queue list``.
    :param done: recipients already delivered or bounced; the next attempt
        is for the others only.
    """

    queue_id: QueueId
    envelope: Envelope
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    held: bool = False
    done: tuple[str, ...] = ()


SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"


@frozen
class RecipientResult:
    """What the destination said about one recipient.

    :param status: ``sent``, ``deferred`` (try again later) or ``bounced``
        (permanent: the sender gets a DSN).
    :param reply: the reply as the mail log and the DSN show it, e.g.
        ``550 5.1.1 <x@y>: Recipient address rejected``.
    """

    recipient: str
    status: str
    reply: str


@frozen
class DeliveryResult:
    """The outcome of one delivery attempt that reached the destination.

    :param relay: where it went, as the mail log shows it (``smtp.x[1.2.3.4]:587``
        or ``maildir:/var/lib/relayd/outbox``).
    :param recipients: per-recipient outcomes; empty means every recipient
        was ``sent`` with ``reply``.
    """

    relay: str
    reply: str = field(default="250 2.0.0 Ok")
    recipients: tuple[RecipientResult, ...] = ()
