"""Who may relay what: the listener's restrictions as pure functions.

relayd has no local domains, so the relay decision is about the *client*:
trusted network or authenticated, or nobody gets a recipient accepted
(Postfix's ``permit_mynetworks, permit_sasl_authenticated,
reject_unauth_destination`` with empty ``relay_domains``).  The ``allowed_*``
lists are checked only after that and can only narrow it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from attrs import frozen

from relayd.address import address_key, address_pattern, routes_onward
from relayd.config import ListenerConfig
from relayd.errors import SMTPReply
from relayd.interfaces import ISession, ISubmissionSink
from relayd.ipaddr import IPNetwork as Network
from relayd.ipaddr import in_networks
from relayd.routing import Resolution
from relayd.smtpd.address import split_address

_pattern = address_pattern


def _canonical(address: str) -> tuple[str, str, str | None]:
    """Lower-cased ``local@domain`` for matching, plus its parts."""
    local, domain = split_address(address)
    return address_key(address), local, domain


@frozen
class ListenerPolicy:
    """The relay restrictions of one listener (tenant)."""

    mynetworks: tuple[Network, ...]
    allowed_senders: tuple[re.Pattern[str], ...]
    allowed_recipients: tuple[re.Pattern[str], ...]

    @classmethod
    def from_config(cls, listener: ListenerConfig) -> ListenerPolicy:
        return cls(
            mynetworks=tuple(listener.mynetworks),
            allowed_senders=tuple(_pattern(p) for p in listener.allowed_senders),
            allowed_recipients=tuple(_pattern(p) for p in listener.allowed_recipients),
        )

    def trusted_client(self, host: str) -> bool:
        """Is this client address in ``mynetworks``?  IPv4-mapped IPv6
        addresses count as their IPv4 address."""
        return in_networks(host, self.mynetworks)

    def check_sender(self, sender: str, permitted: bool) -> None:
        """Raise ``SMTPReply`` if a permitted client may not use this sender.

        Clients that may not relay at all are refused at RCPT instead, as
        Postfix does, so their MAIL is not judged here.
        """
        if not sender or not permitted or not self.allowed_senders:
            return
        key, _, _ = _canonical(sender)
        if not _matches(self.allowed_senders, key):
            raise SMTPReply(550, "5.7.1", f"<{sender}>: Sender address rejected: not allowed")

    def check_recipient(self, recipient: str, permitted: bool) -> None:
        """Raise ``SMTPReply`` unless this recipient may be relayed to."""
        if not permitted:
            raise SMTPReply(550, "5.7.1", f"<{recipient}>: Relay access denied")
        if not self.allowed_recipients:
            return
        key, local, domain = _canonical(recipient)
        if domain is None or routes_onward(local) or not _matches(
            self.allowed_recipients, key
        ):
            raise SMTPReply(550, "5.7.1", f"<{recipient}>: Recipient address rejected: not allowed")


def _matches(patterns: Iterable[re.Pattern[str]], key: str) -> bool:
    return any(p.match(key) for p in patterns)


@frozen
class UserSenders:
    """The envelope senders an authenticated user may use (the backend's
    ``sender_patterns``), checked in addition to the listener's
    ``allowed_senders`` (Postfix's ``reject_sender_login_mismatch``, with
    the login map coming from the auth backend)."""

    user: str
    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def from_patterns(cls, user: str, patterns: Iterable[str] | None) -> UserSenders | None:
        """None when the backend does not limit this user."""
        if patterns is None:
            return None
        if isinstance(patterns, str):
            patterns = (patterns,)
        return cls(user=user, patterns=tuple(_pattern(p) for p in patterns if p.strip()))

    def check(self, sender: str) -> None:
        """Raise ``SMTPReply`` 553 unless the user owns ``sender``; the null
        sender is always allowed."""
        if not sender:
            return
        key, _, _ = _canonical(sender)
        if not _matches(self.patterns, key):
            raise SMTPReply(
                553, "5.7.1",
                f"<{sender}>: Sender address rejected: not owned by user {self.user}",
            )


def accept_recipient(sink: ISubmissionSink, policy: ListenerPolicy, session: ISession | None,
                     sender: str, recipient: str, permitted: bool) -> Resolution:
    """The RCPT decision: alias table, relay permission, ``[[routing]]`` rejects.

    An address the alias table lists needs no relay permission (design §1:
    alias domains take mail from any client, for listed addresses only);
    everything else must pass the listener's relay check first, so a client
    that may not relay learns nothing about the rules.

    :return: the sink's routing answer, handed back to it at DATA.
    :raise SMTPReply: the refusal (550 5.1.1 unknown alias, 550 5.7.1 relay
        access denied, a rule's reject, ...).
    """
    assert session is not None
    routed = sink.route_recipient(session, sender, recipient)
    assert isinstance(routed, Resolution)
    if not routed.alias:
        policy.check_recipient(recipient, permitted)
    rejected = routed.rejected
    if rejected is not None:
        raise rejected.smtp_reply
    return routed
