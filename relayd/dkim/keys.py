"""DKIM private keys: read and checked, generated, and their DNS records.

A key file is PEM, as ``relayd dkim keygen`` writes it (PKCS#8) or as
``openssl genrsa``/``opendkim-genkey`` do (PKCS#1 for RSA).  ``cryptography``
reads both and signs: its RSA is OpenSSL's (dkimpy's own RSA is pure Python,
measured here at 33 ms per RSA-2048 signature against 1.4-4 ms).  The check
that ``check-config`` and ``run`` share is :func:`load_key`, so a key that
one accepts the other does too.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from attrs import field, frozen
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

__all__ = [
    "MIN_RSA_BITS",
    "KeyProblem",
    "SigningKey",
    "generate_key",
    "load_key",
    "txt_record",
    "write_new_key",
    "zone_line",
]

#: RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024
#: The longest string a TXT record's character-string holds (RFC 1035 §3.3).
TXT_STRING = 255


class KeyProblem(Exception):
    """Why a key file cannot be used (the ``reason`` part of a config error)."""


@frozen
class SigningKey:
    """A private key ready to sign, with what the signature says about it.

    :param algorithm: the ``a=`` tag: ``rsa-sha256`` or ``ed25519-sha256``.
    :param signature_size: bytes of every signature it makes (fixed: the
        RSA modulus length, or 64 for Ed25519), which fixes the length of
        the DKIM-Signature header before the message is complete.
    """

    algorithm: str
    signature_size: int
    bits: int
    private: Any = field(repr=False, eq=False)

    def sign(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest: RSASSA-PKCS1-v1_5 for RSA (RFC 6376
        §3.3.1), PureEdDSA over the digest for Ed25519 (RFC 8463 §3)."""
        if self.algorithm == "rsa-sha256":
            signature: bytes = self.private.sign(
                digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        else:
            signature = self.private.sign(digest)
        if len(signature) != self.signature_size:
            raise ValueError(f"signature of {len(signature)} bytes, {self.signature_size} expected")
        return signature

    def public_record(self) -> str:
        """The TXT record value: ``v=DKIM1; k=rsa; p=...``."""
        public = self.private.public_key()
        if self.algorithm == "rsa-sha256":
            kind = "rsa"
            der = public.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
        else:
            # RFC 8463 §4.2: the raw 32-byte public key, not SubjectPublicKeyInfo.
            kind = "ed25519"
            der = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k={kind}; p={base64.b64encode(der).decode('ascii')}"


def _from_private(private: Any) -> SigningKey:
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise KeyProblem(
                f"RSA key of {private.key_size} bits (at least {MIN_RSA_BITS}: RFC 8301)")
        return SigningKey("rsa-sha256", (private.key_size + 7) // 8, private.key_size, private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return SigningKey("ed25519-sha256", 64, 256, private)
    raise KeyProblem(f"a {type(private).__name__.lstrip('_')} key: DKIM signs with RSA or Ed25519")


def load_key(path: str) -> SigningKey:
    """Read and check a private key file.

    :raises KeyProblem: unreadable, not a PEM private key (a public key, a
        certificate, an encrypted key), RSA under 1024 bits, another type.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1024 * 1024)
    except OSError as e:
        raise KeyProblem(f"cannot read {path}: {e.strerror or e}") from e
    if b"-----BEGIN" not in data:
        raise KeyProblem(f"{path} is not a PEM private key")
    if b"PRIVATE KEY-----" not in data:
        raise KeyProblem(f"{path} holds no private key (a public key or certificate?)")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise KeyProblem(f"{path}: encrypted keys are not supported") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyProblem(f"{path} is not a usable PEM private key: {e}") from e
    return _from_private(private)


def generate_key(algorithm: str, bits: int = 2048) -> SigningKey:
    """A new key: ``rsa`` of ``bits`` (at least 1024) or ``ed25519``."""
    if algorithm == "rsa":
        if bits < MIN_RSA_BITS:
            raise KeyProblem(f"--bits {bits}: at least {MIN_RSA_BITS} (RFC 8301)")
        return _from_private(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    if algorithm == "ed25519":
        return _from_private(ed25519.Ed25519PrivateKey.generate())
    raise KeyProblem(f"unknown algorithm {algorithm!r} (rsa or ed25519)")


def write_new_key(key: SigningKey, path: str) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600; never over an existing file.

    ``O_EXCL`` refuses an existing name (or a symlink planted there), and
    the mode is set at creation, so the key is never readable by others.
    """
    pem = key.private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def zone_line(domain: str, selector: str, key: SigningKey) -> str:
    """The record as one zone-file line, its value split into strings of at
    most 255 bytes (an RSA-2048 key's ``p=`` alone is 392)::

        s2026._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=MIIB..." "..."
    """
    record = key.public_record()
    strings = [record[i : i + TXT_STRING] for i in range(0, len(record), TXT_STRING)]
    quoted = " ".join(f'"{s}"' for s in strings)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT {quoted}"


def txt_record(domain: str, selector: str, key: SigningKey) -> tuple[str, list[bytes]]:
    """The record's owner name and its character-strings, as a DNS server
    serves them (for tests and for checking a published record)."""
    record = key.public_record().encode("ascii")
    return (f"{selector}._domainkey.{domain.rstrip('.')}",
            [record[i : i + TXT_STRING] for i in range(0, len(record), TXT_STRING)])
