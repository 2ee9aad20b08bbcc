"""Between the SMTP server and the spool (Postfix: cleanup).

Adds the trace and identity headers a relay owes (``Received:``, and
``Message-ID:``/``Date:`` when the client left them out, as printers and
scripts do and as Gmail then refuses), counts hops to stop mail loops,
keeps every line within RFC 5322's 998 octets, DKIM-signs (``relayd.dkim``:
the signatures are reserved at the top and filled in before the commit),
and streams the result into the spool.  One ``CleanupMessage`` per message;
the server sees only ``ISubmissionSink``/``IMessageReceiver``, and cleanup
sees only ``ISpool`` (files, free space) and ``IQueueArrival`` (the queue
manager, told about each durable message).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayd.content import IN_MEMORY_LIMIT, Content, patch_chunks
from relayd.dkim.signer import MessageSigning, Signer, SigningFailed
from relayd.envelope import DSNRequest, Envelope, QueuedMessage
from relayd.errors import QueueFull, SMTPReply
from relayd.interfaces import (
    IMessageReceiver,
    IQueueArrival,
    ISession,
    ISpool,
    ISpoolWriter,
    ISubmissionSink,
)
from relayd.rewrite import SenderRewriter
from relayd.routing import DISCARD, Context, Decision, Resolution, Router
from relayd.tables import RoutingTables, plan

maillog = Logger(namespace="relayd.mail")

#: RFC 5322 §2.1.1: at most 998 octets per line, CRLF excluded.
MAX_LINE = 998
#: How much of the start of a message is searched for the header section
#: (Postfix header_size_limit is 100 KB; anything beyond is body).
HEADER_LIMIT = 256 * 1024

#: Messages up to this size are handed to the queue manager in memory as
#: well as written to the spool, so the first delivery attempt need not
#: read them back (a thread hop and a file read per message, which matters
#: at 1-10 KB).  Bigger ones are read back from the spool in chunks: memory
#: then grows with the number of sessions, not with message size.
KEEP_LIMIT = IN_MEMORY_LIMIT

_HEADER_SECTION = re.compile(
    rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*"
)
#: The same lines when resuming after a matched prefix, where the next line
#: may continue the last field.
_HEADER_LINES = re.compile(rb"(?:(?:[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t])[^\r\n]*\r\n)*")
_COUNTED = re.compile(rb"^(received|message-id|date)[ \t]*:", re.I | re.M)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_NO_RULES = Router()


def split_long_lines(data: bytes, column: int, header: bool) -> tuple[bytes, int]:
    """Break lines longer than 998 octets (Postfix's smtp_line_length_limit).

    Header lines are folded (CRLF SPACE, so the header continues); body lines
    are split with CRLF.  ``column`` is the length of the unfinished line
    that ``data`` continues; the new one is returned.
    """
    last = data.rfind(b"\n")
    if last < 0:
        if column + len(data) <= MAX_LINE:
            return data, column + len(data)
    else:
        first = data.find(b"\n")
        if (
            column + first <= MAX_LINE + 1
            and len(data) - last - 1 <= MAX_LINE
            and (len(data) <= MAX_LINE or max(map(len, data.split(b"\n"))) <= MAX_LINE + 1)
        ):
            return data, len(data) - last - 1
    out = []
    for piece in data.splitlines(keepends=True):
        body = piece.rstrip(b"\r\n")
        end = piece[len(body) :]
        while column + len(body) > MAX_LINE:
            room = MAX_LINE - column
            out.append(body[:room])
            out.append(b"\r\n " if header else b"\r\n")
            body = body[room:]
            column = 1 if header else 0
        out.append(body + end)
        column = 0 if end else column + len(body)
    return b"".join(out), column


@implementer(ISubmissionSink)
class Cleanup:
    """Turns accepted SMTP transactions into spool files.

    :param arrival: told about each message once it is durable, with its
        content when that is small enough to keep (saves the queue manager
        reading it back); its length is how many messages are queued now.
    """

    def __init__(
        self,
        spool: ISpool,
        hostname: str,
        clock: IReactorTime,
        arrival: IQueueArrival,
        max_hops: int = 50,
        max_messages: int = 100_000,
        min_free_disk: int = 0,
        signer: Signer | None = None,
        tables: RoutingTables | None = None,
    ) -> None:
        #: [[routing]], the alias file and the sender map (relayd.tables);
        #: replaced on reload.  None: every recipient takes the listener's route.
        self.tables = tables
        self.spool = spool
        self.hostname = hostname
        self.clock = clock
        self.arrival = arrival
        self.max_hops = max_hops
        self.max_messages = max_messages
        self.min_free_disk = min_free_disk
        #: The ``[[dkim]]`` keys in force (replaced on SIGHUP).
        self.signer = signer or Signer([])
        self._disk_checked = -1.0
        self._disk_ok = True

    def check_capacity(self) -> None:
        """452 4.3.1 at MAIL when the queue is full or the disk nearly so."""
        if len(self.arrival) >= self.max_messages:
            raise QueueFull("Insufficient system storage (queue full)")
        now = self.clock.seconds()
        if self.min_free_disk and now - self._disk_checked >= 1.0:
            self._disk_checked = now
            try:
                self._disk_ok = self.spool.free_space() >= self.min_free_disk
            except OSError:
                self._disk_ok = False
        if not self._disk_ok:
            raise QueueFull()

    def route_recipient(self, session: ISession, sender: str, recipient: str) -> Resolution:
        ctx = Context(sender=sender, listener=session.listener, route=session.route,
                      user=session.user, client=session.client_address)
        if self.tables is None:
            return _NO_RULES.resolve(recipient, ctx)
        return self.tables.resolve(recipient, ctx)

    def open_message(
        self,
        session: ISession,
        sender: str,
        recipients: tuple[str, ...],
        smtputf8: bool,
        body: str | None,
        dsn: DSNRequest | None = None,
        routed: tuple[object, ...] | None = None,
    ) -> CleanupMessage:
        # Postfix's cleanup order: aliases and routing (decided at RCPT),
        # then sender rewriting (envelope here, headers in _write_head).
        resolutions = [r for r in routed or () if isinstance(r, Resolution)]
        if len(resolutions) != len(recipients):
            resolutions = [self.route_recipient(session, sender, r) for r in recipients]
        planned = plan(resolutions, session.route)
        rewriter = self.tables.rewriter if self.tables is not None else SenderRewriter()
        envelope = Envelope(
            sender=rewriter.rewrite(sender),
            recipients=planned.recipients,
            routes=planned.routes,
            originals=planned.originals,
            route=session.route,
            arrival=self.clock.seconds(),
            listener=session.listener,
            client_address=session.client_address,
            helo=session.helo,
            user=session.user,
            smtputf8=smtputf8,
            body=body,
            dsn=dsn or DSNRequest(),
        )
        return CleanupMessage(self, session, self.spool.open_message(envelope), envelope,
                              rewriter, planned.dropped, sender)


@implementer(IMessageReceiver)
class CleanupMessage:
    """One message: header section buffered until complete, then streamed."""

    def __init__(
        self, cleanup: Cleanup, session: ISession, writer: ISpoolWriter, envelope: Envelope,
        rewriter: SenderRewriter | None = None, dropped: tuple[Decision, ...] = (),
        original_sender: str | None = None,
    ) -> None:
        self._cleanup = cleanup
        self._session = session
        self._writer = writer
        self._envelope = envelope
        self._rewriter = rewriter or SenderRewriter()
        self._dropped = dropped
        self._original_sender = envelope.sender if original_sender is None else original_sender
        self._head: bytearray | None = bytearray()
        # Where the header lines matched so far end: each write scans only
        # what is new, so a header sent a byte at a time costs linear time.
        self._matched = 0
        self._column = 0
        self._keep: list[bytes] | None = []
        self._hops = 0
        self._size = 0
        #: What the spool writer said to the last write: None, or a Deferred
        #: while it is behind (handed on to the SMTP server, which stops reading).
        self._behind: Deferred[None] | None = None
        #: DKIM signing of this message (fed everything after its
        #: placeholder), and where the placeholder is.
        self._dkim: MessageSigning | None = None
        self._dkim_at = 0

    def write(self, data: bytes) -> Deferred[None] | None:
        self._behind = None
        if self._head is not None:
            self._head += data
            if len(self._head) < HEADER_LIMIT and (b"\n" not in data or not self._header_complete()):
                return None
            self._write_head(bytes(self._head))
            return self._behind
        self._emit(data, header=False)
        return self._behind

    def _header_complete(self) -> bool:
        """Has the header section visibly ended, so that it can be judged?

        It has once a complete line follows the header lines: the blank
        line, or a line that is not a header.
        """
        assert self._head is not None
        pattern = _HEADER_SECTION if self._matched == 0 else _HEADER_LINES
        self._matched = pattern.match(self._head, self._matched, HEADER_LIMIT).end()  # type: ignore[union-attr]
        return self._head.find(b"\n", self._matched) >= 0

    def _write_head(self, data: bytes) -> None:
        """Judge the header section, then write our headers and it."""
        self._head = None
        end = _HEADER_SECTION.match(data, 0, HEADER_LIMIT).end()  # type: ignore[union-attr]
        section, rest = data[:end], data[end:]
        # The order of the header work matters: (1) sender rewriting
        # ([rewrite] headers = true) changes From:/Sender:/Reply-To:; (2)
        # anything that signs the message (DKIM) must see the headers as
        # they leave, so it comes after this line, never before.
        section = self._rewriter.rewrite_headers(section)
        found = [m.lower() for m in _COUNTED.findall(section)]
        self._hops = found.count(b"received")
        added = [self._received()]
        now = datetime.fromtimestamp(self._envelope.arrival, UTC)
        if b"message-id" not in found:
            added.append(
                f"Message-ID: <{now:%Y%m%d%H%M%S}.{self._writer.queue_id}"
                f"@{self._cleanup.hostname}>\r\n".encode()
            )
        if b"date" not in found:
            added.append(f"Date: {format_datetime(now)}\r\n".encode())
        # Content that does not begin with headers gets a blank line after
        # ours, and headers run straight into a non-header line get one
        # before it, as Postfix does: otherwise the first body line would be
        # read as (broken) header.
        if not section and not rest.startswith(b"\r\n"):
            added.append(b"\r\n")
        head = [b"".join(added)]
        if section:
            head.append(section)
            if rest and not rest.startswith(b"\r\n"):
                head.append(b"\r\n")
        # The header section is final here: fix-ups above, and any rewriting
        # of headers (sender rewriting) belongs before this line, so that
        # the signatures cover what is spooled and delivered.
        self._start_signing(b"".join(head))
        for part in head:
            self._emit(part, header=True)
        if rest:
            self._emit(rest, header=False)

    def _start_signing(self, header_section: bytes) -> None:
        """Reserve the DKIM-Signature headers at the top, if the From:
        domain has keys (``relayd.dkim.signer``: their size is known now,
        their content once the body has streamed through)."""
        e = self._envelope
        self._dkim = self._cleanup.signer.plan(header_section, e.arrival, e.listener)
        if self._dkim is not None:
            signing, self._dkim = self._dkim, None
            self._dkim_at = self._size
            self._emit(signing.placeholder, header=True)
            self._dkim = signing

    def _received(self) -> bytes:
        s = self._session
        e = self._envelope
        protocol = ("UTF8SMTP" if e.smtputf8 and s.protocol == "ESMTP" else s.protocol) + (
            "A" if s.user else ""
        )
        helo = _CONTROL.sub("?", s.helo) or "unknown"
        for_clause = f"\r\n\tfor <{e.recipients[0]}>" if len(e.recipients) == 1 else ""
        when = format_datetime(datetime.fromtimestamp(e.arrival, UTC))
        return (
            f"Received: from {helo} ([{s.client_address}])\r\n"
            f"\tby {self._cleanup.hostname} (relayd) with {protocol} id {self._writer.queue_id}"
            f"{for_clause}; {when}\r\n"
        ).encode("utf-8", "replace")

    def _emit(self, data: bytes, header: bool) -> None:
        data, self._column = split_long_lines(data, self._column, header)
        if self._dkim is not None:
            self._dkim.update(data)
        self._behind = self._writer.write(data) or self._behind
        self._size += len(data)
        if self._keep is not None:
            self._keep.append(data)
            if self._size > KEEP_LIMIT:
                self._keep = None

    def finish(self) -> Deferred[str]:
        if self._head is not None:
            self._write_head(bytes(self._head))
        if self._hops > self._cleanup.max_hops:
            self._writer.abort()
            return fail(SMTPReply(554, "5.4.6", "Too many hops"))
        if self._column:
            # The last line must end in CRLF (RFC 5321 §4.1.1.4).
            self._emit(b"\r\n", header=False)
        keep = self._keep
        if not self._envelope.recipients:
            # Every recipient was discarded: accepted (250), logged, and
            # nothing to keep.
            self._writer.abort()
            self._log_dropped(self._writer.queue_id)
            maillog.info("{queue_id}: discarded: no recipient left to deliver",
                         queue_id=self._writer.queue_id)
            return succeed(self._writer.queue_id)
        if self._dkim is not None:
            try:
                signatures = self._dkim.signatures()
            except SigningFailed as e:
                # Nothing goes out unsigned and nothing is lost: the client
                # keeps the message and tries again.
                maillog.error("{queue_id}: DKIM signing failed: {error}",
                              queue_id=self._writer.queue_id, error=str(e))
                self._writer.abort()
                return fail(SMTPReply(451, "4.3.0", "Error: DKIM signing failed"))
            self._writer.patch(self._dkim_at, signatures)
            if keep is not None:
                patch_chunks(keep, self._dkim_at, signatures)
            maillog.info("{queue_id}: DKIM-Signature added ({keys})",
                         queue_id=self._writer.queue_id,
                         keys=", ".join(f"d={k.domain} s={k.selector}" for k in self._dkim.keys))
        d = self._writer.commit()

        def queued(message: QueuedMessage) -> str:
            e = message.envelope
            maillog.info(
                "{queue_id}: from=<{sender}> size={size} nrcpt={nrcpt} listener={listener} "
                "client=[{client}]" + (" user={user}" if e.user else ""),
                queue_id=message.queue_id, sender=e.sender, size=e.size,
                nrcpt=len(e.recipients), listener=e.listener, client=e.client_address,
                user=e.user,
            )
            if e.sender != self._original_sender:
                maillog.info("{queue_id}: sender rewritten: orig_from=<{orig}> from=<{sender}>",
                             queue_id=message.queue_id, orig=self._original_sender,
                             sender=e.sender)
            self._log_dropped(message.queue_id)
            self._cleanup.arrival.queued(
                message, Content.of(b"".join(keep)) if keep is not None else None)
            return message.queue_id

        return d.addCallback(queued)

    def _log_dropped(self, queue_id: str) -> None:
        for d in self._dropped:
            orig = f" orig_to=<{d.original}>" if d.original else ""
            status = "discarded" if d.action == DISCARD else f"rejected ({d.reply})"
            maillog.info("{queue_id}: to=<{rcpt}>{orig} route=none rule={rule} status={status}",
                         queue_id=queue_id, rcpt=d.recipient, orig=orig, rule=d.rule,
                         status=status)

    def abort(self) -> None:
        self._writer.abort()
