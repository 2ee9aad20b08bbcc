"""relayd.bounce: the DSN is checked the way a receiver sees it, parsed back with ``email``.

The ``email`` parser only splits ``message/delivery-status`` into its blocks;
the RFC 6533 ``global`` types it treats as one embedded message.  So the
delivery-status fields are also parsed by hand from the raw part (unfold,
split at blank lines), which checks the exact bytes on the wire as well.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import EmailMessage

import pytest

from relayd.bounce import (
    build_dsn,
    diagnostic_status,
    is_bounce,
)
from relayd.envelope import Envelope, RecipientResult

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.25
QID = "0123456789ABCDEF0123"
HOST = "relay.example.org"

ORIGINAL = (
    b"Received: from client.example.org by relay.example.org\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <abc@example.org>\r\n"
    b"\r\n"
    b"The secret body text.\r\n"
    b"Second line.\r\n"
)


def envelope(sender: str = "alice@example.org", recipients=("bob@example.net",), **kw) -> Envelope:
    return Envelope(
        sender=sender, recipients=tuple(recipients), route="default", arrival=ARRIVAL, **kw
    )


def result(rcpt: str = "bob@example.net", reply: str = "550 5.1.1 <bob@example.net>: User unknown"):
    return RecipientResult(recipient=rcpt, status="bounced", reply=reply)


def dsn(**kw) -> bytes:
    args = dict(
        queue_id=QID,
        envelope=envelope(),
        failed=[result()],
        content=ORIGINAL,
        reporting_mta=HOST,
        bounce_from=f"MAILER-DAEMON@{HOST}",
        now=NOW,
    )
    args.update(kw)
    return build_dsn(**args)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def raw_parts(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(header section, body) of each top-level MIME part, split at the boundary by hand."""
    boundary = parse(raw).get_boundary()
    assert boundary
    delim = b"\r\n--" + boundary.encode()
    pieces = raw.split(delim)
    assert pieces[-1] == b"--\r\n", "the close delimiter ends the message"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        head, _, body = piece[2:].partition(b"\r\n\r\n")
        parts.append((head, body))
    return parts


def status_blocks(raw: bytes) -> list[dict[str, str]]:
    """The delivery-status part as field blocks: per-message first, then per recipient."""
    _, body = raw_parts(raw)[1]
    text = body.decode("utf-8")
    blocks = []
    for chunk in re.split(r"\r\n\r\n", text.strip("\r\n")):
        unfolded = re.sub(r"\r\n(?=[ \t])", "", chunk)
        fields = {}
        for line in unfolded.split("\r\n"):
            name, _, value = line.partition(":")
            assert name and value, line
            fields[name.strip().lower()] = value.strip()
        blocks.append(fields)
    return blocks


def all_lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n")
    return raw[:-2].split(b"\r\n")


def assert_wire_safe(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in all_lines(raw)) <= 998


# -- structure -----------------------------------------------------------------


def test_multipart_report_with_three_parts():
    msg = parse(dsn())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects
    assert all(not p.defects for p in msg.walk())


def test_top_level_headers():
    msg = parse(dsn())
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime.timestamp() == int(NOW)
    assert msg["Date"].datetime.utcoffset().total_seconds() == 0
    message_id = msg["Message-ID"]
    assert message_id.startswith("<") and message_id.endswith(f"@{HOST}>")
    assert QID in message_id


def test_message_id_unique_per_time_and_message():
    ids = {
        parse(dsn(now=NOW))["Message-ID"],
        parse(dsn(now=NOW + 0.001))["Message-ID"],
        parse(dsn(queue_id="0123456789ABCDEF0124"))["Message-ID"],
    }
    assert len(ids) == 3


def test_bounce_from_defaults_to_mailer_daemon():
    msg = parse(dsn(bounce_from=""))
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"


def test_deterministic():
    assert dsn() == dsn()


def test_notification_text_in_postfix_words():
    text = parse(dsn(remote_mta="mx.example.net[192.0.2.1]:25")).get_body(("plain",)).get_content()
    assert f"This is the mail system at host {HOST}." in text
    assert "I'm sorry to have to inform you that your message could not" in text
    assert "<bob@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1" in text


def test_notification_without_remote_mta():
    text = (
        parse(dsn(failed=[result(reply="554 5.4.7 delivery time expired")]))
        .get_body(("plain",))
        .get_content()
    )
    assert "<bob@example.net>: 554 5.4.7 delivery time expired" in text
    assert "said:" not in text


# -- the delivery-status part ----------------------------------------------------


def test_per_message_fields():
    per_message = status_blocks(dsn())[0]
    assert per_message["reporting-mta"] == f"dns; {HOST}"
    assert per_message["x-relayd-queue-id"] == QID
    assert email.utils.parsedate_to_datetime(per_message["arrival-date"]).timestamp() == ARRIVAL


def test_per_recipient_fields_from_enhanced_code():
    raw = dsn(remote_mta="mx.example.net[192.0.2.1]:25")
    blocks = status_blocks(raw)
    assert len(blocks) == 2
    rcpt = blocks[1]
    assert rcpt["final-recipient"] == "rfc822; bob@example.net"
    assert "original-recipient" not in rcpt
    assert rcpt["action"] == "failed"
    assert rcpt["status"] == "5.1.1"
    assert rcpt["remote-mta"] == "dns; mx.example.net"
    assert rcpt["diagnostic-code"] == "smtp; 550 5.1.1 <bob@example.net>: User unknown"
    # the email package reads the same blocks
    ds = list(parse(raw).iter_parts())[1]
    parsed = ds.get_payload()
    assert parsed[0]["Reporting-MTA"] == f"dns; {HOST}"
    assert parsed[1]["Final-Recipient"] == "rfc822; bob@example.net"
    assert parsed[1]["Status"] == "5.1.1"


def test_remote_mta_forms():
    rcpt = status_blocks(dsn(remote_mta="[192.0.2.1]:2525"))[1]
    assert rcpt["remote-mta"] == "dns; [192.0.2.1]"
    rcpt = status_blocks(dsn(remote_mta="smtp.example.net"))[1]
    assert rcpt["remote-mta"] == "dns; smtp.example.net"
    raw = dsn(remote_mta="maildir:/var/lib/relayd/outbox")
    assert "remote-mta" not in status_blocks(raw)[1]


def test_status_derived_from_basic_code():
    rcpt = status_blocks(dsn(failed=[result(reply="554 no")]))[1]
    assert rcpt["status"] == "5.0.0"
    assert rcpt["diagnostic-code"] == "smtp; 554 no"
    assert "remote-mta" not in rcpt


@pytest.mark.parametrize(
    ("reply", "default", "expected"),
    [
        ("550 5.1.1 <x@y>: User unknown", "5", "5.1.1"),
        ("554 no", "5", "5.0.0"),
        ("451 4.3.0 try later", "5", "4.3.0"),
        ("421 closing", "5", "4.0.0"),
        ("552-5.2.2 mailbox full", "5", "5.2.2"),
        ("550 4.2.2 mismatched class", "5", "5.2.2"),  # the basic code wins
        ("550 5.7.100 three digits", "5", "5.7.100"),
        ("550 5.1.1.1 not an enhanced code", "5", "5.0.0"),
        ("5.4.7 delivery time expired", "5", "5.4.7"),
        ("connect to mx: Connection refused", "5", "5.0.0"),
        ("connect to mx: Connection refused", "4", "4.0.0"),
        ("", "5", "5.0.0"),
    ],
)
def test_diagnostic_status(reply, default, expected):
    assert diagnostic_status(reply, default) == expected


def test_non_smtp_reply_is_not_labelled_smtp():
    rcpt = status_blocks(
        dsn(failed=[result(reply="connect to mx.example.net: Connection refused")])
    )[1]
    assert rcpt["status"] == "5.0.0"
    assert rcpt["diagnostic-code"] == "X-Relayd; connect to mx.example.net: Connection refused"


def test_several_recipients_each_get_a_block():
    failed = [
        result("bob@example.net", "550 5.1.1 <bob@example.net>: User unknown"),
        result("carol@example.net", "554 no"),
        result("dave@example.net", "552 5.2.2 Mailbox full"),
    ]
    raw = dsn(envelope=envelope(recipients=[r.recipient for r in failed]), failed=failed)
    blocks = status_blocks(raw)[1:]
    assert [b["final-recipient"] for b in blocks] == [f"rfc822; {r.recipient}" for r in failed]
    assert [b["status"] for b in blocks] == ["5.1.1", "5.0.0", "5.2.2"]
    assert all(b["action"] == "failed" for b in blocks)
    text = parse(raw).get_body(("plain",)).get_content()
    for r in failed:
        assert f"<{r.recipient}>: {r.reply}" in text


def test_expired_message_keeps_its_transient_status():
    rcpt = status_blocks(dsn(failed=[result(reply="451 4.4.1 no answer")]))[1]
    assert rcpt["action"] == "failed"
    assert rcpt["status"] == "4.4.1"


def test_long_diagnostic_is_folded():
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(120))
    raw = dsn(failed=[result(reply=reply)])
    _, body = raw_parts(raw)[1]
    diag = [line for line in body.split(b"\r\n")]
    start = next(i for i, line in enumerate(diag) if line.startswith(b"Diagnostic-Code:"))
    folded = [diag[start]]
    for line in diag[start + 1 :]:
        if not line.startswith(b" "):
            break
        folded.append(line)
    assert len(folded) > 5
    assert all(len(line) <= 78 for line in folded)
    # folding only inserted CRLF before spaces: unfolding gives the reply back
    assert status_blocks(raw)[1]["diagnostic-code"] == f"smtp; {reply}"
    assert list(parse(raw).iter_parts())[1].get_payload()[1]["Diagnostic-Code"] == f"smtp; {reply}"


def test_unbreakable_diagnostic_still_fits_998():
    reply = "550 5.7.1 " + "x" * 3000
    raw = dsn(failed=[result(reply=reply)])
    assert_wire_safe(raw)
    diag = status_blocks(raw)[1]["diagnostic-code"]
    assert diag.replace(" ", "").endswith("x" * 3000)


def test_multiline_reply_cannot_inject_fields_or_boundaries():
    msg0 = parse(dsn())
    boundary = msg0.get_boundary()
    reply = f"550 5.1.1 bad\r\nAction: delivered\r\n\r\n--{boundary}--\nStatus: 2.0.0"
    raw = dsn(failed=[result(reply=reply)])
    assert_wire_safe(raw)
    msg = parse(raw)
    assert msg.get_boundary() != boundary
    assert len(list(msg.iter_parts())) == 3
    blocks = status_blocks(raw)
    assert len(blocks) == 2
    assert blocks[1]["action"] == "failed"
    assert blocks[1]["status"] == "5.1.1"


# -- the returned message ----------------------------------------------------------


def test_headers_mode_returns_the_header_section_only():
    raw = dsn()
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    returned = raw_parts(raw)[2][1]
    assert returned == ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]
    assert b"Subject: quarterly numbers" in returned
    assert b"secret body" not in raw


def test_full_mode_returns_the_whole_message():
    raw = dsn(return_content="full")
    msg = parse(raw)
    part = list(msg.iter_parts())[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_content()
    assert inner["Subject"] == "quarterly numbers"
    assert "The secret body text." in inner.get_content()
    assert raw_parts(raw)[2][1] == ORIGINAL


def test_bare_line_ends_in_content_become_crlf():
    content = b"Subject: x\nFrom: a@b\r\n\nbody\rmore\n"
    raw = dsn(content=content, return_content="full")
    assert_wire_safe(raw)
    assert raw_parts(raw)[2][1] == b"Subject: x\r\nFrom: a@b\r\n\r\nbody\r\nmore\r\n"
    headers_only = raw_parts(dsn(content=content))[2][1]
    assert headers_only == b"Subject: x\r\nFrom: a@b\r\n"


def test_crlf_only_and_lines_within_998():
    long_header = b"X-Long: " + b"y" * 2500 + b"\r\n"
    long_body_line = b"z" * 5000 + b"\r\n"
    content = ORIGINAL.replace(b"\r\n\r\n", b"\r\n" + long_header + b"\r\n", 1) + long_body_line
    for mode in ("headers", "full"):
        raw = dsn(content=content, return_content=mode)
        assert_wire_safe(raw)
        assert len(list(parse(raw).iter_parts())) == 3
    # the long lines are broken, not truncated (CRLF SPACE, as Postfix does)
    returned = raw_parts(dsn(content=content, return_content="full"))[2][1]
    assert returned.replace(b"\r\n ", b"").count(b"z") == 5000


def test_boundary_never_occurs_in_the_content():
    plain = parse(dsn()).get_boundary()
    hostile = (
        b"Subject: tricky\r\n"
        b'Content-Type: multipart/mixed; boundary="----=_Part_1"\r\n'
        b"\r\n"
        b"------=_Part_1\r\n"
        b"--" + plain.encode() + b"\r\n"
        b"--" + plain.encode() + b"=1--\r\n"
        b"------=_Part_1--\r\n"
    )
    raw = dsn(content=hostile, return_content="full")
    boundary = parse(raw).get_boundary()
    assert boundary not in (plain, plain + "=1")
    assert boundary.encode() not in hostile
    assert "----=_" not in boundary
    assert len(boundary) <= 70
    parts = list(parse(raw).iter_parts())
    assert len(parts) == 3
    assert raw_parts(raw)[2][1] == hostile
    assert b"\r\n--" + boundary.encode() + b"--\r\n" == raw[-(len(boundary) + 8) :]


def test_eight_bit_content_is_declared():
    content = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    raw = dsn(content=content, return_content="full")
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert list(msg.iter_parts())[2]["Content-Transfer-Encoding"] == "8bit"
    assert parse(dsn())["Content-Transfer-Encoding"] == "7bit"


def test_non_ascii_reply_in_an_ascii_dsn():
    raw = dsn(failed=[result(reply="550 5.1.1 Benutzer unbekannt: M\u00fcller")])
    head, body = raw_parts(raw)[1]
    assert body.isascii()
    assert status_blocks(raw)[1]["diagnostic-code"] == "smtp; 550 5.1.1 Benutzer unbekannt: M?ller"
    assert raw_parts(raw)[0][1].isascii()


# -- SMTPUTF8 (RFC 6533) ----------------------------------------------------------------


def test_utf8_recipient_uses_the_global_types():
    rcpt = "b\u00f8b@\u00e9xample.net"
    env = envelope(recipients=[rcpt], smtputf8=True)
    content = (
        f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: h\u00ef\r\n\r\nb\u00f6dy\r\n".encode()
    )
    raw = dsn(
        envelope=env,
        failed=[result(rcpt, f"550 5.1.1 <{rcpt}>: unknown")],
        content=content,
    )
    assert_wire_safe(raw)
    msg = parse(raw)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    block = status_blocks(raw)[1]
    assert block["final-recipient"] == f"utf-8; {rcpt}"
    assert block["diagnostic-code"] == f"smtp; 550 5.1.1 <{rcpt}>: unknown"
    assert status_blocks(raw)[0]["x-relayd-sender"] == "rfc822; alice@example.org"
    text = msg.get_body(("plain",))
    assert text.get_content_charset() == "utf-8"
    assert f"<{rcpt}>" in text.get_content()
    assert raw_parts(raw)[2][1] == content[: content.index(b"\r\n\r\n") + 2]

    full = parse(
        dsn(envelope=env, failed=[result(rcpt, "550 no")], content=content, return_content="full")
    )
    assert list(full.iter_parts())[2].get_content_type() == "message/global"


def test_utf8_sender():
    env = envelope(sender="\u00e4lice@example.org", smtputf8=True)
    raw = dsn(envelope=env)
    msg = parse(raw)
    # the email package reads 8-bit headers as surrogate escapes; check the bytes
    header_section = raw[: raw.index(b"\r\n\r\n") + 2]
    assert "To: <\u00e4lice@example.org>\r\n".encode() in header_section
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert status_blocks(raw)[0]["x-relayd-sender"] == "utf-8; \u00e4lice@example.org"
    assert status_blocks(raw)[1]["final-recipient"] == "rfc822; bob@example.net"


def test_smtputf8_message_with_ascii_addresses_is_returned_as_global():
    raw = dsn(envelope=envelope(smtputf8=True), return_content="full")
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()][1:] == [
        "message/global-delivery-status",
        "message/global",
    ]
    assert status_blocks(raw)[1]["final-recipient"] == "rfc822; bob@example.net"


# -- never bounce a bounce -----------------------------------------------------------------


def test_null_sender_is_a_bounce():
    assert is_bounce(envelope(sender=""))
    assert not is_bounce(envelope())


def test_null_sender_is_never_bounced():
    with pytest.raises(ValueError, match="null sender"):
        dsn(envelope=envelope(sender=""))


@pytest.mark.parametrize(
    "kw",
    [{"return_content": "body"}, {"failed": []}],
)
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        dsn(**kw)
