"""One SMTP mail transaction: MAIL and RCPT parsed, then the content on its way to the sink.

Apart from the session state machine so that the envelope grammar (RFC 5321
§4.1.2 paths, RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8) and the
intake rules every message obeys (size limit, refusal after the data has
been read, back-pressure from the spool) are written once, whichever
command carries the content.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from relayd.envelope import DSNRequest, RecipientDSN
from relayd.errors import SMTPReply
from relayd.interfaces import IMessageReceiver, ISession, ISubmissionSink
from relayd.smtpd.address import AddressSyntaxError, parse_params, parse_path
from relayd.smtpd.chunking import ChunkReader
from relayd.smtpd.dsnparams import parse_envid, parse_ret, rcpt_dsn

__all__ = ["MailFrom", "Session", "Transaction", "parse_mail", "parse_rcpt"]


@implementer(ISession)
@define
class Session:
    """What is known about the client, handed to the sink with each message."""

    listener: str
    client_address: str
    route: str
    helo: str = ""
    user: str | None = None
    protocol: str = "SMTP"


@define(frozen=True)
class MailFrom:
    """What MAIL FROM said."""

    sender: str
    smtputf8: bool = False
    body: str | None = None
    #: RFC 3461: RET (FULL/HDRS) and ENVID (xtext decoded), None if not given.
    ret: str | None = None
    envid: str | None = None


def _decode(arg: bytes) -> str | None:
    try:
        return arg.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_mail(arg: bytes, max_size: int) -> MailFrom:
    """``FROM:<path> [params]``, or the SMTPReply refusing it."""
    text = _decode(arg)
    if text is None or text[:5].upper() != "FROM:":
        raise SMTPReply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    try:
        sender, params_text = parse_path(text[5:])
        params = parse_params(params_text)
    except AddressSyntaxError:
        raise SMTPReply(501, "5.1.7", "Bad sender address syntax") from None
    smtputf8 = False
    body = ret = envid = None
    seen: set[str] = set()
    for key, value in params:
        if key in seen:
            raise SMTPReply(501, "5.5.4", f"Duplicate {key} parameter")
        seen.add(key)
        if key == "RET":
            ret = parse_ret(value)
        elif key == "ENVID":
            envid = parse_envid(value)
        elif key == "SIZE" and value and value.isascii() and value.isdigit() and len(value) < 20:
            if int(value) > max_size:
                raise SMTPReply(552, "5.3.4", "Message size exceeds fixed limit")
        elif key == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif key == "SMTPUTF8" and value is None:
            smtputf8 = True
        elif key in ("SIZE", "BODY", "SMTPUTF8"):
            raise SMTPReply(501, "5.5.4", f"Bad {key} parameter syntax")
        else:
            raise SMTPReply(555, "5.5.4", f"Unsupported option: {key}")
    if not smtputf8 and not sender.isascii():
        raise SMTPReply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
    return MailFrom(sender, smtputf8, body, ret, envid)


def parse_rcpt(arg: bytes, mail: MailFrom) -> tuple[str, RecipientDSN]:
    """``TO:<path> [params]`` -> the recipient and its DSN parameters, or the
    SMTPReply refusing it."""
    text = _decode(arg)
    if text is None or text[:3].upper() != "TO:":
        raise SMTPReply(501, "5.5.4", "Syntax: RCPT TO:<address>")
    try:
        recipient, params_text = parse_path(text[3:])
        params = parse_params(params_text)
    except AddressSyntaxError:
        raise SMTPReply(501, "5.1.3", "Bad recipient address syntax") from None
    if not recipient:
        raise SMTPReply(501, "5.1.3", "Bad recipient address syntax")
    dsn, other = rcpt_dsn(params)
    for key in other:
        raise SMTPReply(555, "5.5.4", f"Unsupported option: {key}")
    if not mail.smtputf8 and not recipient.isascii():
        raise SMTPReply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
    return recipient, dsn


@define
class Transaction:
    """The envelope so far and, once content flows, the sink's receiver.

    A refused message (too big, bare newline on a ``reject`` listener) is
    read to its end and only then answered: ``error`` holds the answer and
    the receiver is already gone, so nothing of it reaches the spool.
    """

    mail: MailFrom
    recipients: list[str] = field(factory=list)
    #: Recipients that gave NOTIFY or ORCPT, with them.
    dsn: list[tuple[str, RecipientDSN]] = field(factory=list)
    #: recipient -> the sink's routing answer at RCPT (handed back at DATA).
    routed: dict[str, object] = field(factory=dict)
    receiver: IMessageReceiver | None = None
    error: SMTPReply | None = None
    size: int = 0
    #: Set by the first BDAT: the message's content comes in chunks (and
    #: DATA is refused, RFC 3030 §2).
    chunks: ChunkReader | None = None

    def add_recipient(self, recipient: str, dsn: RecipientDSN | None = None,
                      routed: object = None) -> None:
        # A duplicate is accepted and delivered once (Postfix's cleanup
        # drops duplicates too), with the DSN parameters it came with first.
        if recipient not in self.recipients:
            self.recipients.append(recipient)
            if dsn is not None and dsn != RecipientDSN():
                self.dsn.append((recipient, dsn))
            if routed is not None:
                self.routed[recipient] = routed

    def open(self, sink: ISubmissionSink, session: ISession) -> None:
        """Content is about to flow (DATA answered 354, or the first BDAT)."""
        m = self.mail
        request = DSNRequest(m.ret, m.envid, tuple(self.dsn))
        routed = tuple(self.routed[r] for r in self.recipients if r in self.routed)
        self.receiver = sink.open_message(
            session, m.sender, tuple(self.recipients), m.smtputf8, m.body,
            dsn=request if request else None,
            routed=routed if len(routed) == len(self.recipients) else None,
        )

    def write(self, content: bytes, max_size: int) -> Deferred[None] | None:
        """Pass on content, unless the message is already refused; a
        Deferred when the spool is behind (stop reading until it fires)."""
        if not content or self.error is not None:
            return None
        self.size += len(content)
        if self.size > max_size:
            self.refuse(SMTPReply(552, "5.3.4", "Error: message file too big"))
            return None
        assert self.receiver is not None
        return self.receiver.write(content)

    def refuse(self, reply: SMTPReply) -> None:
        """The message will be answered ``reply`` once its content ends."""
        if self.error is None:
            self.error = reply
        self.abort()

    def finish(self) -> Deferred[str]:
        """Make the message durable: the queue id, or a failure."""
        receiver, self.receiver = self.receiver, None
        assert receiver is not None
        return receiver.finish()

    def abort(self) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.abort()
