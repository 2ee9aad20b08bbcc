"""Queue a non-delivery notification (Postfix: bounce(8) handing its notice
to cleanup).

``relayd.bounce`` builds the DSN's bytes; this writes them into the spool
as a new message from ``<>`` to the original sender, through the original's
route, and hands it to the queue manager like any arrival
(``IQueueArrival``).  The same class serves the daemon and the offline
``relayd queue bounce`` (whose arrival is a no-op: the daemon finds the
DSN in the spool when it starts), so both report the same host name and
From: address.

Why not through ``ISubmissionSink`` (cleanup) like client mail: cleanup
judges a client's message (queue-full and free-space refusals, hop count,
Received:/Message-ID:/Date: added, long lines folded).  A DSN is ours and
already complete, and it must never be refused for a full queue: it is the
notice we owe for mail we answered 250 to.  What it shares with client mail
is the rest of the path: ``ISpool.open_message`` -> commit (durable) ->
``IQueueArrival.queued``.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from relayd.bounce import build_dsn
from relayd.content import Content
from relayd.envelope import Envelope, QueuedMessage, QueueId, RecipientResult
from relayd.interfaces import IBouncer, IQueueArrival, ISpool


@implementer(IQueueArrival)
class NoArrival:
    """Offline: nothing to tell; the daemon recovers the DSN at its start."""

    def queued(self, message: QueuedMessage, content: object) -> None:
        pass

    def __len__(self) -> int:
        return 0


@implementer(IBouncer)
class DSNQueue:
    """Writes DSNs into the spool and hands them on.

    :param hostname: the Reporting-MTA and EHLO name (``resolve_hostname``).
    :param bounce_from: the From: of DSNs; default ``MAILER-DAEMON@hostname``.
    """

    def __init__(self, spool: ISpool, clock: IReactorTime, hostname: str,
                 bounce_from: str | None = None, arrival: IQueueArrival | None = None) -> None:
        self._spool = spool
        self._clock = clock
        self.hostname = hostname
        self.bounce_from = bounce_from or f"MAILER-DAEMON@{hostname}"
        self.arrival: IQueueArrival = arrival if arrival is not None else NoArrival()

    def bounce(self, message: QueuedMessage, failed: Sequence[RecipientResult],
               content: Content | None, remote: str | None) -> Deferred[QueueId]:
        loaded = succeed(content) if content is not None else self._spool.load(message.queue_id)
        now = self._clock.seconds()

        def write(data: Content) -> Deferred[QueueId]:
            dsn = build_dsn(
                queue_id=message.queue_id, envelope=message.envelope, failed=list(failed),
                content=data, reporting_mta=self.hostname, bounce_from=self.bounce_from,
                now=now, remote_mta=_host_of(remote),
                # RFC 3461 §4.3: RET=FULL asks for the whole message; without
                # RET (or RET=HDRS) the headers, Postfix's choice.
                return_content="full" if message.envelope.dsn.ret == "FULL" else "headers",
            )
            envelope = Envelope(sender="", recipients=(message.envelope.sender,),
                                route=message.envelope.route, arrival=now, listener="bounce",
                                helo=self.hostname, smtputf8=message.envelope.smtputf8)
            writer = self._spool.open_message(envelope)
            writer.write(dsn)

            def queued(bounce: QueuedMessage) -> QueueId:
                self.arrival.queued(bounce, dsn)
                return bounce.queue_id

            return writer.commit().addCallback(queued)  # type: ignore[no-any-return]

        return loaded.addCallback(write)


def _host_of(relay: str | None) -> str | None:
    """``smtp.x[1.2.3.4]:587`` -> ``smtp.x``: the Remote-MTA of a DSN."""
    if not relay or relay.startswith("maildir:"):
        return None
    return relay.split("[", 1)[0].rsplit(":", 1)[0] or None
