"""The exceptions that cross module boundaries.

Each carries what its catcher needs to answer a client or to decide between
retrying and bouncing, so no caller has to parse a message string.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A config file that cannot be used: names the file, the key and why.

    ``str()`` is the exact line printed before exiting 1:
    ``FILE: key: reason``.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(source, key, reason)
        self.source = source
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}"


class SMTPReply(Exception):
    """A rejection that becomes an SMTP reply to the client as it stands.

    Raised by policy and submission code; the server protocol turns it into
    ``code enhanced text`` and carries on with the session.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class QueueFull(SMTPReply):
    """The spool refuses new mail for now (too many messages, too little disk).

    Always a 4xx: a full queue is a local, temporary condition (Postfix
    answers 452 4.3.1 Insufficient system storage).
    """

    def __init__(self, text: str = "Insufficient system storage") -> None:
        super().__init__(452, "4.3.1", text)


class DeliveryError(Exception):
    """A delivery attempt failed; the courier says whether trying again helps.

    :param reply: the remote (or local) reply text, for logs and bounces.
    """

    permanent = False

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class TransientDeliveryError(DeliveryError):
    """4xx, network, TLS or local I/O trouble: the message stays queued."""


class PermanentDeliveryError(DeliveryError):
    """5xx: retrying cannot help; the message bounces."""

    permanent = True
