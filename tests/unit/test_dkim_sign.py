"""DKIM signing without a relay: keys, keygen, the signature header, dkimpy's verdict."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.cli import main
from relayd.dkim.keys import KeyProblem, SigningKey, generate_key, load_key, zone_line
from relayd.dkim.signer import DomainKey, Signer, SigningFailed
from tests.dkimtools import dkimpy_results, keygen

HEAD = (b"Received: from client ([127.0.0.1])\r\n\tby relay (relayd) with ESMTP id 1; now\r\n"
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
        b"Date: Thu, 03 Dec 2026 21:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n")
BODY = b"\r\nHello  Bob,\r\n\r\n  regards\r\n\r\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[SigningKey, str]]:
    d = tmp_path_factory.mktemp("keys")
    made = {}
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519"), ("rsa2", "rsa")):
        path, line = keygen(d, "example.org", selector, algorithm)
        made[selector] = (load_key(str(path)), line)
    return made


def sign(message_head: bytes, body: bytes, entries: list[DomainKey],
         counted: list[tuple[str, str, str]] | None = None) -> bytes | None:
    signer = Signer(entries, lambda *a: counted.append(a) if counted is not None else None)
    plan = signer.plan(message_head, 1_764_795_600.25)
    if plan is None:
        return None
    data = message_head + body
    for i in range(0, len(data), 7):
        plan.update(data[i : i + 7])
    signatures = plan.signatures()
    assert len(signatures) == len(plan.placeholder)
    return signatures + data


def entry(keys: dict, selector: str, domain: str = "example.org") -> DomainKey:
    return DomainKey(domain, selector, keys[selector][0])


def zone(keys: dict) -> list[str]:
    return [line for _, line in keys.values()]


def test_rsa_signature_verifies_with_dkimpy(keys) -> None:
    signed = sign(HEAD, BODY, [entry(keys, "rsa1")])
    assert signed is not None
    header = signed.split(b"\r\n\r\n")[0].decode()
    assert "a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=rsa1;" in header
    assert "t=1764795600;" in header
    h = re.search(r"h=([^;]*);", header).group(1).replace("\r\n\t", "")
    assert h == "from:to:subject:date:message-id:from"
    assert all(len(line) <= 78 for line in header.split("\r\n"))
    assert dkimpy_results(signed, zone(keys)) == [True]


def test_ed25519_and_dual_signatures_verify(keys) -> None:
    counted: list = []
    signed = sign(HEAD, BODY, [entry(keys, "rsa1"), entry(keys, "ed1")], counted)
    assert signed is not None
    assert signed.count(b"DKIM-Signature:") == 2
    assert b"a=ed25519-sha256" in signed
    assert dkimpy_results(signed, zone(keys)) == [True, True]
    assert counted == [("example.org", "rsa1", "signed"), ("example.org", "ed1", "signed")]


def test_a_from_added_after_signing_breaks_it(keys) -> None:
    signed = sign(HEAD, BODY, [entry(keys, "rsa1"), entry(keys, "ed1")])
    assert signed is not None
    assert dkimpy_results(b"From: mallory@evil.example\r\n" + signed, zone(keys)) == [False, False]
    top, rest = signed.split(b"\r\n\r\n", 1)
    assert dkimpy_results(top + b"\r\nFrom: mallory@evil.example\r\n\r\n" + rest,
                          zone(keys)) == [False, False]


def test_body_changes_break_it_whitespace_does_not(keys) -> None:
    signed = sign(HEAD, BODY, [entry(keys, "rsa1")])
    assert signed is not None
    assert dkimpy_results(signed + b"appended\r\n", zone(keys)) == [False]
    # relaxed/relaxed: refolding and trailing whitespace survive.
    relaxed = signed.replace(b"Subject: hello", b"Subject:   hello  ").replace(
        b"regards\r\n", b"regards \t\r\n")
    assert dkimpy_results(relaxed, zone(keys)) == [True]


def test_only_the_exact_from_domain_is_signed(keys) -> None:
    entries = [entry(keys, "rsa1")]
    sub = HEAD.replace(b"alice@example.org", b"alice@mail.example.org")
    assert sign(sub, BODY, entries) is None
    assert sign(HEAD.replace(b"example.org>", b"EXAMPLE.ORG>"), BODY, entries) is not None
    two_from = HEAD + b"From: x@example.org\r\n"
    assert sign(two_from, BODY, entries) is None
    assert sign(HEAD.replace(b"From:", b"X-From:"), BODY, entries) is None
    assert Signer([]).plan(HEAD, 0) is None


def test_headers_signed_as_often_as_they_occur(keys) -> None:
    head = HEAD + b"To: carol@example.net\r\nCc: dave@example.net\r\nX-Other: 1\r\n" \
        b"Content-Type: text/plain;\r\n charset=utf-8\r\n"
    signed = sign(head, BODY, [entry(keys, "rsa1")])
    assert signed is not None
    h = re.search(rb"h=([^;]*);", signed).group(1).replace(b"\r\n\t", b"")
    assert h == b"from:to:subject:date:message-id:to:cc:content-type:from"
    assert dkimpy_results(signed, zone(keys)) == [True]


@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n\r\n", b"\r\nno final CRLF",
                                  b"\r\n\xc3\xa9t\xc3\xa9 8-bit\r\n", b"\r\n..dot\r\n.\r\n"])
def test_body_edge_cases(keys, body: bytes) -> None:
    signed = sign(HEAD, body, [entry(keys, "rsa1"), entry(keys, "ed1")])
    assert signed is not None
    assert dkimpy_results(signed, zone(keys)) == [True, True]


@settings(max_examples=30, deadline=None)
@given(st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){1,3}", fullmatch=True),
       st.from_regex(r"[a-z0-9_]{1,40}", fullmatch=True), st.integers(0, 4))
def test_signatures_fill_their_reservation_exactly(domain: str, selector: str, tos: int) -> None:
    key = generate_key("ed25519")
    head = f"From: a@{domain}\r\n".encode() + b"To: b@x.example\r\n" * tos
    plan = Signer([DomainKey(domain, selector, key)]).plan(head, 2_000_000_000)
    assert plan is not None
    plan.update(head + b"\r\nbody\r\n")
    assert len(plan.signatures()) == len(plan.placeholder)


def test_a_failing_key_raises_and_is_counted(keys) -> None:
    class Broken:
        def sign(self, *args: object) -> bytes:
            raise ValueError("HSM unplugged")

    bad = SigningKey("rsa-sha256", 256, 2048, Broken())
    counted: list = []
    with pytest.raises(SigningFailed, match="HSM unplugged"):
        sign(HEAD, BODY, [DomainKey("example.org", "bad", bad)], counted)
    assert counted == [("example.org", "bad", "error")]


# -- keys ---------------------------------------------------------------------

def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "k.pem"
    args = ["dkim", "keygen", "--domain", "example.org", "--selector", "s2026", "--out", str(out)]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert line.startswith('s2026._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    before = out.read_bytes()
    assert main(args) == 1
    assert "exists, not overwritten" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert load_key(str(out)).bits == 2048


def test_keygen_ed25519_record(tmp_path: Path, capsys) -> None:
    out = tmp_path / "e.pem"
    assert main(["dkim", "keygen", "--domain", "example.org.", "--selector", "e",
                 "--algorithm", "ed25519", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r'e\._domainkey\.example\.org\. IN TXT "v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="',
                        line)
    assert load_key(str(out)).algorithm == "ed25519-sha256"


def test_keygen_refuses_small_rsa(tmp_path: Path, capsys) -> None:
    assert main(["dkim", "keygen", "--domain", "example.org", "--selector", "s", "--bits", "512",
                 "--out", str(tmp_path / "k")]) == 1
    assert "at least 1024" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


#: cryptography >= 42 refuses to make keys under 1024 bits: one made by openssl.
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAuS8YilGwUvyrrnS/
Ewb7JOfzQDcUH5aZTnjyHtcW3+9WOcTKRu07wKThbW3EWYB8RNQyNVMmWjnERIsS
in+bKwIDAQABAkBhlhfwjCvHD6/JN2yZskwWnsTpSh0oqEwRtlqhNeewCaKDAqm7
cZnJ3yDr95dTMxfIzsGQkV6AJMBTlIsJAgrBAiEA2wFZ5GkG2ZnuBs8PbqZiq5yo
+unbNc9z5crsIYjeGi8CIQDYdy2qKlBBVRSWV0Nyf76Oct5YVIUNSqUhuCWQTjWb
xQIgKoDNoF2dvbd5EYs39IKIHcQuq1uddokHdi52u19js3MCIF98KtOOOLqo+hzb
P3BJc1hIyVWzasGTNMZsAX3nUfR1AiEAwP/W2m3zOfD4Q+s8VM48K0VjvdAg37rN
2c7Aa8aHWZY=
-----END PRIVATE KEY-----
"""


def _pem(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.mark.parametrize("content,reason", [
    (None, "cannot read"),
    (b"hello", "is not a PEM private key"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "holds no private key"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a usable PEM"),
    ("rsa512", "RSA key of 512 bits"),
    ("ec", "DKIM signs with RSA or Ed25519"),
])
def test_load_key_says_why_not(tmp_path: Path, content: object, reason: str) -> None:
    path = tmp_path / "key.pem"
    if content == "rsa512":
        path.write_bytes(RSA_512)
    elif content == "ec":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    elif content is not None:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(KeyProblem, match=reason):
        load_key(str(path))


def test_pkcs1_rsa_keys_are_read(tmp_path: Path) -> None:
    """Keys from ``openssl genrsa`` or ``opendkim-genkey`` (PKCS#1) work too."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "pkcs1.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    loaded = load_key(str(path))
    assert (loaded.algorithm, loaded.bits, loaded.signature_size) == ("rsa-sha256", 1024, 128)
    assert zone_line("example.org", "old", loaded).count('"') == 2
