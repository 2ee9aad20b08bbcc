"""Plain values that travel between the SMTP server, the spool and couriers.

They are frozen so that a message's envelope read by a courier is exactly the
one that was made durable; a change (a recipient delivered) makes a new value.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import evolve, field, frozen

QueueId = str
"""Upper-case hex, 20 digits: 12 of arrival time in microseconds and 8
random.  Unique for the life of the spool: time moves on across restarts,
within a process the time part never repeats, and the random part and an
exclusive create cover other processes in the same microsecond."""

_last_micros = -1


def new_queue_id(now: float) -> QueueId:
    """Make a queue id for a message arriving at ``now`` (seconds since the epoch).

    Ids made in the same microsecond (a burst, or a clock that stands still
    as ``task.Clock`` does) take the next free microsecond: 32 random bits
    alone collide about once in a hundred bursts of 10,000.
    """
    global _last_micros
    micros = max(int(now * 1_000_000), _last_micros + 1)
    _last_micros = micros
    return f"{micros & 0xFFFF_FFFF_FFFF:012X}{secrets.randbits(32):08X}"


def is_queue_id(text: str) -> bool:
    """True for strings that can be a queue id: guards file names from the CLI."""
    return len(text) == 20 and all(c in "0123456789ABCDEF" for c in text)


def xtext(text: str) -> str:
    """RFC 3461 §4: ``+HH`` for "+", "=", and anything outside ``!``..``~``
    (how ENVID and ORCPT travel to the next hop)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in text)


@frozen
class RecipientDSN:
    """RCPT's DSN parameters (RFC 3461 §4.1, §4.2).

    :param notify: ``()`` when the client gave no NOTIFY (then: failures and
        delays, RFC 3461 §4.1), ``("NEVER",)``, or some of ``SUCCESS``,
        ``FAILURE``, ``DELAY``.
    :param orcpt: ``addr-type;address`` with the xtext decoded, or ``""``.
    """

    notify: tuple[str, ...] = ()
    orcpt: str = ""

    def wants(self, event: str) -> bool:
        """Does the sender want a DSN for ``event`` (SUCCESS, FAILURE, DELAY)?"""
        if not self.notify:
            return event in ("FAILURE", "DELAY")
        return event in self.notify


@frozen
class DSNRequest:
    """MAIL's and RCPT's DSN parameters (RFC 3461) for one message.

    :param ret: ``FULL``, ``HDRS`` or None (not given: relayd returns the
        full message, as Postfix does).
    :param envid: the envelope id, xtext decoded, or None.
    :param recipients: ``(recipient, RecipientDSN)`` for recipients that
        gave any parameter.
    """

    ret: str | None = None
    envid: str | None = None
    recipients: tuple[tuple[str, RecipientDSN], ...] = ()

    def of(self, recipient: str) -> RecipientDSN:
        for rcpt, params in self.recipients:
            if rcpt == recipient:
                return params
        return RecipientDSN()

    def __bool__(self) -> bool:
        return bool(self.ret or self.envid or self.recipients)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.ret:
            data["ret"] = self.ret
        if self.envid is not None:
            data["envid"] = self.envid
        if self.recipients:
            data["recipients"] = {r: {"notify": list(p.notify), "orcpt": p.orcpt}
                                  for r, p in self.recipients}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> DSNRequest:
        """Envelopes written before DSN support have no ``dsn`` key: no request."""
        if not data:
            return cls()
        return cls(
            ret=data.get("ret"),
            envid=data.get("envid"),
            recipients=tuple(
                (str(r), RecipientDSN(tuple(p.get("notify", ())), str(p.get("orcpt", ""))))
                for r, p in dict(data.get("recipients", {})).items()
            ),
        )


@frozen
class Envelope:
    """What RFC 5321 calls the envelope, plus where the message came from.

    :param sender: the reverse-path without angle brackets; ``""`` is the null
        sender of bounces.
    :param recipients: forward-paths, exactly as the client sent them (UTF-8
        kept when ``smtputf8``).
    :param route: the name of the route (``[route.NAME]``) that delivers it:
        the listener's route, for every recipient that ``routes`` does not
        name otherwise.
    :param arrival: seconds since the epoch when the message was queued; the
        age that expiry is measured from.
    :param routes: per recipient (same order as ``recipients``), the route
        ``[[routing]]`` chose; ``()`` when every recipient takes ``route``
        (and in spools written before routing existed).
    :param originals: per recipient, the address the client gave when alias
        expansion changed it (the mail log's ``orig_to=``), else ``""``;
        ``()`` when no recipient was an alias.
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
    routes: tuple[str, ...] = ()
    originals: tuple[str, ...] = ()

    def route_of(self, recipient: str) -> str:
        """The route that delivers ``recipient``."""
        if self.routes:
            for rcpt, route in zip(self.recipients, self.routes):
                if rcpt == recipient:
                    return route
        return self.route

    def original_of(self, recipient: str) -> str:
        """The RCPT the client gave for ``recipient`` if aliases changed it, else ``""``."""
        if self.originals:
            for rcpt, original in zip(self.recipients, self.originals):
                if rcpt == recipient:
                    return original
        return ""

    def by_route(self, recipients: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
        """``recipients`` (default: all) grouped by route, in order: each
        group is delivered in its own transaction(s)."""
        wanted = None if recipients is None else set(recipients)
        routes = self.routes or (self.route,) * len(self.recipients)
        groups: dict[str, list[str]] = {}
        for rcpt, route in zip(self.recipients, routes):
            if wanted is None or rcpt in wanted:
                groups.setdefault(route, []).append(rcpt)
        return {route: tuple(rcpts) for route, rcpts in groups.items()}

    def for_route(self, route: str, recipients: tuple[str, ...]) -> Envelope:
        """The envelope one route's transaction carries."""
        return evolve(self, recipients=recipients, route=route, routes=(), originals=())

    #: RFC 3461 parameters; the JSON key is written only when there are any,
    #: and spools from before DSN support (no key) read as "none given".
    dsn: DSNRequest = DSNRequest()

    def to_json(self) -> dict[str, Any]:
        data = {
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
        if self.dsn:
            data["dsn"] = self.dsn.to_json()
        if self.routes:
            data["routes"] = list(self.routes)
        if self.originals:
            data["originals"] = list(self.originals)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Envelope:
        """:raise ValueError: per-recipient lists that do not match the recipients."""
        envelope = cls._from_json(data)
        n = len(envelope.recipients)
        if len(envelope.routes) not in (0, n) or len(envelope.originals) not in (0, n):
            raise ValueError("per-recipient routes/originals do not match the recipients")
        return envelope

    @classmethod
    def _from_json(cls, data: Mapping[str, Any]) -> Envelope:
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
            dsn=DSNRequest.from_json(data.get("dsn")),
            routes=tuple(str(r) for r in data.get("routes", ())),
            originals=tuple(str(r) for r in data.get("originals", ())),
        )


#: Events a message keeps besides its first one.  A message retried every
#: few minutes for days would otherwise grow a state file that is rewritten
#: and fsynced at every deferral; the first event says how the trouble
#: started, the last ones what happens now, and the mail log has the rest.
HISTORY_KEEP = 50
#: Recipients an event names; past this only their number is kept (a
#: 100-recipient message deferred 50 times stays a few KB).
EVENT_RECIPIENTS = 10
#: Longest reply an event keeps.
EVENT_REPLY = 512


@frozen
class Event:
    """One thing that happened to a queued message, for ``relayd queue show``.

    Arrival is not one of them: the envelope already says when, from whom
    and through which listener (see :func:`history_json`).

    :param event: ``sent``, ``deferred``, ``bounced``, ``expired``, ``held``,
        ``released`` or ``deleted``.
    :param more: recipients the event is about beyond those named.
    :param relay: where the attempt went (``smtp.x[1.2.3.4]:587``), when known.
    """

    time: float
    event: str
    recipients: tuple[str, ...] = ()
    more: int = 0
    route: str = ""
    relay: str = ""
    reply: str = ""

    @classmethod
    def of(cls, time: float, event: str, recipients: tuple[str, ...] | list[str] = (),
           route: str = "", relay: str = "", reply: str = "") -> Event:
        """An event with its recipient list and reply cut to the bounds."""
        rcpts = tuple(recipients)
        return cls(time, event, rcpts[:EVENT_RECIPIENTS], max(0, len(rcpts) - EVENT_RECIPIENTS),
                   route, relay, reply[:EVENT_REPLY])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"time": self.time, "event": self.event}
        for key in ("recipients", "more", "route", "relay", "reply"):
            value = getattr(self, key)
            if value:
                data[key] = list(value) if key == "recipients" else value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            time=float(data["time"]),
            event=str(data["event"]),
            recipients=tuple(str(r) for r in data.get("recipients", ())),
            more=int(data.get("more", 0)),
            route=str(data.get("route", "")),
            relay=str(data.get("relay", "")),
            reply=str(data.get("reply", "")),
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
    :param history: what happened to it since it arrived, oldest first; the
        first event and the last :data:`HISTORY_KEEP` (see there).
    :param history_omitted: events dropped from the middle of ``history``.
    """

    queue_id: QueueId
    envelope: Envelope
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    held: bool = False
    done: tuple[str, ...] = ()
    history: tuple[Event, ...] = ()
    history_omitted: int = 0

    def with_events(self, *events: Event) -> QueuedMessage:
        """This message with ``events`` added to its (bounded) history."""
        history = self.history + events
        omitted = self.history_omitted
        extra = len(history) - 1 - HISTORY_KEEP
        if extra > 0:
            history = history[:1] + history[1 + extra:]
            omitted += extra
        return evolve(self, history=history, history_omitted=omitted)


def history_json(message: QueuedMessage) -> list[dict[str, Any]]:
    """The full history as ``relayd queue show --json`` gives it: arrival
    (made from the envelope), then the recorded events in time order."""
    e = message.envelope
    received: dict[str, Any] = {
        "time": e.arrival, "event": "received", "from": e.sender, "size": e.size,
        "nrcpt": len(e.recipients), "listener": e.listener, "client": e.client_address,
        "helo": e.helo, "user": e.user,
    }
    return [received, *(event.to_json() for event in message.history)]


def message_details(message: QueuedMessage) -> dict[str, Any]:
    """What ``relayd queue show`` adds to a listing entry: the rest of the
    envelope and the history (the same online and offline)."""
    e = message.envelope
    return {
        "all_recipients": list(e.recipients), "done": list(message.done), "helo": e.helo,
        "recipient_routes": {r: e.route_of(r) for r in e.recipients},
        "orig_to": {r: o for r, o in zip(e.recipients, e.originals) if o},
        "client_address": e.client_address, "user": e.user, "held": message.held,
        "history": history_json(message), "history_omitted": message.history_omitted,
    }


SENT, DEFERRED, BOUNCED = "sent", "deferred", "bounced"


@frozen
class RecipientResult:
    """What the destination said about one recipient.

    :param status: ``sent``, ``deferred`` (try again later) or ``bounced``
        (permanent: the sender gets a DSN).
    :param reply: the reply as the mail log and the DSN show it, e.g.
        ``550 5.1.1 <x@y>: Recipient address rejected``.
    :param route: the route that carried it, when a message went out over
        several (``relayd.fanout``); ``""``: the attempt's route.
    :param relay: where that route's transaction went; ``""``: the
        attempt's relay.
    """

    recipient: str
    status: str
    reply: str
    route: str = ""
    relay: str = ""


@frozen
class DeliveryResult:
    """The outcome of one delivery attempt that reached the destination.

    :param relay: where it went, as the mail log shows it (``smtp.x[1.2.3.4]:587``
        or ``maildir:/var/lib/relayd/outbox``).
    :param recipients: per-recipient outcomes; empty means every recipient
        was ``sent`` with ``reply``.
    :param conn_use: the how-manieth transaction on a reused connection this
        was (Postfix's ``conn_use=``, logged when above 1); 0 when the
        courier has no connections.
    """

    relay: str
    reply: str = field(default="250 2.0.0 Ok")
    recipients: tuple[RecipientResult, ...] = ()
    conn_use: int = 0
