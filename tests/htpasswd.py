"""htpasswd files for tests, made one way everywhere: written in Python
(bcrypt at the cheapest cost, or Apache's unsalted ``{SHA}``), or by Apache's
own ``htpasswd`` tool (apache2-utils) where the test is about its output."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import bcrypt
import pytest

HTPASSWD = shutil.which("htpasswd")


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    """A ``$2b$`` hash; 4 rounds (bcrypt's minimum) keeps the tests fast."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def sha_hash(password: str) -> str:
    """Apache's ``{SHA}`` form: base64 of the unsalted SHA-1 digest."""
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def write_users(path: Path, users: dict[str, str], scheme: str = "bcrypt") -> Path:
    """Write ``user:hash`` lines for ``users`` (name -> password) to ``path``."""
    make = {"bcrypt": bcrypt_hash, "sha": sha_hash}[scheme]
    path.write_text("".join(f"{user}:{make(password)}\n" for user, password in users.items()))
    return path


def htpasswd_tool(*args: str) -> None:
    """Run Apache's htpasswd with ``args``; the test is skipped without it."""
    if HTPASSWD is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    subprocess.run([HTPASSWD, *args], check=True, capture_output=True)
