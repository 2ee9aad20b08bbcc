"""The RCPT side of routing, over a StringTransport: alias domains accepted
from any client only for listed addresses, rule rejects answered at RCPT
and logged, the routing answers handed to the sink at DATA."""

from __future__ import annotations

import pytest

from relayd.aliases import parse_aliases
from relayd.config.routing import RoutingRule
from relayd.routing import Router
from relayd.testing import Conversation, LogCapture

ALIASES = parse_aliases(
    "uss@uss.example.org: person@example.net\n@catch.example.org: @example.com\n",
    "aliases", ("uss.example.org", "catch.example.org"))
ROUTER = Router.of((
    RoutingRule(recipient_domains=("blocked.example",), reject="550 5.7.1 Not relayed here"),
    RoutingRule(recipient_domains=("example.net",), route="exchange"),
), ALIASES)


def outsider() -> Conversation:
    c = Conversation(client_ip="192.0.2.7")  # not in mynetworks, not authenticated
    c.sink.router = ROUTER
    c.send("EHLO client.example\r\n")
    assert c.send("MAIL FROM:<someone@sender.example>\r\n") == ["250 2.1.0 Ok"]
    return c


def test_alias_domain_from_outside_mynetworks() -> None:
    c = outsider()
    assert c.send("RCPT TO:<uss@uss.example.org>\r\n") == ["250 2.1.5 Ok"]
    assert c.send("RCPT TO:<other@uss.example.org>\r\n") == [
        "550 5.1.1 <other@uss.example.org>: Recipient address rejected: "
        "User unknown in virtual alias table"]
    # Anything else is still not relayed, whatever the rules say.
    assert c.send("RCPT TO:<x@example.net>\r\n") == ["550 5.7.1 <x@example.net>: Relay access "
                                                    "denied"]
    assert c.send("RCPT TO:<x@blocked.example>\r\n")[0].startswith("550 5.7.1 <x@blocked."
                                                                   "example>: Relay access")
    # A domain rename reaches only the renamed domain, never a routed-on local part.
    assert c.send("RCPT TO:<jo@catch.example.org>\r\n") == ["250 2.1.5 Ok"]
    assert c.send("RCPT TO:<x%evil.example@catch.example.org>\r\n")[0].startswith("550 5.1.1")
    assert c.send('RCPT TO:<"x@evil.example"@catch.example.org>\r\n')[0].startswith("550 5.1.1")
    assert c.send("DATA\r\n")[0].startswith("354")
    assert c.send("Subject: hi\r\n\r\nbody\r\n.\r\n")[0].startswith("250")
    message = c.sink.messages[0]
    assert message.recipients == ("uss@uss.example.org", "jo@catch.example.org")
    routed = c.sink.routed
    assert routed is not None
    assert [[(d.recipient, d.route) for d in r.decisions] for r in routed] == [  # type: ignore[attr-defined]
        [("person@example.net", "exchange")], [("jo@example.com", "default")]]


@pytest.mark.parametrize("client", ["127.0.0.1"])
def test_reject_rule_answered_at_rcpt_and_logged(client: str) -> None:
    c = Conversation(client_ip=client)
    c.sink.router = ROUTER
    c.send("EHLO client.example\r\n")
    c.send("MAIL FROM:<app@sender.example>\r\n")
    with LogCapture() as logs:
        assert c.send("RCPT TO:<x@Blocked.Example>\r\n") == ["550 5.7.1 Not relayed here"]
    assert any("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 Not relayed here" in line
               and "to=<x@Blocked.Example>" in line for line in logs.lines)
    assert c.send("RCPT TO:<x@example.net>\r\n") == ["250 2.1.5 Ok"]
