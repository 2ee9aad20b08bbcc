"""A message's delivery over an open session: MAIL, RCPT, DATA and the
body, in as many transactions as ``max_recipients_per_transaction`` and the
server's 452s ask, with PIPELINING when offered.

Per-recipient answers (RCPT and the reply to the final dot) become
``RecipientResult``\\ s; anything wrong with the session before a recipient
has an answer is a :class:`~relayd.courier.smarthost.protocol.SessionError`
(the courier defers the whole message).  Used by every courier that speaks
SMTP (smarthost routes; direct MX delivery).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred

from relayd.content import Content
from relayd.courier.smarthost.dotstuff import dot_stuff, stuffed_chunks
from relayd.courier.smarthost.protocol import (
    COMMAND_TIMEOUT,
    DATA_INIT_TIMEOUT,
    Reply,
    SessionError,
    SMTPClientProtocol,
)
from relayd.envelope import (
    BOUNCED,
    DEFERRED,
    SENT,
    DeliveryResult,
    Envelope,
    RecipientResult,
    xtext,
)

#: How much of the start of a message is searched for the header section
#: (cleanup's limit): the SMTPUTF8 check never reads a big body for it.
HEADER_LIMIT = 256 * 1024

_CRLF = b"\r\n"


@attrs.frozen
class Options:
    """How a route runs its transactions."""

    soft_bounce: bool = False
    #: 0: all recipients in one transaction (the server's 452s still split).
    max_recipients_per_transaction: int | None = None
    #: Called before each further transaction on the connection (the
    #: route's ``max_rate``); the first one is the caller's business.
    pace: Callable[[], Deferred[None]] | None = attrs.field(default=None, eq=False)


class Message:
    """What one delivery needs to know about the message, computed once.

    For content in memory the stuffed body is made once and reused by every
    transaction; a spooled body is scanned here (8-bit or not, for
    ``BODY=8BITMIME``: a chunk at a time, unless the client declared it) and
    streamed again for each transaction.
    """

    def __init__(self, envelope: Envelope, content: Content) -> None:
        self.content = content
        self.size = content.size
        self.eight_bit = envelope.body == "8BITMIME" or not content.isascii()
        addresses = (envelope.sender, *envelope.recipients)
        self.utf8_envelope = not all(a.isascii() for a in addresses)
        # Like Postfix: non-ASCII headers need SMTPUTF8 only in a message that
        # was submitted with SMTPUTF8; legacy raw 8-bit headers go as before.
        self.utf8_header = False
        if envelope.smtputf8 and self.eight_bit:
            head = content.head(HEADER_LIMIT)
            end = head.find(b"\r\n\r\n")
            self.utf8_header = not (head if end < 0 else head[:end]).isascii()
        self.smtputf8 = envelope.smtputf8 or self.utf8_envelope
        #: RFC 3461 parameters, passed on to a smarthost that offers DSN.
        self.dsn = envelope.dsn
        self._stuffed: tuple[bytes, bytes] | None = None
        if content.data is not None:
            self._stuffed = dot_stuff(content.data)

    @property
    def needs_smtputf8(self) -> bool:
        return self.utf8_envelope or self.utf8_header

    def send(self, conn: SMTPClientProtocol) -> Deferred[Reply]:
        """Send the body after a 354; fires with the reply to the final dot."""
        if self._stuffed is not None:
            return conn.send_body(*self._stuffed)
        return conn.send_stream(stuffed_chunks(self.content))


def _address(address: str, utf8: bool) -> bytes:
    if any(c in address for c in "\r\n<>") or any(ord(c) < 0x20 for c in address):
        raise ValueError(address)
    return address.encode("utf-8" if utf8 else "ascii")


def status_of(reply: Reply, soft_bounce: bool) -> str:
    """What a reply means for a recipient."""
    if 200 <= reply.code < 300:
        return SENT
    if reply.code >= 500 and not soft_bounce:
        return BOUNCED
    return DEFERRED


async def run(
    conn: SMTPClientProtocol,
    envelope: Envelope,
    message: Message,
    options: Options,
) -> DeliveryResult:
    """Deliver ``message`` to every recipient of ``envelope`` over ``conn``
    (an open session), in as many transactions as the recipient limits ask.

    :return: every recipient's outcome; :class:`SessionError` only when no
        recipient has an answer yet (else the rest is deferred in the result,
        so nobody gets the message twice).
    """
    soft = options.soft_bounce
    recipients = envelope.recipients
    results: dict[int, RecipientResult] = {}

    def everyone(reply: str, status: str) -> DeliveryResult:
        for i, rcpt in enumerate(recipients):
            results.setdefault(i, RecipientResult(rcpt, status, reply))
        return _result(conn, recipients, results, reply)

    hard = DEFERRED if soft else BOUNCED
    ext = conn.extensions
    limit = size_limit(ext)
    if limit and message.size > limit:
        return everyone("552 5.3.4 Message size exceeds fixed limit of smarthost", hard)
    if message.needs_smtputf8 and "SMTPUTF8" not in ext:
        code = "5.6.7" if message.utf8_envelope else "5.6.9"
        return everyone(
            f"550 {code} SMTPUTF8 is required, but was not offered by host {conn.name}", hard
        )
    utf8 = message.smtputf8 and "SMTPUTF8" in ext
    params = b""
    if "SIZE" in ext:
        params += b" SIZE=%d" % message.size
    if message.eight_bit and "8BITMIME" in ext:
        params += b" BODY=8BITMIME"
    if utf8:
        params += b" SMTPUTF8"
    if "DSN" in ext:
        if message.dsn.ret:
            params += b" RET=" + message.dsn.ret.encode("ascii")
        if message.dsn.envid is not None:
            params += b" ENVID=" + xtext(message.dsn.envid).encode("ascii")
    try:
        mail = b"MAIL FROM:<" + _address(envelope.sender, utf8) + b">" + params + _CRLF
    except (ValueError, UnicodeError):
        return everyone("501 5.1.7 Bad sender address syntax", hard)

    pending = list(range(len(recipients)))
    batch_size = options.max_recipients_per_transaction or len(pending) or 1
    need_rset = False
    final: Reply | None = None
    first = True
    while pending:
        batch, pending = pending[:batch_size], pending[batch_size:]
        try:
            if not first and options.pace is not None:
                await options.pace()
            if need_rset:
                reply = await conn.command(b"RSET\r\n", COMMAND_TIMEOUT, "sending RSET")
                if not 200 <= reply.code < 300:
                    raise SessionError(
                        f"host {conn.name} said: {reply} (in reply to RSET command)"
                    )
            retry, need_rset, data_reply = await _transaction(
                conn, message, mail, recipients, batch, utf8, results, soft
            )
        except SessionError as e:
            if not results:
                raise
            # Some recipients have their answer already: report them,
            # the rest waits (a Transient error would send them twice).
            return everyone(str(e), DEFERRED)
        first = False
        if data_reply is not None:
            final = data_reply
        pending = retry + pending
    return _result(conn, recipients, results, str(final) if final else None)

async def _transaction(
    conn: SMTPClientProtocol,
    message: Message,
    mail: bytes,
    recipients: tuple[str, ...],
    batch: list[int],
    utf8: bool,
    results: dict[int, RecipientResult],
    soft: bool,
) -> tuple[list[int], bool, Reply | None]:
    """One MAIL transaction for ``batch``.

    :return: ``(retry, need_rset, final_reply)``: recipients refused with
        452 to send in a further transaction; whether the transaction
        was left open; the reply to the final dot, if it got that far.
    """
    rcpts: list[tuple[int, bytes]] = []
    for i in batch:
        try:
            rcpts.append((i, b"RCPT TO:<" + _address(recipients[i], utf8) + b">"
                          + _rcpt_dsn(conn, message, recipients[i]) + b"\r\n"))
        except (ValueError, UnicodeError):
            results[i] = RecipientResult(
                recipients[i],
                DEFERRED if soft else BOUNCED,
                "501 5.1.3 Bad recipient address syntax",
            )
    if not rcpts:
        return [], False, None
    data_reply: Reply | None
    if "PIPELINING" in conn.extensions:
        replies = await conn.exchange(
            mail + b"".join(line for _, line in rcpts) + b"DATA\r\n",
            [COMMAND_TIMEOUT] * (1 + len(rcpts)) + [DATA_INIT_TIMEOUT],
            "sending MAIL/RCPT/DATA",
        )
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
    else:
        mail_reply = await conn.command(mail, COMMAND_TIMEOUT, "sending MAIL FROM")
        rcpt_replies = []
        data_reply = None
        if 200 <= mail_reply.code < 300:
            for _, line in rcpts:
                rcpt_replies.append(
                    await conn.command(line, COMMAND_TIMEOUT, "sending RCPT TO")
                )
    if not 200 <= mail_reply.code < 300:
        if data_reply is not None and data_reply.code == 354:
            await conn.send_body(b"", b".\r\n")
        raise SessionError(
            f"host {conn.name} said: {mail_reply} (in reply to MAIL FROM command)"
        )
    accepted: list[int] = []
    too_many: list[int] = []
    for (i, _), reply in zip(rcpts, rcpt_replies):
        if 200 <= reply.code < 300:
            accepted.append(i)
        elif reply.code == 452:
            too_many.append(i)
        else:
            results[i] = RecipientResult(recipients[i], status_of(reply, soft), str(reply))
    if too_many and not accepted:
        # No progress: a further transaction would get the same answer.
        for i, reply in zip(batch, rcpt_replies):
            if i in too_many:
                results[i] = RecipientResult(recipients[i], DEFERRED, str(reply))
        too_many = []
    if not accepted:
        if data_reply is not None and data_reply.code == 354:
            await conn.send_body(b"", b".\r\n")
        return too_many, True, None
    if data_reply is None:
        data_reply = await conn.command(b"DATA\r\n", DATA_INIT_TIMEOUT, "sending DATA")
    if data_reply.code != 354:
        for i in accepted:
            results[i] = RecipientResult(
                recipients[i], status_of(data_reply, soft), str(data_reply)
            )
        return too_many, True, None
    final = await message.send(conn)
    for i in accepted:
        results[i] = RecipientResult(recipients[i], status_of(final, soft), str(final))
    return too_many, False, final

def _result(
    conn: SMTPClientProtocol,
    recipients: tuple[str, ...],
    results: dict[int, RecipientResult],
    reply: str | None,
) -> DeliveryResult:
    ordered = tuple(results[i] for i in range(len(recipients)))
    if reply is None:
        reply = ordered[0].reply if ordered else "250 2.0.0 Ok"
    return DeliveryResult(relay=conn.relay, reply=reply, recipients=ordered,
                          conn_use=conn.uses)


def size_limit(ext: dict[str, str]) -> int:
    value = ext.get("SIZE", "")
    if value.isascii() and value.isdigit():
        return int(value)
    return 0



def _rcpt_dsn(conn: SMTPClientProtocol, message: Message, recipient: str) -> bytes:
    """NOTIFY/ORCPT for a smarthost that offers DSN (RFC 3461 §4.1, §4.2)."""
    if "DSN" not in conn.extensions:
        return b""
    params = message.dsn.of(recipient)
    out = b""
    if params.notify:
        out += b" NOTIFY=" + ",".join(params.notify).encode("ascii")
    if params.orcpt:
        kind, _, address = params.orcpt.partition(";")
        out += b" ORCPT=" + f"{kind};{xtext(address)}".encode("ascii")
    return out
