"""The seams between relayd's parts.

The SMTP server only knows ``ISubmissionSink``; couriers only know
``ICourier``'s contract; the queue manager drives an ``ISpool`` and an
``IRetryPolicy``.  Each has an in-memory twin in ``relayd.testing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Sequence

    from twisted.internet.defer import Deferred

    from relayd.content import Content
    from relayd.envelope import (
        DeliveryResult,
        DSNRequest,
        Envelope,
        QueuedMessage,
        RecipientResult,
    )


class ISession(Interface):
    """What the SMTP server knows about a client when a transaction starts."""

    listener = Attribute("The listener (tenant) name.")
    client_address = Attribute("The client's IP address, as text.")
    helo = Attribute("The HELO/EHLO argument, or ''.")
    user = Attribute("The authenticated user name, or None.")
    route = Attribute("The route name that delivers this listener's mail.")
    protocol = Attribute("SMTP, ESMTP or ESMTPS, for the Received header.")


class IMessageReceiver(Interface):
    """One message on its way into the spool.

    The server feeds it content with dot-stuffing removed and line endings
    normalised to CRLF, then calls ``finish`` or ``abort`` exactly once.
    """

    def write(data: bytes) -> Deferred[None] | None:
        """Take the next piece of message content.

        :return: None, or a Deferred when the spool is behind (the disk has
            not caught up with what was written): the server stops reading
            the client until it fires, so a big message from a fast client
            never piles up in memory.
        """

    def finish() -> Deferred[str]:
        """Make the message durable.

        :return: a Deferred firing with the queue id once the message is on
            disk (fsynced, renamed, directory fsynced), or failing with
            ``SMTPReply`` (e.g. 554 5.4.6 loop, 452 4.3.1 queue full) or any
            other exception (answered 451 4.3.0).
        """

    def abort() -> None:
        """Forget the message: the client went away or the data was refused."""


class ISubmissionSink(Interface):
    """Where the SMTP server hands accepted mail (Postfix: cleanup)."""

    def check_capacity() -> None:
        """Raise ``QueueFull`` when the spool should refuse mail at MAIL."""

    def route_recipient(session: ISession, sender: str, recipient: str) -> object:
        """Where ``recipient`` goes (``relayd.routing.Resolution``): alias
        expansion and the ``[[routing]]`` decision per resulting recipient.

        Asked at RCPT, before the relay check: an address the alias table
        lists is accepted from any client (``.alias``).

        :raise SMTPReply: 550 5.1.1 for an alias-domain address the table
            does not list; 451 4.3.0 for an alias loop.
        """

    def open_message(
        session: ISession,
        sender: str,
        recipients: tuple[str, ...],
        smtputf8: bool,
        body: str | None,
        dsn: DSNRequest | None = None,
        routed: tuple[object, ...] | None = None,
    ) -> IMessageReceiver:
        """Start a message for an accepted envelope; ``dsn``: the client's
        RFC 3461 parameters, kept in the envelope.

        :param routed: the ``route_recipient`` answers given at RCPT, one
            per recipient (None: the sink asks itself now).
        """


class ISpool(Interface):
    """The durable queue on disk (Postfix: the queue directories)."""

    def open_message(envelope: Envelope) -> ISpoolWriter:
        """Start writing a new message; returns an ``ISpoolWriter`` whose
        ``queue_id`` is already assigned (it goes into ``Received:``)."""

    def recover() -> Deferred[list[QueuedMessage]]:
        """Clean up after a crash and list what is queued.

        :return: Deferred firing with a list of ``QueuedMessage``.
        """

    def load(queue_id: str) -> Deferred[Content]:
        """Deferred firing with the message content (CRLF lines) as a
        ``relayd.content.Content``: bytes when small, else a region of the
        queue file, so that loading a 50 MB message reads none of it yet."""

    def defer(message: QueuedMessage) -> Deferred[None]:
        """Persist a ``QueuedMessage``'s new retry state; Deferred."""

    def remove(queue_id: str, final: QueuedMessage | None = None) -> Deferred[None]:
        """Forget a message that has been delivered or bounced; Deferred.
        ``final``, its last state and history, is kept for :meth:`finished`."""

    def finished(queue_id: str) -> Deferred[QueuedMessage | None]:
        """The ``final`` state a message was removed with, while the spool
        still keeps it (``relayd queue show`` of a delivered message), else
        None."""

    def free_space() -> int:
        """Bytes free for the spool now (cleanup refuses mail below
        ``min_free_disk``); raises ``OSError`` when that cannot be known."""


class IQueueArrival(Interface):
    """Where a message goes once it is durable in the spool (Postfix: the
    cleanup -> qmgr notification): the queue manager, which schedules it."""

    def queued(message: QueuedMessage, content: Content | bytes | None) -> None:
        """``message`` is on disk; ``content`` is what the writer kept of it
        (small messages), or None to read it back when its turn comes."""

    def __len__() -> int:
        """How many messages are queued (cleanup's ``max_messages`` check)."""


class IBouncer(Interface):
    """Writes delivery status notifications (RFC 3464) into the queue."""

    def bounce(
        message: QueuedMessage,
        failed: Sequence[RecipientResult],
        content: Content | None,
        remote: str | None,
    ) -> Deferred[str]:
        """Queue a DSN to ``message``'s (non-null) sender for ``failed``.

        :param content: the original's content if at hand, else None (read
            from the spool).
        :param remote: the relay that refused (``smtp.x[1.2.3.4]:587``), for
            the DSN's Remote-MTA, or None.
        :return: Deferred firing with the DSN's queue id once it is durable.
        """


class ISpoolWriter(Interface):
    """A message being written into the spool."""

    def write(data: bytes) -> Deferred[None] | None:
        """Append content; a Deferred instead of None says the writer is
        behind (content not yet on disk): write no more until it fires."""

    queue_id = Attribute("The message's queue id, fixed when writing starts.")

    def patch(offset: int, data: bytes) -> None:
        """Overwrite content written earlier (``offset`` from its start),
        before ``commit``: cleanup reserves the DKIM-Signature headers at the
        top and fills them in once the body hash is known, so a signed
        message streams to disk like any other."""

    def commit() -> Deferred[QueuedMessage]:
        """Deferred firing with the ``QueuedMessage`` once it is durable."""

    def abort() -> None:
        """Discard what was written."""


class ICourier(Interface):
    """Delivers a message somewhere (Postfix: the smtp or local delivery agent)."""

    def deliver(
        queue_id: str, envelope: Envelope, content: Content | bytes
    ) -> Deferred[DeliveryResult]:
        """Try to deliver.

        :param content: a ``relayd.content.Content``: read it in chunks (or
            its header section only), never whole unless ``in_memory``, so a
            big message costs no more memory than a small one.  Plain bytes
            are accepted too (tests, callers that have them anyway).
        :return: Deferred firing with a ``DeliveryResult``, or failing with
            ``TransientDeliveryError`` (keep it queued) or
            ``PermanentDeliveryError`` (bounce it).
        """

    def stop() -> object:
        """Release what the courier keeps open between deliveries (cached
        connections), at shutdown or when a reload retires it; deliveries in
        flight finish first.  May return a Deferred that fires when done.

        Part of the interface so that nothing above a courier needs to know
        which kind it holds.
        """


class IRetryPolicy(Interface):
    """When to try a deferred message again, and when to give up."""

    def next_delay(attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""

    def expired(arrival: float, now: float) -> bool:
        """True when a message that arrived at ``arrival`` is too old to keep."""


class IAuthBackend(Interface):
    """Checks SMTP AUTH credentials (htpasswd file, LDAP directory).

    Blocking work (bcrypt, LDAP round trips) happens off the reactor thread
    in the backend's own thread pool.
    """

    def authenticate(username: str, password: str) -> Deferred[str]:
        """Deferred firing with the user's canonical name.

        Fails with ``twisted.cred.error.UnauthorizedLogin`` for wrong
        credentials (answered 535 5.7.8), with any other exception when the
        backend itself is in trouble (answered 454 4.7.0, never 535).
        """

    def sender_patterns(username: str) -> Deferred[tuple[str, ...] | None]:
        """Deferred firing with the envelope-sender patterns this user may
        use (``*@app1.example.org``), or None when the user is not limited."""

    def start() -> None:
        """Start thread pools / watchers; called when the relay starts."""

    def stop() -> object:
        """Stop them; may return a Deferred."""
