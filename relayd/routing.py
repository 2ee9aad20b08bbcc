"""Where each recipient goes: ``[[routing]]`` rules over alias expansion.

Postfix spreads this over ``virtual_alias_maps``, ``transport_maps`` and
``sender_dependent_relayhost_maps``; here it is one pure function of frozen
values, so the daemon, ``relayd address`` and the table tests all ask the
same :class:`Router` and get the same answer.

Order of work for one RCPT (design §1b): alias expansion first (1 -> n,
:mod:`relayd.aliases`), then, per resulting recipient, the rules in order;
the first rule whose every key matches decides (route, reject or discard);
no match means the listener's route.  Within a key any entry may match,
across keys all must.  Domains compare as IDNA A-labels in lower case
(:mod:`relayd.address`), so ``bücher.example`` and ``xn--bcher-kva.example``
hit the same rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from attrs import field, frozen

from relayd.address import address_key, address_pattern, lenient_domain_key, split_address
from relayd.aliases import AliasError, AliasTable
from relayd.config.routing import RoutingRule, parse_reply
from relayd.errors import SMTPReply
from relayd.ipaddr import IPNetwork, in_networks

ROUTE, REJECT, DISCARD = "route", "reject", "discard"
#: ``rule=`` when no rule matched and the listener's route applies.
LISTENER = "listener"


@frozen
class Context:
    """What the rules may look at besides the recipient: known at RCPT."""

    sender: str
    listener: str
    route: str
    user: str | None = None
    client: str = ""


@frozen
class Decision:
    """What happens to one recipient.

    :param recipient: the address mail goes to (an alias target, or the
        RCPT itself).
    :param original: the RCPT the client gave when aliases changed it
        (the mail log's ``orig_to=``), else ``""``.
    :param rule: ``routing[N]`` (the rule's index in the file) or ``listener``.
    """

    recipient: str
    action: str
    route: str = ""
    reply: str = ""
    rule: str = LISTENER
    original: str = ""

    @property
    def smtp_reply(self) -> SMTPReply:
        """The reject reply as ``SMTPReply`` (only for ``action == REJECT``)."""
        code, enhanced, text = parse_reply(self.reply)
        return SMTPReply(code, enhanced, text)


@frozen
class Resolution:
    """The answer for one RCPT.

    :param alias: the RCPT is in an alias domain and the table lists it:
        accepted from any client (design §1: no relay permission needed).
    :param decisions: one per resulting recipient, duplicates removed.
    """

    recipient: str
    alias: bool
    decisions: tuple[Decision, ...]

    @property
    def deliveries(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action == ROUTE)

    @property
    def rejected(self) -> Decision | None:
        """The reject that answers the RCPT: when nothing is left to deliver
        or discard, the first reject (a partly rejected alias expansion is
        accepted for the rest; the rejected targets are logged)."""
        if any(d.action != REJECT for d in self.decisions):
            return None
        return next(iter(self.decisions), None)


@frozen
class DomainSet:
    """``recipient_domains``/``sender_domains``: exact, ``.sub`` (any
    subdomain, at any depth, not the domain itself: Postfix transport(5)'s
    ``.domain``) and ``*``."""

    exact: frozenset[str]
    parents: tuple[str, ...]
    anything: bool

    @classmethod
    def of(cls, entries: Iterable[str]) -> DomainSet:
        exact, parents, anything = set(), [], False
        for entry in entries:
            if entry == "*":
                anything = True
            elif entry.startswith("."):
                parents.append("." + lenient_domain_key(entry[1:]))
            else:
                exact.add(lenient_domain_key(entry))
        return cls(frozenset(exact), tuple(parents), anything)

    def matches(self, domain: str | None) -> bool:
        if domain is None:
            return False
        return self.anything or domain in self.exact or domain.endswith(self.parents)


def _patterns(entries: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(address_pattern(e) for e in entries if e != "<>")


@frozen
class CompiledRule:
    """A ``[[routing]]`` entry ready to match: patterns compiled, domains
    keyed.  ``None`` for a key means the rule does not look at it."""

    label: str
    action: str
    route: str = ""
    reply: str = ""
    recipients: tuple[re.Pattern[str], ...] | None = None
    recipient_domains: DomainSet | None = None
    senders: tuple[re.Pattern[str], ...] | None = None
    null_sender: bool = False
    sender_domains: DomainSet | None = None
    listeners: frozenset[str] | None = None
    users: frozenset[str] | None = None
    clients: tuple[IPNetwork, ...] | None = None

    @classmethod
    def of(cls, index: int, rule: RoutingRule) -> CompiledRule:
        if rule.reject is not None:
            action, route, reply = REJECT, "", rule.reject
        elif rule.discard:
            action, route, reply = DISCARD, "", ""
        else:
            action, route, reply = ROUTE, rule.route or "", ""
        return cls(
            label=f"routing[{index}]", action=action, route=route, reply=reply,
            recipients=None if rule.recipients is None else _patterns(rule.recipients),
            recipient_domains=(None if rule.recipient_domains is None
                               else DomainSet.of(rule.recipient_domains)),
            senders=None if rule.senders is None else _patterns(rule.senders),
            null_sender=rule.senders is not None and "<>" in rule.senders,
            sender_domains=(None if rule.sender_domains is None
                            else DomainSet.of(rule.sender_domains)),
            listeners=None if rule.listeners is None else frozenset(rule.listeners),
            users=None if rule.users is None else frozenset(rule.users),
            clients=rule.clients,
        )

    def matches(self, rcpt: _Keyed, sender: _Keyed, ctx: Context) -> bool:
        if self.recipient_domains is not None and not self.recipient_domains.matches(rcpt.domain):
            return False
        if self.recipients is not None and not any(p.match(rcpt.key) for p in self.recipients):
            return False
        if self.senders is not None:
            if ctx.sender == "":
                if not self.null_sender:
                    return False
            elif not any(p.match(sender.key) for p in self.senders):
                return False
        if self.sender_domains is not None and not self.sender_domains.matches(sender.domain):
            return False
        if self.listeners is not None and ctx.listener not in self.listeners:
            return False
        if self.users is not None and (ctx.user is None or (
                ctx.user not in self.users and "*" not in self.users)):
            return False
        return self.clients is None or in_networks(ctx.client, self.clients)


@frozen
class _Keyed:
    """An address's lookup key and domain key, computed once per decision."""

    key: str
    domain: str | None

    @classmethod
    def of(cls, address: str) -> _Keyed:
        if not address:
            return cls("", None)
        _, domain = split_address(address)
        return cls(address_key(address),
                   None if domain is None else lenient_domain_key(domain))


@frozen
class Router:
    """Rules plus the alias table: the whole routing decision, pure.

    Cheap per message on purpose (issue 15: the bench must not notice three
    rules): patterns are compiled once per config, keys once per address.
    """

    rules: tuple[CompiledRule, ...] = ()
    aliases: AliasTable = field(factory=AliasTable)

    @classmethod
    def of(cls, rules: Sequence[RoutingRule], aliases: AliasTable | None = None) -> Router:
        return cls(tuple(CompiledRule.of(i, r) for i, r in enumerate(rules)),
                   aliases if aliases is not None else AliasTable())

    def with_aliases(self, aliases: AliasTable) -> Router:
        return Router(self.rules, aliases)

    def decide(self, recipient: str, ctx: Context, original: str = "") -> Decision:
        """The first matching rule's verdict for one (expanded) recipient."""
        if self.rules:
            rcpt = _Keyed.of(recipient)
            sender = _Keyed.of(ctx.sender)
            for rule in self.rules:
                if rule.matches(rcpt, sender, ctx):
                    return Decision(recipient, rule.action, rule.route, rule.reply, rule.label,
                                    original)
        return Decision(recipient, ROUTE, ctx.route, "", LISTENER, original)

    def resolve(self, recipient: str, ctx: Context) -> Resolution:
        """Expand aliases, then decide each resulting recipient.

        :raise SMTPReply: ``550 5.1.1`` for an address in an alias domain
            that the table does not list; ``451 4.3.0`` for an alias loop or
            an expansion too deep or too wide (the operator's to fix: the
            client keeps the message and tries again).
        """
        if not self.aliases.covers(recipient):
            return Resolution(recipient, False, (self.decide(recipient, ctx),))
        try:
            targets = self.aliases.expand(recipient)
        except AliasError as e:
            raise SMTPReply(451, "4.3.0", f"<{recipient}>: {e}") from None
        if not targets:
            raise SMTPReply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: "
                                          "User unknown in virtual alias table")
        return Resolution(recipient, True, tuple(
            self.decide(t, ctx, original=recipient if t != recipient else "") for t in targets))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def explain(address: str, resolution: Resolution | SMTPReply) -> list[str]:
    """``relayd address`` lines (design §1b), one per resulting recipient::

        ADDRESS -> RECIPIENT route=NAME rule=routing[N]     (rule=listener: no rule matched)
        ADDRESS reject="550 5.7.1 text" rule=routing[N]
        ADDRESS discard rule=routing[N]

    An alias target that a rule rejects or discards keeps its ``-> TARGET``;
    an address the alias table refuses is ``reject=... rule=aliases``.
    """
    if isinstance(resolution, SMTPReply):
        reply = f"{resolution.code} {resolution.enhanced} {resolution.text}"
        return [f"{address} reject={_quoted(reply)} rule=aliases"]
    lines = []
    for d in resolution.decisions:
        head = address if d.recipient == address else f"{address} -> {d.recipient}"
        if d.action == REJECT:
            lines.append(f"{head} reject={_quoted(d.reply)} rule={d.rule}")
        elif d.action == DISCARD:
            lines.append(f"{head} discard rule={d.rule}")
        else:
            lines.append(f"{address} -> {d.recipient} route={d.route} rule={d.rule}")
    return lines
