"""The streaming relaxed body hash against dkimpy's whole-body one."""

from __future__ import annotations

import base64
import hashlib

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd.dkim.bodyhash import RelaxedBodyHash

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


def dkimpy_hash(body: bytes) -> bytes:
    return hashlib.sha256(RELAXED.canonicalize_body(body)).digest()


def streamed(body: bytes, cuts: list[int]) -> bytes:
    h = RelaxedBodyHash()
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        h.update(body[start:cut])
        start = max(start, cut)
    h.update(body[start:])
    return h.digest()


#: What a body that cleanup spools is made of: CRLF line ends only (the
#: server normalises bare CR and LF), whitespace runs, 8-bit text, dots.
TOKENS = st.sampled_from([b"\r\n", b" ", b"\t", b"a", b"xyz", b".", b"\xc3\xa9", b"\x00"])
BODIES = st.lists(TOKENS, max_size=60).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(BODIES, st.lists(st.integers(0, 400), max_size=8))
@example(b"", [])
@example(b"\r\n", [])
@example(b"\r\n\r\n\r\n", [1, 3])
@example(b"abc", [])
@example(b"abc \t ", [4])
@example(b" \r\n", [1])
@example(b"a  b \r\n\r\n", [2, 6])
@example(b"..dot-stuffed\r\n.\r\n", [])
def test_streamed_hash_equals_dkimpy(body: bytes, cuts: list[int]) -> None:
    assert streamed(body, cuts) == dkimpy_hash(body)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b" ", b"a"]), max_size=30).map(b"".join),
       st.lists(st.integers(0, 40), max_size=5))
def test_bare_cr_is_text_as_in_dkimpy(body: bytes, cuts: list[int]) -> None:
    assert streamed(body, cuts) == dkimpy_hash(body)


def test_one_byte_at_a_time() -> None:
    body = b"Hello  \t world \r\n\r\n  indented\r\n\r\n\r\n"
    h = RelaxedBodyHash()
    for i in range(len(body)):
        h.update(body[i : i + 1])
    assert h.digest() == dkimpy_hash(body)


def test_empty_body_is_the_hash_of_nothing() -> None:
    # RFC 6376 §3.4.4: an empty body (or one of empty lines) hashes as "".
    assert RelaxedBodyHash().digest() == hashlib.sha256(b"").digest()
    h = RelaxedBodyHash()
    h.update(b"\r\n" * 100_000)
    assert h.digest() == hashlib.sha256(b"").digest()


def test_many_blank_lines_then_text() -> None:
    body = b"\r\n" * 100_000 + b"end\r\n"
    h = RelaxedBodyHash()
    h.update(body[:7])
    h.update(body[7:])
    assert h.digest() == dkimpy_hash(body)


def test_bh_of_a_signed_message_matches_dkimpy() -> None:
    """The bh= that dkimpy itself writes, for an ordinary message."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    body = b"Line one  \r\n\tTabbed\r\n\r\n\r\n"
    message = b"From: a@example.org\r\nSubject: x\r\n\r\n" + body
    header = dkim.DKIM(message).sign(b"s", b"example.org", key,
                                     canonicalize=(b"relaxed", b"relaxed"))
    fields = dict(f.strip().split(b"=", 1) for f in header.split(b":", 1)[1].split(b";"))
    bh = b"".join(fields[b"bh"].split())
    h = RelaxedBodyHash()
    h.update(body)
    assert base64.b64decode(bh) == h.digest()
