"""The htpasswd backend reading files written by Apache's own htpasswd tool
(apache2-utils): bcrypt at two costs, apr1, {SHA}; plaintext and crypt() refused;
apr1 as OpenSSL computes it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from relayd.auth.htpasswd import apr1_crypt
from relayd.interfaces import IAuthBackend
from tests.htpasswd import htpasswd_tool
from tests.unit.test_auth_htpasswd import backend, ok, texts

# -- formats written by Apache's htpasswd -------------------------------------


def test_real_htpasswd_formats(tmp_path: Path, auth_events: list[dict[str, Any]]) -> None:
    f = tmp_path / "users"
    htpasswd_tool("-B", "-b", "-c", str(f), "bob", "b-secret")
    htpasswd_tool("-B", "-C", "10", "-b", str(f), "bob10", "b10-secret")
    htpasswd_tool("-m", "-b", str(f), "martha", "m-secret")
    htpasswd_tool("-s", "-b", str(f), "sam", "s-secret")
    assert "$2y$" in f.read_text()
    b = backend(f)
    verifyObject(IAuthBackend, b)
    for user, password in [("bob", "b-secret"), ("bob10", "b10-secret"),
                           ("martha", "m-secret"), ("sam", "s-secret")]:
        assert ok(b, user, password), user
        assert not ok(b, user, password + "x"), user
        assert not ok(b, user, password.upper()), user
    # Names are exact, as in Apache.
    assert not ok(b, "Bob", "b-secret")
    # The unsalted {SHA} line is accepted with one warning naming the file.
    warnings = [t for t in texts(auth_events) if "unsalted" in t]
    assert len(warnings) == 1 and f"{f}: " in warnings[0] and "line(s) 4" in warnings[0]


def test_real_htpasswd_plaintext_and_crypt_refused(tmp_path: Path,
                                                   auth_events: list[dict[str, Any]]) -> None:
    f = tmp_path / "users"
    htpasswd_tool("-B", "-b", "-c", str(f), "good", "g-secret")
    htpasswd_tool("-p", "-b", str(f), "plain", "p-secret")
    htpasswd_tool("-d", "-b", str(f), "des", "d-secret")
    b = backend(f)
    assert ok(b, "good", "g-secret")
    # Neither the password nor the stored string itself gets in.
    lines = dict(line.split(":", 1) for line in f.read_text().splitlines())
    assert not ok(b, "plain", "p-secret")
    assert not ok(b, "des", "d-secret")
    assert not ok(b, "des", lines["des"])
    warned = texts(auth_events)
    assert any(f"{f}:2:" in t and "plain" in t and "plaintext" in t for t in warned), warned
    assert any(f"{f}:3:" in t and "des" in t and "crypt()" in t for t in warned), warned


def test_apr1_matches_openssl() -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl missing")
    out = subprocess.run([openssl, "passwd", "-apr1", "-salt", "s4lt", "a" * 40],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert apr1_crypt(b"a" * 40, b"s4lt") == out
