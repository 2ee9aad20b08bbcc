"""Envelope address syntax (smtpd/address.py) and the relay policy (smtpd/policy.py).

Pure functions: no protocol, no clock.  The relay decision depends on where
the parser says the domain is, so the edge cases of both are tested together.
"""

from __future__ import annotations

import ipaddress

import pytest

from relayd.errors import SMTPReply
from relayd.smtpd.address import AddressSyntaxError, parse_params, parse_path, split_address
from relayd.smtpd.policy import ListenerPolicy
from relayd.testing import listener_config


def policy(**overrides) -> ListenerPolicy:
    return ListenerPolicy.from_config(listener_config(**overrides))


def refusal(call, *args) -> str:
    with pytest.raises(SMTPReply) as info:
        call(*args)
    return str(info.value)


# -- parse_path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<a@example.org>", ("a@example.org", "")),
        ("  <a@example.org>  SIZE=10 BODY=8BITMIME ", ("a@example.org", "SIZE=10 BODY=8BITMIME")),
        ("<>", ("", "")),
        ("<> SIZE=0", ("", "SIZE=0")),
        ("<postmaster>", ("postmaster", "")),
        ("<u@[1.2.3.4]>", ("u@[1.2.3.4]", "")),
        ("<u@[IPv6:2001:db8::1]>", ("u@[IPv6:2001:db8::1]", "")),
        ("<jörg@exämple.org>", ("jörg@exämple.org", "")),
    ],
)
def test_parse_path_plain(text, expected):
    """Bracketed paths, the null path and parameters after them."""
    assert parse_path(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ('<"a>b"@example.org>', '"a>b"@example.org'),
        ('<"a b"@example.org> SIZE=1', '"a b"@example.org'),
        ('<"a > b"@example.org>', '"a > b"@example.org'),
        ('<"a\\"b"@example.org>', '"a\\"b"@example.org'),
        ('<"a\\">b"@example.org>', '"a\\">b"@example.org'),
        ('<"a\\\\"@example.org>', '"a\\\\"@example.org'),
        ('<"a@b"@example.org>', '"a@b"@example.org'),
    ],
)
def test_parse_path_quoted_local_parts(text, expected):
    """A '>' or space inside quotes (escaped quotes included) does not end the path."""
    address, params = parse_path(text)
    assert address == expected
    assert params == ("SIZE=1" if text.endswith("SIZE=1") else "")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<@a.example:u@example.org>", "u@example.org"),
        ("<@a.example,@b.example:u@example.org>", "u@example.org"),
        ('<@a.example:"x:y"@example.org>', '"x:y"@example.org'),
        ("@a.example:u@example.org", "u@example.org"),
    ],
)
def test_parse_path_source_routes_are_dropped(text, expected):
    """RFC 5321 source routes are ignored (App. C): the mailbox after ':' is the address."""
    assert parse_path(text)[0] == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a@example.org", ("a@example.org", "")),
        ("a@example.org SIZE=10", ("a@example.org", "SIZE=10")),
        (" a@example.org", ("a@example.org", "")),
        ("postmaster", ("postmaster", "")),
    ],
)
def test_parse_path_bare_address_without_brackets(text, expected):
    """Like Postfix, an address without angle brackets is taken up to the first space."""
    assert parse_path(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "<a@example.org",
        '<"a@example.org>',
        "<a@example.org>junk",
        "<a@example.org>>",
        "<a@example.org>SIZE=10",
        "<a b@example.org>",
        "<a@exa mple.org>",
        "<a<b@example.org>",
        "<a@>",
        "<a\x00@example.org>",
        "<a@example.org\x7f>",
        "<a@example.org\t>",
        '<"a\x01"@example.org>',
        '<"a\x7f"@example.org>',
        "a@exa\rmple.org",
    ],
)
def test_parse_path_rejects(text):
    """Unbalanced brackets/quotes, junk after the path, spaces, controls, empty domains."""
    with pytest.raises(AddressSyntaxError):
        parse_path(text)


def test_parse_path_keeps_case_and_utf8_exactly():
    """The address comes back exactly as written: no case folding, no normalisation."""
    text = "<Jörg.Ünïcode@Exämple.ORG>"
    assert parse_path(text)[0] == "Jörg.Ünïcode@Exämple.ORG"
    # NFD (decomposed) input stays decomposed.
    nfd = "<jo\u0308rg@example.org>"
    assert parse_path(nfd)[0] == "jo\u0308rg@example.org"


# -- split_address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address,expected",
    [
        ("a@example.org", ("a", "example.org")),
        ("postmaster", ("postmaster", None)),
        ('"a@b"@example.org', ('"a@b"', "example.org")),
        ('"a\\"@b"@example.org', ('"a\\"@b"', "example.org")),
        ("a@b@example.org", ("a@b", "example.org")),
        ("user%host@example.org", ("user%host", "example.org")),
        ("u@[1.2.3.4]", ("u", "[1.2.3.4]")),
        ('"only@quoted"', ('"only@quoted"', None)),
        ("", ("", None)),
    ],
)
def test_split_address_at_last_unquoted_at(address, expected):
    """The domain is what follows the last '@' outside quotes: where mail is routed."""
    assert split_address(address) == expected


# -- parse_params ------------------------------------------------------------------------------


def test_parse_params():
    """KEYWORD[=VALUE] words, keywords upper-cased, values kept, empty value distinct."""
    assert parse_params("") == []
    assert parse_params("size=10 BODY=8bitmime SMTPUTF8 X-FOO= ") == [
        ("SIZE", "10"),
        ("BODY", "8bitmime"),
        ("SMTPUTF8", None),
        ("X-FOO", ""),
    ]


@pytest.mark.parametrize("text", ["=x", "A/B=1", "SİZE=1", "ü", "SIZE=1 (x)"])
def test_parse_params_rejects_bad_keywords(text):
    """Keywords are ASCII letters, digits and '-' only."""
    with pytest.raises(AddressSyntaxError):
        parse_params(text)


# -- trusted_client --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host,trusted",
    [
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("128.0.0.1", False),
        ("::1", True),
        ("::2", False),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", False),
        ("", False),
        ("localhost", False),
        ("127.0.0", False),
        ("127.0.0.1 ", False),
        ("::ffff:zz", False),
        ("unix:/run/relayd.sock", False),
        ("999.0.0.1", False),
    ],
)
def test_trusted_client_default_mynetworks(host, trusted):
    """Defaults are 127.0.0.0/8 and ::1; mapped IPv4 counts as IPv4; garbage is untrusted."""
    assert policy().trusted_client(host) is trusted


@pytest.mark.parametrize(
    "host,trusted",
    [
        ("10.1.2.3", True),
        ("11.1.2.3", False),
        ("::ffff:10.1.2.3", True),
        ("::ffff:a01:203", True),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("fe80::1%eth0", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("::a01:203", False),  # IPv4-compatible (deprecated), not mapped: not 10.1.2.3
        ("64:ff9b::a01:203", False),  # NAT64 is not IPv4 either
    ],
)
def test_trusted_client_configured_networks(host, trusted):
    """Configured v4 and v6 networks; IPv4 networks never match non-mapped IPv6 forms."""
    p = policy(mynetworks=["10.0.0.0/8", "2001:db8::/32", "fe80::/10"])
    assert p.trusted_client(host) is trusted


def test_from_config_keeps_networks():
    """from_config copies mynetworks as ip_network objects."""
    p = policy(mynetworks=["192.0.2.0/24"])
    assert p.mynetworks == (ipaddress.ip_network("192.0.2.0/24"),)


# -- check_recipient ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    ["b@example.net", "user%host@example.net", '"a@b"@example.net', "postmaster", "u@[1.2.3.4]"],
)
def test_not_permitted_client_is_refused_every_recipient(recipient):
    """No mynetworks, no auth: 550 5.7.1 Relay access denied, whatever the form."""
    p = policy(allowed_recipients=["*"])
    assert refusal(p.check_recipient, recipient, False) == (
        f"550 5.7.1 <{recipient}>: Relay access denied"
    )


def test_permitted_client_without_allowed_recipients_may_send_anywhere():
    """An empty allowed_recipients means any recipient for a permitted client."""
    p = policy()
    for r in ("b@example.net", "postmaster", "user%host@example.net", "u@[1.2.3.4]"):
        p.check_recipient(r, True)


def test_allowed_recipients_patterns():
    """Domain, *@domain and exact patterns; case-insensitive; trailing dot ignored."""
    p = policy(allowed_recipients=["example.net", "*@Other.ORG", "App@Third.example"])
    for ok in (
        "b@example.net",
        "B@EXAMPLE.NET",
        "b@example.net.",
        "x@other.org",
        "app@third.example",
        "APP@THIRD.EXAMPLE",
    ):
        p.check_recipient(ok, True)
    for bad in (
        "b@sub.example.net",
        "b@example.network",
        "b@notexample.net",
        "other@third.example",
        "app@third.example.evil",
    ):
        assert refusal(p.check_recipient, bad, True) == (
            f"550 5.7.1 <{bad}>: Recipient address rejected: not allowed"
        )


@pytest.mark.parametrize(
    "recipient",
    [
        "user%evil.example@example.net",
        "evil.example!user@example.net",
        '"user@evil.example"@example.net',
        "user@evil.example@example.net",
        "postmaster",
    ],
)
def test_allowed_recipients_refuse_routing_in_the_local_part(recipient):
    """%-hacks, bang paths, quoted '@' and domainless addresses can't pass a domain list."""
    p = policy(allowed_recipients=["*@example.net"])
    assert "Recipient address rejected" in refusal(p.check_recipient, recipient, True)


def test_wildcards_are_only_star():
    """Regex metacharacters in patterns are literal; '*' is the only wildcard."""
    p = policy(allowed_recipients=["a.b+c@example.net", "app-*@example.net", "*.example.org"])
    p.check_recipient("a.b+c@example.net", True)
    p.check_recipient("app-1@example.net", True)
    p.check_recipient("app-@example.net", True)
    p.check_recipient("x@sub.example.org", True)
    for bad in ("axb+c@example.net", "a.bbc@example.net", "ab+c@example.net", "x@example.org"):
        with pytest.raises(SMTPReply):
            p.check_recipient(bad, True)


def test_pattern_case_insensitive_for_utf8():
    """Case folding also applies to non-ASCII domains and local parts."""
    p = policy(allowed_recipients=["*@EXÄMPLE.org"])
    p.check_recipient("Jörg@exämple.ORG", True)


# -- check_sender --------------------------------------------------------------------------


def test_allowed_senders_patterns():
    """Senders outside allowed_senders are 550 5.7.1; matching is case-insensitive."""
    p = policy(allowed_senders=["*@example.org", "app@partner.example"])
    p.check_sender("a@example.org", True)
    p.check_sender("A@Example.Org.", True)
    p.check_sender("APP@partner.example", True)
    assert refusal(p.check_sender, "b@partner.example", True) == (
        "550 5.7.1 <b@partner.example>: Sender address rejected: not allowed"
    )
    with pytest.raises(SMTPReply):
        p.check_sender("a@example.org.evil", True)


def test_null_sender_is_always_allowed():
    """<> passes any allowed_senders list (bounces must get through)."""
    policy(allowed_senders=["*@example.org"]).check_sender("", True)


def test_senders_of_not_permitted_clients_are_judged_at_rcpt():
    """check_sender does not refuse a not-permitted client (Postfix refuses at RCPT)."""
    policy(allowed_senders=["*@example.org"]).check_sender("x@elsewhere.example", False)


def test_empty_allowed_senders_means_any():
    """No allowed_senders: every sender is fine for a permitted client."""
    p = policy()
    for s in ("a@example.org", "postmaster", '"x y"@example.org'):
        p.check_sender(s, True)


@pytest.mark.parametrize("text", ['<"a"b c@d>', "<@evil>", '"unclosed@x', '<a"b@c>'])
def test_malformed_local_parts_are_refused(text: str) -> None:
    """Stray quotes, spaces outside quotes and empty local parts never pass."""
    with pytest.raises(AddressSyntaxError):
        parse_path(text)
