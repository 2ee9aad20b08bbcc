"""The refresh-token file (``refresh_token_file``): JSON
``{"refresh_token": "..."}``, mode 0600.

Microsoft rotates refresh tokens: the new one must be on disk before the
access token that came with it is used, or a crash loses the only valid
refresh token (sasl-xoauth2 and ralphex users lose theirs that way).  So a
write is a temp file in the same directory, fsynced, renamed over the old
one, and the directory fsynced: a crash (SIGKILL) at any step leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os


def read_refresh_token(path: str) -> str | None:
    """The stored refresh token, or None if the file does not exist.

    :raises ValueError: the file exists but holds no token (named in the text).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text).get("refresh_token")
        except (ValueError, AttributeError):
            value = None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: not JSON with a \"refresh_token\" string")
        return value
    if not text or "\n" in text:
        raise ValueError(f"{path}: expected one refresh token (or JSON)")
    return text


def write_refresh_token(path: str, token: str) -> None:
    """Replace the stored token atomically (temp, fsync, rename, fsync dir),
    mode 0600 from the moment the file exists."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = json.dumps({"refresh_token": token}).encode() + b"\n"
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
