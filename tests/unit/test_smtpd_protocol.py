"""The ESMTP server protocol, driven in memory: StringTransport, task.Clock, a recording sink.

Every test reads as a transcript: what the client sends, the exact reply
lines (code and enhanced code), and what reached the sink.
"""

from __future__ import annotations

import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relayd.errors import SMTPReply
from relayd.interfaces import IMessageReceiver, ISession, ISubmissionSink
from relayd.testing import (
    BackpressureTransport,
    Conversation,
    RecordingSink,
    listener_config,
    sample,
    smtp_server,
)

QUEUED_1 = "250 2.0.0 Ok: queued as 00000000000000000001"
QUEUED_2 = "250 2.0.0 Ok: queued as 00000000000000000002"
GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
MAIL_OK = "250 2.1.0 Ok"
RCPT_OK = "250 2.1.5 Ok"
OK = "250 2.0.0 Ok"
OUTSIDER = "192.0.2.7"

EHLO_REPLY = [
    "250-relay.test",
    "250-PIPELINING",
    "250-SIZE 26214400",
    "250-ENHANCEDSTATUSCODES",
    "250-8BITMIME",
    "250-DSN",
    "250-SMTPUTF8",
    "250 CHUNKING",
]


def rejects(c: Conversation, code: str) -> float:
    return sample(c.metrics, "relayd_smtp_rejects_total", {"listener": "test", "code": code})


def received(c: Conversation) -> float:
    return sample(c.metrics, "relayd_messages_received_total", {"listener": "test"})


# -- the fakes themselves ---------------------------------------------------------


def test_fakes_provide_their_interfaces():
    """The in-memory sink, its receivers and the protocol's Session keep the interfaces."""
    c = Conversation()
    c.transaction()
    assert verifyObject(ISubmissionSink, c.sink)
    receiver = c.sink.receivers[0]
    assert verifyObject(IMessageReceiver, receiver)
    assert verifyObject(ISession, receiver.message.session)


def test_listener_config_helper_applies_overrides_through_parse():
    """listener_config() goes through config.parse, so overrides are validated and typed."""
    listener = listener_config(mynetworks=["10.0.0.0/8"], max_recipients=3, bare_newline="reject")
    assert [str(n) for n in listener.mynetworks] == ["10.0.0.0/8"]
    assert listener.max_recipients == 3
    assert listener.bare_newline == "reject"
    assert listener.timeout == 300.0
    assert listener.max_message_size == 25 * 1024 * 1024


def test_smtp_server_helper_wires_a_connected_protocol():
    """smtp_server() returns a connected protocol whose greeting is already written."""
    protocol, transport, clock, sink, metrics = smtp_server("10.1.2.3", mynetworks=["10.0.0.0/8"])
    assert transport.value() == b"220 relay.test ESMTP relayd\r\n"
    assert protocol.transport is transport
    assert sink.messages == []
    assert clock.getDelayedCalls()
    assert metrics.registry.get_sample_value(
        "relayd_smtp_connections_total", {"listener": "test"}
    ) == 1


# -- greeting and the simple commands -------------------------------------------------


def test_greeting():
    """The banner is 220 with the configured host name."""
    assert Conversation().greeting == ["220 relay.test ESMTP relayd"]


def test_ehlo_advertises_exactly_the_implemented_extensions():
    """EHLO lists PIPELINING, SIZE, ENHANCEDSTATUSCODES, 8BITMIME, DSN, SMTPUTF8, CHUNKING;
    no AUTH/STARTTLS."""
    c = Conversation()
    reply = c.send("EHLO client.example\r\n")
    assert reply == EHLO_REPLY
    assert not any("AUTH" in line or "STARTTLS" in line for line in reply)


def test_ehlo_size_is_the_listener_limit():
    """SIZE advertises the listener's max_message_size in bytes."""
    c = Conversation(max_message_size="1MB")
    assert "250-SIZE 1048576" in c.send("EHLO client.example\r\n")


def test_helo():
    """HELO gets a one-line 250 with our name and no extension list."""
    c = Conversation()
    assert c.send("HELO client.example\r\n") == ["250 relay.test"]


def test_helo_and_ehlo_need_an_argument():
    """HELO/EHLO without a name are 501 5.5.4 and the session continues."""
    c = Conversation()
    assert c.send("HELO\r\nEHLO \r\nNOOP\r\n") == [
        "501 5.5.4 Syntax: HELO hostname",
        "501 5.5.4 Syntax: EHLO hostname",
        OK,
    ]


def test_noop_vrfy_help():
    """NOOP 250, VRFY 252 (never confirms), HELP 214."""
    c = Conversation()
    assert c.send("NOOP\r\nVRFY root\r\nHELP\r\nVRFY\r\n") == [
        OK,
        "252 2.0.0 Cannot VRFY user; try RCPT to attempt delivery",
        "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
        "501 5.5.4 Syntax: VRFY address",
    ]


def test_commands_are_case_insensitive():
    """Verbs and FROM:/TO: are matched without regard to case."""
    c = Conversation()
    assert c.send("ehlo x\r\nmail from:<a@example.org>\r\nrcpt to:<b@example.net>\r\n")[-2:] == [
        MAIL_OK,
        RCPT_OK,
    ]


def test_quit_replies_and_closes():
    """QUIT gets 221 and the server closes; later input is ignored."""
    c = Conversation()
    assert c.send("QUIT\r\n") == ["221 2.0.0 Bye"]
    assert c.closed
    assert c.send("NOOP\r\n") == []


def test_quit_discards_pipelined_commands_after_it():
    """Nothing after QUIT in the same packet is executed."""
    c = Conversation()
    assert c.send("QUIT\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert c.sink.capacity_checks == 0


def test_unknown_command():
    """An unknown verb is 502 5.5.2 and the session continues."""
    c = Conversation()
    assert c.send("EXPN staff\r\nSTARTTLS\r\nAUTH PLAIN AAAA\r\nNOOP\r\n") == [
        "502 5.5.2 Error: command not recognized",
        "502 5.5.2 Error: command not recognized",
        "502 5.5.2 Error: command not recognized",
        OK,
    ]


# -- a whole transaction ------------------------------------------------------------

TRANSACTION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<sender@example.org>\r\n"
    b"RCPT TO:<one@example.net>\r\n"
    b"RCPT TO:<two@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"body\r\n"
    b".\r\n"
    b"QUIT\r\n"
)
TRANSACTION_REPLIES = [
    *EHLO_REPLY,
    MAIL_OK,
    RCPT_OK,
    RCPT_OK,
    GO_AHEAD,
    QUEUED_1,
    "221 2.0.0 Bye",
]


def check_transaction(c: Conversation) -> None:
    [m] = c.sink.messages
    assert m.sender == "sender@example.org"
    assert m.recipients == ("one@example.net", "two@example.net")
    assert m.content == b"Subject: hi\r\n\r\nbody\r\n"
    assert m.queue_id == "00000000000000000001"
    assert m.helo == "client.example"
    assert m.smtputf8 is False and m.body is None
    session = m.session
    assert (session.listener, session.client_address, session.route, session.user) == (
        "test",
        "127.0.0.1",
        "default",
        None,
    )
    assert session.protocol == "ESMTP"
    assert c.closed


def test_full_transaction_in_one_packet():
    """A client that pipelines everything in one write gets every reply, in order."""
    c = Conversation()
    assert c.send(TRANSACTION) == TRANSACTION_REPLIES
    check_transaction(c)


def test_full_transaction_byte_by_byte():
    """The same transaction fed one byte at a time gives the same replies and message."""
    c = Conversation()
    assert c.send_bytewise(TRANSACTION) == TRANSACTION_REPLIES
    check_transaction(c)


def test_two_transactions_in_one_session():
    """After 250 queued the session is ready for the next MAIL."""
    c = Conversation()
    assert c.transaction() == [MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.send("one\r\n.\r\n") == [QUEUED_1]
    assert c.transaction("b@example.org", ("c@example.net",)) == [MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.send("two\r\n.\r\n") == [QUEUED_2]
    assert [(m.sender, m.content) for m in c.sink.messages] == [
        ("sender@example.org", b"one\r\n"),
        ("b@example.org", b"two\r\n"),
    ]


def test_helo_session_is_smtp():
    """A HELO session is recorded as protocol SMTP with its HELO name."""
    c = Conversation()
    c.send("HELO old.example\r\n")
    c.transaction()
    c.send(".\r\n")
    [m] = c.sink.messages
    assert (m.session.protocol, m.helo) == ("SMTP", "old.example")


def test_mail_before_helo_is_accepted():
    """Like Postfix (smtpd_helo_required = no), MAIL without HELO works."""
    c = Conversation()
    assert c.transaction() == [MAIL_OK, RCPT_OK, GO_AHEAD]


def test_empty_message():
    """A lone dot right after 354 queues an empty message."""
    c = Conversation()
    c.transaction()
    assert c.send(".\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == b""


# -- sequencing -------------------------------------------------------------------


def test_rcpt_and_data_need_mail():
    """RCPT or DATA before MAIL are 503 5.5.1."""
    c = Conversation()
    assert c.send("RCPT TO:<b@example.net>\r\nDATA\r\n") == [
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
    ]


def test_data_needs_a_recipient():
    """DATA with no accepted recipient is 554 5.5.1 and the envelope stays open."""
    c = Conversation()
    assert c.send("MAIL FROM:<a@example.org>\r\nDATA\r\nRCPT TO:<b@example.net>\r\n") == [
        MAIL_OK,
        "554 5.5.1 Error: no valid recipients",
        RCPT_OK,
    ]
    assert c.sink.receivers == []


def test_nested_mail():
    """A second MAIL inside a transaction is 503 5.5.1; the first envelope stands."""
    c = Conversation()
    assert c.send("MAIL FROM:<a@example.org>\r\nMAIL FROM:<x@example.org>\r\n") == [
        MAIL_OK,
        "503 5.5.1 Error: nested MAIL command",
    ]
    c.send("RCPT TO:<b@example.net>\r\nDATA\r\n.\r\n")
    assert c.sink.messages[0].sender == "a@example.org"


def test_rset_clears_the_transaction():
    """After RSET, RCPT needs a new MAIL and a new MAIL is not nested."""
    c = Conversation()
    assert c.send(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRSET\r\n"
        "RCPT TO:<b@example.net>\r\nMAIL FROM:<c@example.org>\r\n"
    ) == [MAIL_OK, RCPT_OK, OK, "503 5.5.1 Error: need MAIL command", MAIL_OK]


def test_ehlo_resets_the_transaction():
    """EHLO in the middle of a transaction starts over (RFC 5321 §4.1.4)."""
    c = Conversation()
    c.send("MAIL FROM:<a@example.org>\r\n")
    c.send("EHLO again\r\n")
    assert c.send("RCPT TO:<b@example.net>\r\n") == ["503 5.5.1 Error: need MAIL command"]


# -- syntax ---------------------------------------------------------------------------


def test_syntax_errors_and_the_session_continues():
    """Malformed MAIL/RCPT/DATA are 501 with a precise enhanced code; the session goes on."""
    c = Conversation()
    assert c.send(
        "MAIL\r\n"
        "MAIL TO:<a@example.org>\r\n"
        "MAIL FROM:<a@example.org\r\n"
        "MAIL FROM:<a@example.org>junk\r\n"
        "MAIL FROM:<a b@example.org>\r\n"
        "MAIL FROM:<a@example.org>\r\n"
        "RCPT\r\n"
        "RCPT FROM:<b@example.net>\r\n"
        "RCPT TO:<>\r\n"
        "RCPT TO:<b@>\r\n"
        "RCPT TO:<b@example.net>\r\n"
        "DATA now\r\n"
        "NOOP\r\n"
    ) == [
        "501 5.5.4 Syntax: MAIL FROM:<address>",
        "501 5.5.4 Syntax: MAIL FROM:<address>",
        "501 5.1.7 Bad sender address syntax",
        "501 5.1.7 Bad sender address syntax",
        "501 5.1.7 Bad sender address syntax",
        MAIL_OK,
        "501 5.5.4 Syntax: RCPT TO:<address>",
        "501 5.5.4 Syntax: RCPT TO:<address>",
        "501 5.1.3 Bad recipient address syntax",
        "501 5.1.3 Bad recipient address syntax",
        RCPT_OK,
        "501 5.5.4 Syntax: DATA",
        OK,
    ]


def test_invalid_utf8_in_mail_is_a_syntax_error():
    """Bytes that are not UTF-8 in a path are refused, never guessed at."""
    c = Conversation()
    assert c.send(b"MAIL FROM:<\xff@example.org> SMTPUTF8\r\n") == [
        "501 5.5.4 Syntax: MAIL FROM:<address>"
    ]


def test_space_after_colon_and_bare_address_are_tolerated():
    """Postfix-style leniency: `FROM: <a>` and an address without brackets."""
    c = Conversation()
    assert c.send("MAIL FROM: <a@example.org>\r\nRCPT TO:b@example.net\r\n") == [
        MAIL_OK,
        RCPT_OK,
    ]


def test_unknown_mail_and_rcpt_parameters():
    """Unsupported ESMTP parameters are 555 5.5.4 (RFC 5321 §4.1.1.11)."""
    c = Conversation()
    assert c.send(
        "MAIL FROM:<a@example.org> XRET=HDRS\r\n"
        "MAIL FROM:<a@example.org>\r\n"
        "RCPT TO:<b@example.net> XNOTIFY=NEVER\r\n"
    ) == [
        "555 5.5.4 Unsupported option: XRET",
        MAIL_OK,
        "555 5.5.4 Unsupported option: XNOTIFY",
    ]


def test_bad_values_of_known_parameters():
    """SIZE/BODY/SMTPUTF8 with a bad value are 501 5.5.4."""
    c = Conversation()
    assert c.send(
        "MAIL FROM:<a@example.org> SIZE=big\r\n"
        "MAIL FROM:<a@example.org> SIZE\r\n"
        "MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"
        "MAIL FROM:<a@example.org> SMTPUTF8=yes\r\n"
        "MAIL FROM:<a@example.org> SIZE=123456789012345678901234\r\n"
    ) == [
        "501 5.5.4 Bad SIZE parameter syntax",
        "501 5.5.4 Bad SIZE parameter syntax",
        "501 5.5.4 Bad BODY parameter syntax",
        "501 5.5.4 Bad SMTPUTF8 parameter syntax",
        "501 5.5.4 Bad SIZE parameter syntax",
    ]


def test_size_with_non_ascii_digits_is_a_syntax_error():
    """SIZE=² (a Unicode 'digit' int() cannot read) is 501, not an exception."""
    c = Conversation()
    assert c.send("MAIL FROM:<a@example.org> SIZE=²\r\nNOOP\r\n") == [
        "501 5.5.4 Bad SIZE parameter syntax",
        OK,
    ]


# -- SIZE, BODY, SMTPUTF8 ------------------------------------------------------------


def test_declared_size_over_the_limit():
    """MAIL SIZE= above max_message_size is 552 5.3.4; at the limit it is accepted."""
    c = Conversation(max_message_size=1000)
    assert c.send(
        "MAIL FROM:<a@example.org> SIZE=1001\r\nMAIL FROM:<a@example.org> SIZE=1000\r\n"
    ) == ["552 5.3.4 Message size exceeds fixed limit", MAIL_OK]
    assert rejects(c, "552") == 1


def test_actual_size_over_the_limit_then_next_transaction_works():
    """Data beyond the limit is 552 5.3.4 after the dot; nothing queued; the session goes on."""
    c = Conversation(max_message_size=1000)
    c.transaction()
    body = b"x" * 998 + b"\r\n" + b"y" * 10 + b"\r\n"
    assert c.send(body + b".\r\n") == ["552 5.3.4 Error: message file too big"]
    assert c.sink.messages == []
    assert c.sink.receivers[0].state == "aborted"
    assert c.transaction() == [MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.send(b"x" * 998 + b"\r\n.\r\n") == [QUEUED_1]
    assert len(c.sink.messages[0].content) == 1000


def test_oversized_data_in_many_chunks_is_not_buffered():
    """Once over the limit the receiver is aborted and later chunks are dropped."""
    c = Conversation(max_message_size=1000)
    c.transaction()
    for _ in range(100):
        assert c.send(b"z" * 998 + b"\r\n") == []
    assert c.sink.receivers[0].state == "aborted"
    assert sum(len(x) for x in c.sink.receivers[0].chunks) <= 1000
    assert c.send(".\r\n") == ["552 5.3.4 Error: message file too big"]


def test_body_parameter_recorded():
    """BODY=8BITMIME / BODY=7BIT reach the sink upper-cased; absent means None."""
    c = Conversation()
    c.send("MAIL FROM:<a@example.org> BODY=8bitmime\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    c.send(".\r\n")
    c.send("MAIL FROM:<a@example.org> BODY=7BIT\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    c.send(".\r\n")
    assert [m.body for m in c.sink.messages] == ["8BITMIME", "7BIT"]


def test_8bit_content_kept_byte_exact():
    """8-bit and NUL-free binary-ish content passes through unchanged."""
    c = Conversation()
    c.send("MAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    body = "Grüße, 日本語\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"
    assert c.send(body + b".\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == body


def test_non_ascii_address_needs_smtputf8():
    """A UTF-8 sender or recipient without SMTPUTF8 is 553 5.6.7."""
    c = Conversation()
    assert c.send(
        "MAIL FROM:<jörg@exämple.org>\r\n"
        "MAIL FROM:<a@example.org>\r\n"
        "RCPT TO:<dörte@example.net>\r\n"
    ) == [
        "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
        MAIL_OK,
        "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
    ]


def test_smtputf8_addresses_kept_byte_exact():
    """With SMTPUTF8 the UTF-8 envelope is accepted and recorded exactly as sent."""
    c = Conversation()
    sender = "jörg@exämple.org"
    rcpt = "用户@例子.广告"
    assert c.send(
        f"MAIL FROM:<{sender}> SMTPUTF8 BODY=8BITMIME\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
    ) == [MAIL_OK, RCPT_OK, GO_AHEAD]
    c.send(".\r\n")
    [m] = c.sink.messages
    assert m.smtputf8 is True
    assert m.sender.encode("utf-8") == sender.encode("utf-8")
    assert [r.encode("utf-8") for r in m.recipients] == [rcpt.encode("utf-8")]


def test_smtputf8_is_per_transaction():
    """SMTPUTF8 on one MAIL does not carry over to the next transaction."""
    c = Conversation()
    c.send("MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<ü@example.net>\r\nDATA\r\n.\r\n")
    assert c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<ü@example.net>\r\n") == [
        MAIL_OK,
        "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
    ]
    assert c.sink.messages[0].smtputf8 is True


# -- recipients and relay permission ----------------------------------------------------


def test_max_recipients():
    """RCPTs beyond max_recipients are 452 4.5.3; the first N are delivered."""
    c = Conversation(max_recipients=3)
    rcpts = [f"r{i}@example.net" for i in range(5)]
    assert c.transaction(recipients=tuple(rcpts)) == [
        MAIL_OK,
        RCPT_OK,
        RCPT_OK,
        RCPT_OK,
        "452 4.5.3 Error: too many recipients",
        "452 4.5.3 Error: too many recipients",
        GO_AHEAD,
    ]
    assert c.send(".\r\n") == [QUEUED_1]
    assert c.sink.messages[0].recipients == tuple(rcpts[:3])
    assert rejects(c, "452") == 2


RELAY_FORMS = [
    ("<b@example.net>", "<b@example.net>"),
    ("<user%host@example.net>", "<user%host@example.net>"),
    ('<"a@b"@example.net>', '<"a@b"@example.net>'),
    ("<@a.example,@b.example:u@example.net>", "<u@example.net>"),
    ("<u@[1.2.3.4]>", "<u@[1.2.3.4]>"),
    ("<postmaster>", "<postmaster>"),
    ("<B@EXAMPLE.NET.>", "<B@EXAMPLE.NET.>"),
    ("b@example.net", "<b@example.net>"),
]


@pytest.mark.parametrize("path,shown", RELAY_FORMS)
def test_relay_denied_for_outsider_in_every_address_form(path, shown):
    """A client outside mynetworks gets 550 5.7.1 for every way of writing a recipient."""
    c = Conversation(OUTSIDER)
    assert c.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:{path}\r\nDATA\r\n") == [
        MAIL_OK,
        f"550 5.7.1 {shown}: Relay access denied",
        "554 5.5.1 Error: no valid recipients",
    ]
    assert c.sink.receivers == []
    assert rejects(c, "550") == 1


@pytest.mark.parametrize("path,shown", RELAY_FORMS)
def test_trusted_client_may_relay_every_address_form(path, shown):
    """The same forms are accepted from mynetworks (so the test above tests the policy)."""
    c = Conversation()
    assert c.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:{path}\r\n") == [MAIL_OK, RCPT_OK]


def test_null_sender_from_outsider_still_cannot_relay():
    """<> is accepted at MAIL from anyone, but an outsider's RCPT is still refused."""
    c = Conversation(OUTSIDER)
    assert c.send("MAIL FROM:<>\r\nRCPT TO:<b@example.net>\r\n") == [
        MAIL_OK,
        "550 5.7.1 <b@example.net>: Relay access denied",
    ]


def test_null_sender_accepted_and_recorded():
    """MAIL FROM:<> (bounces) is accepted and recorded as the empty sender."""
    c = Conversation(allowed_senders=["*@example.org"])
    assert c.send("MAIL FROM:<>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n.\r\n") == [
        MAIL_OK,
        RCPT_OK,
        GO_AHEAD,
        QUEUED_1,
    ]
    assert c.sink.messages[0].sender == ""


def test_ipv4_mapped_ipv6_client_counts_as_ipv4():
    """::ffff:127.0.0.1 matches 127.0.0.0/8."""
    c = Conversation("::ffff:127.0.0.1")
    assert c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n") == [
        MAIL_OK,
        RCPT_OK,
    ]


def test_ipv6_loopback_is_trusted_by_default():
    """::1 is in the default mynetworks."""
    c = Conversation("::1")
    assert c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")[-1] == RCPT_OK


def test_mynetworks_from_config():
    """A configured network trusts its clients and nothing else."""
    inside = Conversation("10.9.8.7", mynetworks=["10.0.0.0/8"])
    outside = Conversation("127.0.0.1", mynetworks=["10.0.0.0/8"])
    for c, last in ((inside, RCPT_OK), (outside, "550 5.7.1 <b@example.net>: Relay access denied")):
        assert c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")[-1] == last


def test_allowed_senders_narrow():
    """allowed_senders refuses other senders (550 5.7.1) at MAIL, case-insensitively."""
    c = Conversation(allowed_senders=["*@example.org"])
    assert c.send(
        "MAIL FROM:<a@other.org>\r\nMAIL FROM:<a@EXAMPLE.ORG>\r\nRCPT TO:<b@example.net>\r\n"
    ) == [
        "550 5.7.1 <a@other.org>: Sender address rejected: not allowed",
        MAIL_OK,
        RCPT_OK,
    ]


def test_allowed_recipients_narrow():
    """allowed_recipients refuses other recipients and routing tricks (550 5.7.1)."""
    c = Conversation(allowed_recipients=["example.net"])
    assert c.send(
        "MAIL FROM:<a@example.org>\r\n"
        "RCPT TO:<b@other.net>\r\n"
        "RCPT TO:<b%other.net@example.net>\r\n"
        'RCPT TO:<"b@other.net"@example.net>\r\n'
        "RCPT TO:<postmaster>\r\n"
        "RCPT TO:<b@Example.NET>\r\n"
    ) == [
        MAIL_OK,
        "550 5.7.1 <b@other.net>: Recipient address rejected: not allowed",
        "550 5.7.1 <b%other.net@example.net>: Recipient address rejected: not allowed",
        '550 5.7.1 <"b@other.net"@example.net>: Recipient address rejected: not allowed',
        "550 5.7.1 <postmaster>: Recipient address rejected: not allowed",
        RCPT_OK,
    ]


def test_allowed_lists_never_open_relaying():
    """An outsider using an allowed sender and an allowed recipient is still refused."""
    c = Conversation(
        OUTSIDER, allowed_senders=["*@example.org"], allowed_recipients=["*@example.net"]
    )
    assert c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n") == [
        MAIL_OK,
        "550 5.7.1 <b@example.net>: Relay access denied",
    ]


# -- line length and buffering ---------------------------------------------------------


def test_command_line_limit_boundary():
    """512 octets with CRLF is a command; 513 is 500 5.5.2 and the session continues."""
    c = Conversation()
    line_512 = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    line_513 = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    assert len(line_512) == 512
    assert c.send(line_512 + line_513 + b"NOOP\r\n") == [OK, "500 5.5.2 Line too long", OK]


def test_long_line_without_newline_is_bounded_then_session_continues():
    """10 MB without a newline never accumulates; its end gets one 500, then commands work."""
    c = Conversation()
    chunk = b"A" * 65536
    for _ in range(10 * 1024 * 1024 // len(chunk)):
        assert c.send(chunk) == []
        assert len(c.protocol._buf) <= 2048
    assert c.send(b"tail\r\nNOOP\r\n") == ["500 5.5.2 Line too long", OK]
    assert not c.closed


def test_long_line_fed_slowly_is_bounded():
    """An over-long line arriving in small pieces is dropped as it comes."""
    c = Conversation()
    for _ in range(2000):
        c.protocol.dataReceived(b"NOOP" * 4)
        assert len(c.protocol._buf) <= 512
    assert c.send(b"\r\nNOOP\r\n") == ["500 5.5.2 Line too long", OK]


def test_overlong_line_tail_is_not_a_command():
    """The tail of an over-long line (here 'QUIT') is never executed."""
    c = Conversation()
    c.send(b"NOOP " + b"x" * 600)
    assert c.send(b" QUIT\r\nNOOP\r\n") == ["500 5.5.2 Line too long", OK]
    assert not c.closed


def test_mail_line_of_1000_octets_is_accepted():
    """MAIL/RCPT lines get the 2048-octet path limit, so a 1000-octet MAIL is fine."""
    c = Conversation()
    suffix = "@example.org>\r\n"
    line = "MAIL FROM:<" + "a" * (1000 - len("MAIL FROM:<") - len(suffix)) + suffix
    assert len(line) == 1000
    assert c.send(line) == [MAIL_OK]


def test_mail_line_limit_is_2048():
    """2048 octets is accepted for MAIL, 2049 is 500 5.5.2 (also when fed byte by byte)."""
    def mail(total: int) -> bytes:
        head, tail = b"MAIL FROM:<", b"@example.org>\r\n"
        return head + b"a" * (total - len(head) - len(tail)) + tail

    c = Conversation()
    assert c.send(mail(2049)) == ["500 5.5.2 Line too long"]
    assert c.send_bytewise(mail(2048)) == [MAIL_OK]


def test_data_accepts_long_text_lines():
    """Text lines of 5000 octets in DATA are content (Postfix does not cut them)."""
    c = Conversation()
    c.transaction()
    line = b"L" * 5000 + b"\r\n"
    assert c.send(line * 3 + b".\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == line * 3


# -- DATA content integrity -------------------------------------------------------------


def test_commands_inside_data_are_content():
    """MAIL/RCPT/DATA/QUIT lines inside the body are message text, not commands."""
    c = Conversation()
    c.transaction()
    body = b"hi\r\nMAIL FROM:<x@evil.example>\r\nRCPT TO:<y@evil.example>\r\nDATA\r\nQUIT\r\n"
    assert c.send(body + b".\r\n") == [QUEUED_1]
    assert [m.content for m in c.sink.messages] == [body]
    assert not c.closed


@pytest.mark.parametrize(
    "smuggle",
    [
        b"\n.\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\r.\r\n",
    ],
)
def test_only_crlf_dot_crlf_ends_data(smuggle):
    """Bare-LF/CR dot lines do not end the data: the 'smuggled' message stays content."""
    c = Conversation()
    c.transaction()
    raw = (
        b"first\r\n"
        + b"x"
        + smuggle
        + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        + b"smuggled\r\n"
    )
    assert c.send(raw + b".\r\n") == [QUEUED_1]
    [m] = c.sink.messages
    assert b"MAIL FROM:<evil@example.org>\r\n" in m.content
    assert m.content.endswith(b"smuggled\r\n")
    assert m.content.count(b"\r") == m.content.count(b"\n") == m.content.count(b"\r\n")
    assert len(c.sink.receivers) == 1


def test_overlong_data_line_then_commands_stay_content():
    """An over-long line in DATA does not switch to command mode (the Twisted ESMTP bug)."""
    c = Conversation()
    c.transaction()
    raw = b"Y" * 100_000 + b"\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\nQUIT\r\n"
    for i in range(0, len(raw), 4096):
        assert c.send(raw[i : i + 4096]) == []
    assert c.send(b".\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == raw
    assert not c.closed


def test_bare_newline_normalize():
    """By default bare LF and bare CR become CRLF in the recorded content."""
    c = Conversation()
    c.transaction()
    assert c.send(b"a\nb\rc\r\nd\n\r\n.\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == b"a\r\nb\r\nc\r\nd\r\n\r\n"


def test_bare_newline_reject():
    """bare_newline = "reject": 554 5.6.0 after the dot, nothing queued, session goes on."""
    c = Conversation(bare_newline="reject")
    c.transaction()
    assert c.send(b"a\nb\r\n.\r\n") == ["554 5.6.0 Error: bare <CR> or <LF> received"]
    assert c.sink.messages == []
    assert c.sink.receivers[0].state == "aborted"
    assert c.transaction() == [MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.send(b"clean\r\n.\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == b"clean\r\n"


def test_bare_cr_reject_across_chunks():
    """A bare CR is found even when it ends one chunk and the next begins with text."""
    c = Conversation(bare_newline="reject")
    c.transaction()
    assert c.send(b"a\r") == []
    assert c.send(b"b\r\n.\r\n") == ["554 5.6.0 Error: bare <CR> or <LF> received"]
    assert c.sink.messages == []


def test_dot_unstuffing():
    """One leading dot is removed from each line, the first one included."""
    c = Conversation()
    c.transaction()
    assert c.send(b"..first\r\nmid\r\n...two\r\n..\r\n.x\r\n.\r\n") == [QUEUED_1]
    assert c.sink.messages[0].content == b".first\r\nmid\r\n..two\r\n.\r\nx\r\n"


def test_dot_unstuffing_at_chunk_joins():
    """A stuffed dot at the start of a chunk is removed like any other."""
    c = Conversation()
    c.transaction()
    for piece in (b".", b".first\r", b"\n", b"..", b"second\r\n", b".", b"\r", b"\n"):
        c.send(piece)
    assert c.sink.messages[0].content == b".first\r\n.second\r\n"


def bodies():
    line = st.tuples(
        st.integers(min_value=0, max_value=3),
        st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ).map(lambda t: b"." * t[0] + t[1])
    return st.lists(line, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=bodies(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_property_any_body_any_chunking(lines, cuts):
    """Dot-stuffed content split anywhere comes out as the original CRLF text."""
    original = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire += b".\r\nNOOP\r\n"
    points = sorted({cut % (len(wire) + 1) for cut in cuts})
    c = Conversation()
    c.transaction()
    out: list[str] = []
    last = 0
    for p in [*points, len(wire)]:
        out += c.send(wire[last:p])
        last = p
    assert out == [QUEUED_1, OK]
    # The listener default nul = "strip" removes NULs (issue 14.2), nothing else.
    assert [m.content for m in c.sink.messages] == [original.replace(b"\x00", b"")]


# -- timeouts ----------------------------------------------------------------------------


def test_command_timeout():
    """Idle for listener.timeout: 421 4.4.2 and the connection is closed."""
    c = Conversation()
    c.clock.advance(c.listener.timeout - 1)
    assert not c.closed and c.replies() == []
    c.clock.advance(2)
    assert c.replies() == ["421 4.4.2 relay.test Error: timeout exceeded"]
    assert c.closed


def test_commands_restart_the_idle_timer():
    """Each command restarts the timer, so an active client is not cut off."""
    c = Conversation(timeout=60)
    for _ in range(5):
        c.clock.advance(59)
        assert c.send("NOOP\r\n") == [OK]
    assert not c.closed


def test_partial_command_does_not_restart_the_idle_timer():
    """A client dripping a command without ever ending it still times out."""
    c = Conversation(timeout=60)
    c.clock.advance(30)
    c.send(b"N")
    c.clock.advance(29)
    c.send(b"O")
    assert not c.closed
    c.clock.advance(2)
    assert c.replies() == ["421 4.4.2 relay.test Error: timeout exceeded"]
    assert c.closed


def test_data_deadline_bounds_a_dripping_client():
    """A byte every 60 s in DATA keeps the idle timer alive but 2 x timeout ends it: 421."""
    c = Conversation()  # timeout 300 s, DATA deadline 600 s
    c.transaction()
    for _ in range(9):
        c.clock.advance(60)
        assert c.send(b"x") == []
    assert not c.closed
    c.clock.advance(60)
    assert c.replies() == ["421 4.4.2 relay.test Error: timeout exceeded"]
    assert c.closed
    assert c.sink.messages == []


def test_data_deadline_is_per_message():
    """The DATA deadline is cancelled at the dot; the next message gets a fresh one."""
    c = Conversation(timeout=100)
    c.transaction()
    c.clock.advance(90)
    c.send(b"a")
    c.clock.advance(90)
    assert c.send(b"\r\n.\r\n") == [QUEUED_1]  # 180 s in DATA, under the 200 s deadline
    c.transaction()
    c.clock.advance(99)
    assert c.send(b"b\r\n") == []
    c.clock.advance(99)
    assert c.send(b".\r\n") == [QUEUED_2]
    assert not c.closed


def test_timers_cancelled_when_connection_lost():
    """Nothing stays scheduled on the clock after the connection is gone."""
    c = Conversation()
    c.transaction()
    c.protocol.connectionLost(Failure(ConnectionDone()))
    assert c.clock.getDelayedCalls() == []


# -- pipelining and the pending commit --------------------------------------------------


def test_pipelined_commands_wait_for_the_pending_commit():
    """While finish() is pending nothing after the dot is answered; then all in order."""
    c = Conversation()
    c.sink.hold = True
    assert c.transaction() == [MAIL_OK, RCPT_OK, GO_AHEAD]
    assert (
        c.send(b"body\r\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n") == []
    )
    assert len(c.sink.pending) == 1
    assert c.sink.capacity_checks == 1  # the second MAIL has not run yet
    assert c.send(b"DATA\r\n") == []
    c.sink.release()
    assert c.replies() == [QUEUED_1, MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.send(b"second\r\n.\r\n") == []
    c.sink.release()
    assert c.replies() == [QUEUED_2]
    assert [m.content for m in c.sink.messages] == [b"body\r\n", b"second\r\n"]


def test_quit_pipelined_after_pending_commit():
    """QUIT behind a pending commit is answered after the 250, and closes then."""
    c = Conversation()
    c.sink.hold = True
    c.transaction()
    assert c.send(b"x\r\n.\r\nQUIT\r\n") == []
    assert not c.closed
    c.sink.release()
    assert c.replies() == [QUEUED_1, "221 2.0.0 Bye"]
    assert c.closed


def test_connection_lost_while_commit_pending():
    """A commit that completes after the client left writes nothing and does not fail."""
    c = Conversation()
    c.sink.hold = True
    c.transaction()
    c.send(b"x\r\n.\r\n")
    c.protocol.connectionLost(Failure(ConnectionDone()))
    c.sink.release()
    assert c.replies() == []
    assert len(c.sink.messages) == 1
    assert c.sink.receivers[0].state == "finished"


def test_pipeline_buffer_pauses_reading_while_waiting():
    """More than 64 KB pipelined behind a pending commit pauses the transport, then resumes."""
    c = Conversation()
    c.sink.hold = True
    c.transaction()
    c.send(b"x\r\n.\r\n")
    c.send((b"MAIL FROM:<" + b"a" * 900 + b"@example.org>\r\nRSET\r\n") * 80)
    assert c.transport.producerState == "paused"
    c.sink.release()
    replies = c.replies()
    assert replies[0] == QUEUED_1
    assert c.transport.producerState == "producing"


def test_paused_transport_is_resumed_when_buffered_input_enters_data():
    """A paused transport is resumed even if the buffered commands end inside DATA."""
    c = Conversation()
    c.sink.hold = True
    c.transaction()
    # Non-compliant (body sent before 354) but must not wedge the session.
    c.send(
        b"x\r\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        + b"y" * 70_000
        + b"\r\n"
    )
    assert c.transport.producerState == "paused"
    c.sink.hold = False
    c.sink.release()
    assert c.replies() == [QUEUED_1, MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.transport.producerState == "producing"


def test_slow_commit_is_not_a_client_timeout():
    """The client waiting for our 250 is not idle: a slow commit still ends in 250."""
    c = Conversation(timeout=60)
    c.sink.hold = True
    c.transaction()
    c.send(b"x\r\n.\r\n")
    c.clock.advance(61)
    c.sink.release()
    assert c.replies() == [QUEUED_1]
    assert not c.closed


def test_many_pipelined_messages_with_synchronous_commit():
    """Many messages in one read with an immediate commit are all answered (no recursion)."""

    def run() -> tuple[int, list[str]]:
        c = Conversation(max_errors_per_session=1000)
        one = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\n"
        replies = c.send(one * 300)
        return len(c.sink.messages), replies

    count, replies = run()
    gc.collect()  # log any "Unhandled error in Deferred" here, inside this test
    assert count == 300
    assert replies.count(GO_AHEAD) == 300
    assert replies[-1] == "250 2.0.0 Ok: queued as 00000000000000000300"


# -- sink failures ------------------------------------------------------------------------


def test_queue_full_at_mail():
    """check_capacity raising QueueFull is 452 4.3.1 at MAIL; later MAIL works again."""
    c = Conversation()
    c.sink.full = True
    assert c.send("MAIL FROM:<a@example.org>\r\n") == ["452 4.3.1 Insufficient system storage"]
    c.sink.full = False
    assert c.send("MAIL FROM:<a@example.org>\r\n") == [MAIL_OK]
    assert rejects(c, "452") == 1


def test_commit_refused_with_smtp_reply():
    """finish() failing with SMTPReply answers exactly that reply; the session continues."""
    c = Conversation()
    c.sink.fail_with = SMTPReply(554, "5.4.6", "Too many hops")
    c.transaction()
    assert c.send(b"x\r\n.\r\n") == ["554 5.4.6 Too many hops"]
    c.sink.fail_with = None
    assert c.transaction() == [MAIL_OK, RCPT_OK, GO_AHEAD]
    assert c.send(b"y\r\n.\r\n") == [QUEUED_1]
    assert [m.content for m in c.sink.messages] == [b"y\r\n"]


def test_commit_failing_with_os_error_is_451():
    """A local failure (OSError) is 451 4.3.0, never 5xx; the session continues."""
    c = Conversation()
    c.sink.fail_with = OSError(28, "No space left on device")
    c.transaction()
    assert c.send(b"x\r\n.\r\n") == ["451 4.3.0 Error: queue file write error"]
    assert c.sink.messages == []
    c.sink.fail_with = None
    c.transaction()
    assert c.send(b"y\r\n.\r\n") == [QUEUED_1]
    assert rejects(c, "451") == 1


def test_pending_commit_failing_later():
    """A held commit that then fails answers 451 and the pipelined commands after it."""
    c = Conversation()
    c.sink.hold = True
    c.transaction()
    assert c.send(b"x\r\n.\r\nNOOP\r\n") == []
    c.sink.pending[0].fail(OSError("disk gone"))
    assert c.replies() == ["451 4.3.0 Error: queue file write error", OK]


# -- error limits -------------------------------------------------------------------------


def test_too_many_errors():
    """The 20th error reply is followed by 421 4.7.0 and the connection is closed."""
    c = Conversation()
    assert c.send("BOGUS\r\n" * 19) == ["502 5.5.2 Error: command not recognized"] * 19
    assert not c.closed
    assert c.send("BOGUS\r\nNOOP\r\n") == [
        "502 5.5.2 Error: command not recognized",
        "421 4.7.0 relay.test Error: too many errors",
    ]
    assert c.closed


def test_error_limit_is_configurable():
    """max_errors_per_session sets where the session is cut off."""
    c = Conversation(max_errors_per_session=2)
    assert c.send("BOGUS\r\nBOGUS\r\nNOOP\r\n") == [
        "502 5.5.2 Error: command not recognized",
        "502 5.5.2 Error: command not recognized",
        "421 4.7.0 relay.test Error: too many errors",
    ]


def test_junk_commands_beyond_100_count_as_errors():
    """NOOP/RSET/VRFY/HELP past 100 each count an error: the 120th NOOP ends the session."""
    c = Conversation()
    assert c.send("NOOP\r\n" * 100) == [OK] * 100
    assert c.send("NOOP\r\n" * 19) == [OK] * 19
    assert not c.closed
    assert c.send("NOOP\r\n") == ["421 4.7.0 relay.test Error: too many errors"]
    assert c.closed


def test_relay_denials_count_towards_the_error_limit():
    """An outsider probing recipients is disconnected after 20 refusals."""
    c = Conversation(OUTSIDER)
    c.send("MAIL FROM:<a@example.org>\r\n")
    replies = c.send("".join(f"RCPT TO:<r{i}@example.net>\r\n" for i in range(25)))
    assert replies[:20] == [f"550 5.7.1 <r{i}@example.net>: Relay access denied" for i in range(20)]
    assert replies[20:] == ["421 4.7.0 relay.test Error: too many errors"]


# -- connection loss and metrics ------------------------------------------------------------


def test_connection_lost_mid_data_aborts_the_receiver():
    """A client vanishing during DATA leaves nothing queued and the receiver aborted."""
    c = Conversation()
    c.transaction()
    c.send(b"partial content\r\n")
    c.protocol.connectionLost(Failure(ConnectionDone()))
    [receiver] = c.sink.receivers
    assert receiver.state == "aborted"
    assert c.sink.messages == []
    assert sample(c.metrics, "relayd_smtp_connections_active", {"listener": "test"}) == 0


def test_metrics_move():
    """Connections, accepted messages and rejects by code are counted."""
    c = Conversation(OUTSIDER, mynetworks=["192.0.2.0/28"])
    labels = {"listener": "test"}
    assert sample(c.metrics, "relayd_smtp_connections_total", labels) == 1
    assert sample(c.metrics, "relayd_smtp_connections_active", labels) == 1
    c.transaction()
    c.send(b"x\r\n.\r\n")
    c.transaction()
    c.send(b"y\r\n.\r\n")
    assert received(c) == 2
    c.send("BOGUS\r\nMAIL FROM:<a@example.org> SIZE=99999999999\r\n")
    assert rejects(c, "502") == 1
    assert rejects(c, "552") == 1
    outsider = Conversation("203.0.113.9")
    outsider.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    assert rejects(outsider, "550") == 1
    assert received(outsider) == 0


# -- robustness findings ---------------------------------------------------------------------


def test_helo_with_control_characters_never_reaches_the_envelope():
    """A HELO name with a bare CR is refused or sanitised, never recorded as sent."""
    c = Conversation()
    c.send(b"EHLO evil.example\rX-Injected: yes\r\n")
    c.transaction()
    c.send(b"x\r\n.\r\n")
    [m] = c.sink.messages
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in m.helo), repr(m.helo)


def test_replies_to_a_client_that_never_reads_are_bounded():
    """With TCP-like back-pressure the server stops reading instead of buffering replies."""
    c = Conversation(transport_class=BackpressureTransport)
    chunk = b"EHLO x\r\n" * 500
    for _ in range(60):  # 240 KB of commands, ~3 MB of replies if nothing pushes back
        if c.transport.producerState == "paused":
            break  # the reactor would stop reading the socket here
        c.protocol.dataReceived(chunk)
    assert c.transport.buffered <= 256 * 1024
    c.transport.read()
    assert c.transport.producerState == "producing"


def test_backpressure_transport_fake_pushes_back():
    """The fake calls pauseProducing on a streaming producer over bufferSize, resumes on read."""
    calls = []

    class Producer:
        def pauseProducing(self):
            calls.append("pause")

        def resumeProducing(self):
            calls.append("resume")

        def stopProducing(self):
            calls.append("stop")

    t = BackpressureTransport()
    t.registerProducer(Producer(), True)
    t.write(b"x" * t.bufferSize)
    assert calls == []
    t.write(b"x")
    t.write(b"x")
    assert calls == ["pause"]
    assert len(t.read()) == t.bufferSize + 2
    assert calls == ["pause", "resume"]


def test_recording_sink_contract_checks():
    """The fake receiver refuses a second finish/abort, so protocol bugs surface."""
    sink = RecordingSink()
    c = Conversation(sink=sink)
    c.transaction()
    receiver = sink.receivers[0]
    c.send(b".\r\n")
    with pytest.raises(AssertionError):
        receiver.abort()
    with pytest.raises(AssertionError):
        receiver.write(b"late")


def test_message_rate_per_client_ip():
    """messages_per_ip: MAIL past the rate gets 450 4.7.1; the bucket refills with time."""
    c = Conversation(messages_per_ip="2/m")
    c.send("EHLO client.test\r\n")
    for _ in range(2):
        assert c.send("MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0 Ok"]
        c.send("RSET\r\n")
    assert c.send("MAIL FROM:<a@example.org>\r\n") == [
        "450 4.7.1 Error: too much mail from 127.0.0.1"]
    c.clock.advance(30)
    assert c.send("MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0 Ok"]
    assert sample(c.metrics, "relayd_smtp_rejects_total", {"listener": c.listener.name,
                                                            "code": "450"}) == 1


def _second_session(first, client_ip="127.0.0.1"):
    """Another connection to the same listener (same factory, same counters)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    proto = first.protocol.factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", client_ip, 4242))
    proto.makeConnection(transport)
    return proto, transport


def test_max_connections_overall_and_per_ip():
    """Past max_connections / max_connections_per_ip: 421 4.7.0 and close; a slot frees."""
    c = Conversation(max_connections=2, max_connections_per_ip=1)
    refused, same_ip = _second_session(c)
    assert same_ip.value().startswith(b"421 4.7.0 relay.test Error: too many connections from")
    assert same_ip.disconnecting
    refused.connectionLost(None)  # the transport reports the close
    other, other_t = _second_session(c, "127.0.0.2")
    assert other_t.value().startswith(b"220 ")
    refused_too, third = _second_session(c, "127.0.0.3")
    assert third.value().startswith(b"421 4.7.0 relay.test Error: too many connections")
    for proto in (refused_too, other):
        proto.connectionLost(None)
    _, fourth = _second_session(c, "127.0.0.4")
    assert fourth.value().startswith(b"220 ")


def test_recipient_overshoot_eventually_counts_as_errors():
    """Endless RCPTs past max_recipients end the session once the overshoot limit is spent."""
    c = Conversation(max_recipients=1)
    c.send("EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    replies = c.send("RCPT TO:<x@example.net>\r\n" * 1100)
    assert replies.count("452 4.5.3 Error: too many recipients") > 1000
    assert replies[-1] == "421 4.7.0 relay.test Error: too many errors"
    assert c.transport.disconnecting
