"""Table tests of relayd.routing, relayd.aliases and relayd.rewrite: pure
values in, decisions out (no sockets, no processes)."""

from __future__ import annotations

import ipaddress

import pytest

from relayd.aliases import AliasFileError, parse_aliases
from relayd.config.routing import RoutingRule
from relayd.errors import SMTPReply
from relayd.rewrite import SenderRewriter, parse_map
from relayd.routing import DISCARD, LISTENER, REJECT, ROUTE, Context, Router

CTX = Context(sender="app@example.org", listener="mta", route="default", user=None,
              client="192.0.2.10")

RULES = (
    RoutingRule(recipient_domains=("example.gov.uk", ".example.gov.uk"), route="exchange"),
    RoutingRule(recipient_domains=("bücher.example",), route="google"),
    RoutingRule(senders=("*@digital.example.org",), route="google"),
    RoutingRule(recipient_domains=("blocked.example",), reject="550 5.7.1 Not relayed"),
    RoutingRule(recipients=("noreply@*",), discard=True),
    RoutingRule(users=("app1",), route="app1"),
    RoutingRule(clients=(ipaddress.ip_network("10.1.0.0/16"),), listeners=("mta",),
                route="printers"),
    RoutingRule(senders=("<>",), recipient_domains=(".bounces.example",), route="bounces"),
)
ROUTER = Router.of(RULES)


@pytest.mark.parametrize(("rcpt", "ctx", "want"), [
    ("a@example.gov.uk", CTX, (ROUTE, "exchange", "routing[0]")),
    ("a@EXAMPLE.Gov.UK.", CTX, (ROUTE, "exchange", "routing[0]")),
    ("a@x.y.example.gov.uk", CTX, (ROUTE, "exchange", "routing[0]")),
    # not a subdomain: only a suffix of the text
    ("a@notexample.gov.uk", CTX, (ROUTE, "default", LISTENER)),
    # IDNA: the U-label, its A-label, upper case, all one rule
    ("a@bücher.example", CTX, (ROUTE, "google", "routing[1]")),
    ("a@xn--bcher-kva.example", CTX, (ROUTE, "google", "routing[1]")),
    ("a@BÜCHER.example", CTX, (ROUTE, "google", "routing[1]")),
    ("a@sub.bücher.example", CTX, (ROUTE, "default", LISTENER)),
    ("a@other.example", Context("x@Digital.Example.ORG", "mta", "default"),
     (ROUTE, "google", "routing[2]")),
    ("a@blocked.example", CTX, (REJECT, "", "routing[3]")),
    ("NoReply@anything.example", CTX, (DISCARD, "", "routing[4]")),
    ("a@other.example", Context("s@x.example", "mta", "default", user="app1"),
     (ROUTE, "app1", "routing[5]")),
    ("a@other.example", Context("s@x.example", "mta", "default", user="app2"),
     (ROUTE, "default", LISTENER)),
    ("a@other.example", Context("s@x.example", "mta", "default", client="10.1.2.3"),
     (ROUTE, "printers", "routing[6]")),
    ("a@other.example", Context("s@x.example", "mta", "default", client="::ffff:10.1.2.3"),
     (ROUTE, "printers", "routing[6]")),
    ("a@other.example", Context("s@x.example", "sub", "sub-route", client="10.1.2.3"),
     (ROUTE, "sub-route", LISTENER)),
    ("a@x.bounces.example", Context("", "mta", "default"), (ROUTE, "bounces", "routing[7]")),
    ("a@x.bounces.example", CTX, (ROUTE, "default", LISTENER)),
    ("a@bounces.example", Context("", "mta", "default"), (ROUTE, "default", LISTENER)),
])
def test_first_matching_rule_decides(rcpt: str, ctx: Context, want: tuple[str, str, str]) -> None:
    d = ROUTER.decide(rcpt, ctx)
    assert (d.action, d.route, d.rule) == want
    assert d.recipient == rcpt


def test_reject_reply_and_star() -> None:
    d = ROUTER.decide("a@blocked.example", CTX)
    reply = d.smtp_reply
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.1", "Not relayed")
    anything = Router.of((RoutingRule(recipient_domains=("*",), route="x"),))
    assert anything.decide("a@b.c", CTX).route == "x"
    assert anything.decide("postmaster", CTX).route == "default"  # no domain: no domain rule


ALIASES = """\
# the central relay's second instance owns these
uss@uss.example.org: alice@example.net, bob
postmaster: root@example.org            # any alias domain
@catch.example.org: desk@example.org
@old.example.org: @new.example.org
team@uss.example.org: uss@uss.example.org, carol@example.net,
    dave@example.net
self@uss.example.org: self@uss.example.org, copy@example.net
loop1@uss.example.org: loop2@uss.example.org
loop2@uss.example.org: loop1@uss.example.org
ghost@uss.example.org: nobody@uss.example.org, real@example.net
bob@uss.example.org: bob@example.com
"""
DOMAINS = ("uss.example.org", "catch.example.org", "old.example.org", "bücher.example")


def table():
    return parse_aliases(ALIASES, "/etc/relayd/aliases", DOMAINS)


@pytest.mark.parametrize(("rcpt", "want"), [
    ("uss@uss.example.org", ("alice@example.net", "bob@example.com")),
    ("USS@USS.Example.org", ("alice@example.net", "bob@example.com")),
    ("uss+tag@uss.example.org", ("alice@example.net", "bob@example.com")),
    ("postmaster@catch.example.org", ("root@example.org",)),
    ("postmaster@bücher.example", ("root@example.org",)),
    ("postmaster@xn--bcher-kva.example", ("root@example.org",)),
    ("anyone@catch.example.org", ("desk@example.org",)),
    ("jo@old.example.org", ("jo@new.example.org",)),
    # recursion and dedupe: uss -> alice, bob -> bob@example.com
    ("team@uss.example.org", ("alice@example.net", "bob@example.com", "carol@example.net",
                              "dave@example.net")),
    ("self@uss.example.org", ("self@uss.example.org", "copy@example.net")),
    ("ghost@uss.example.org", ("real@example.net",)),
    ("stranger@uss.example.org", ()),
    # a domain rename never takes a local part that routes on
    ("x%evil.example@old.example.org", ()),
])
def test_alias_expansion(rcpt: str, want: tuple[str, ...]) -> None:
    assert table().expand(rcpt) == want


def test_alias_loop_and_depth() -> None:
    from relayd.aliases import AliasError

    with pytest.raises(AliasError, match="loop"):
        table().expand("loop1@uss.example.org")
    chain = "\n".join(f"a{i}@uss.example.org: a{i + 1}@uss.example.org" for i in range(12))
    deep = parse_aliases(chain + "\na12@uss.example.org: end@example.net\n", "f", DOMAINS)
    with pytest.raises(AliasError, match="deeper than 10"):
        deep.expand("a0@uss.example.org")
    assert deep.expand("a3@uss.example.org") == ("end@example.net",)


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("uss@uss.example.org alice@x\n", 1, "expected"),
    ("# c\n\nx@other.example: a@b\n", 3, "not one of [aliases] domains"),
    ("a@uss.example.org: b@x\nA@USS.example.org: c@x\n", 2, "already defined on line 1"),
    ("a@uss.example.org: |/bin/sh\n", 1, "no pipes"),
    ("a@uss.example.org:\n", 1, "no target"),
    ("  b@x\n", 1, "continuation"),
    ("a@uss.example.org: <b@x>\n", 1, "not an address"),
])
def test_alias_file_errors_name_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(AliasFileError) as e:
        parse_aliases(text, "/etc/relayd/aliases", DOMAINS)
    assert e.value.line == line
    assert str(e.value).startswith(f"/etc/relayd/aliases:{line}: ")
    assert reason in str(e.value)


def test_resolve_alias_then_rules() -> None:
    router = Router.of((RoutingRule(recipient_domains=("example.net",), route="exchange"),
                        RoutingRule(recipients=("bob@example.com",), reject="550 5.7.1 no"),),
                       table())
    r = router.resolve("uss@uss.example.org", CTX)
    assert r.alias
    assert [(d.recipient, d.action, d.route, d.original) for d in r.decisions] == [
        ("alice@example.net", ROUTE, "exchange", "uss@uss.example.org"),
        ("bob@example.com", REJECT, "", "uss@uss.example.org"),
    ]
    assert r.rejected is None  # partly rejected: accepted for the rest
    assert [d.recipient for d in r.deliveries] == ["alice@example.net"]
    only_bob = router.resolve("bob@uss.example.org", CTX)
    assert only_bob.rejected is not None and only_bob.rejected.reply == "550 5.7.1 no"
    with pytest.raises(SMTPReply) as e:
        router.resolve("stranger@uss.example.org", CTX)
    assert (e.value.code, e.value.enhanced) == (550, "5.1.1")
    with pytest.raises(SMTPReply) as e:
        router.resolve("loop1@uss.example.org", CTX)
    assert (e.value.code, e.value.enhanced) == (451, "4.3.0")
    plain = router.resolve("someone@example.net", CTX)
    assert not plain.alias and plain.decisions[0].original == ""


def test_sender_rewriting() -> None:
    rw = SenderRewriter.of([("@app.internal", "@example.org"),
                            ("root@host1.example.org", "alerts@example.org"),
                            ("@bücher.example", "@books.example")], headers=True)
    assert rw.rewrite("jo@app.internal") == "jo@example.org"
    assert rw.rewrite("Jo@APP.internal") == "Jo@example.org"
    assert rw.rewrite("root@host1.example.org") == "alerts@example.org"
    assert rw.rewrite("root+cron@host1.example.org") == "alerts@example.org"
    assert rw.rewrite("x@xn--bcher-kva.example") == "x@books.example"
    assert rw.rewrite("") == ""
    assert rw.rewrite("other@example.org") == "other@example.org"
    head = (b"Subject: jo@app.internal stays\r\n"
            b"From: \"Jo (jo@app.internal)\" <jo@app.internal>\r\n"
            b"Reply-To: a@app.internal,\r\n b@app.internal\r\n"
            b"To: c@app.internal\r\n")
    assert rw.rewrite_headers(head) == (
        b"Subject: jo@app.internal stays\r\n"
        b"From: \"Jo (jo@example.org)\" <jo@example.org>\r\n"
        b"Reply-To: a@example.org,\r\n b@example.org\r\n"
        b"To: c@app.internal\r\n")
    assert SenderRewriter.of([("@a.example", "@b.example")]).rewrite_headers(head) == head


def test_sender_map_file() -> None:
    assert parse_map("# c\n@a.example @b.example\nx@a.example  y@c.example\n", "f") == {
        "@a.example": "@b.example", "x@a.example": "y@c.example"}
    with pytest.raises(ValueError, match="^f:2: "):
        parse_map("@a.example @b.example\nbad\n", "f")
