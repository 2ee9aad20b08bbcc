"""The htpasswd backend: formats written by Python (files from Apache's own
htpasswd tool: tests/integration/test_auth_htpasswd_tool.py), refusals,
constant work for unknown users, reloads, senders_file."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from relayd.auth import BackendUnavailable, make_backend
from relayd.auth import htpasswd as mod
from relayd.auth.htpasswd import HtpasswdBackend, apr1_crypt, parse_senders
from relayd.config import AuthBackendConfig
from relayd.errors import ConfigError
from tests.htpasswd import write_users


def result_of(d: Deferred[Any]) -> Any:
    """The synchronous result of a Deferred (the tests' runners are inline)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred[Any]) -> Failure:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out!r}"
    return out[0]


class Runner:
    """An inline runner that records what it ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append(f.__name__)
        return maybeDeferred(f, *args)


def texts(auth_events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in auth_events]


def config(path: Path, senders: Path | None = None) -> AuthBackendConfig:
    return AuthBackendConfig(
        name="apps", type="htpasswd", file=str(path),
        senders_file=None if senders is None else str(senders),
    )


def backend(path: Path, senders: Path | None = None, clock: task.Clock | None = None,
            runner: Runner | None = None) -> HtpasswdBackend:
    return HtpasswdBackend(config(path, senders), clock or task.Clock(), runner or Runner())


def ok(b: HtpasswdBackend, user: str, password: str) -> bool:
    d = b.authenticate(user, password)
    out: list[Any] = []
    d.addBoth(out.append)
    if isinstance(out[0], Failure):
        out[0].trap(UnauthorizedLogin)
        return False
    assert out[0] == user
    return True


# -- hashes made in Python ----------------------------------------------------


def test_python_made_hashes(tmp_path: Path) -> None:
    f = tmp_path / "users"
    b2b = bcrypt.hashpw(b"two-b", bcrypt.gensalt(4)).decode()
    b2a = bcrypt.hashpw(b"two-a", bcrypt.gensalt(4, prefix=b"2a")).decode()
    b2y = "$2y$" + bcrypt.hashpw(b"two-y", bcrypt.gensalt(4)).decode()[4:]
    apr = apr1_crypt("pässwort".encode(), b"abcdefgh")
    sha = "{SHA}" + base64.b64encode(hashlib.sha1(b"shaw").digest()).decode()
    f.write_text(
        "# comment\n\n"
        f"b:{b2b}\na:{b2a}\ny:{b2y}\nu:{apr}\ns:{sha}\n"
        "  # indented comment\n"
    )
    b = backend(f)
    assert ok(b, "b", "two-b") and not ok(b, "b", "two-a")
    assert ok(b, "a", "two-a") and not ok(b, "a", "two-b")
    assert ok(b, "y", "two-y") and not ok(b, "y", "two-b")
    assert ok(b, "u", "pässwort") and not ok(b, "u", "passwort")
    assert ok(b, "s", "shaw") and not ok(b, "s", "shaw ")


def test_long_bcrypt_password_truncated_like_apache(tmp_path: Path) -> None:
    # bcrypt < 5 and Apache use the first 72 bytes; bcrypt 5 raises instead.
    secret = b"x" * 72
    f = tmp_path / "users"
    f.write_text(f"long:{bcrypt.hashpw(secret, bcrypt.gensalt(4)).decode()}\n")
    b = backend(f)
    assert ok(b, "long", "x" * 72)
    assert ok(b, "long", "x" * 100)
    assert not ok(b, "long", "x" * 71)


def test_corrupt_hashes_refused(tmp_path: Path, auth_events: list[dict[str, Any]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "users"
    f.write_text("short:$2b$10$tooshort\nbadsha:{SHA}bm90IGEgZGlnZXN0\nnocolon\n"
                 "weird:hunter2\n")
    b = backend(f)
    assert not ok(b, "short", "x")
    assert not ok(b, "weird", "hunter2")
    warned = texts(auth_events)
    for n in (1, 2, 3, 4):
        assert any(f"{f}:{n}:" in t for t in warned), (n, warned)
    # A hash that passes the syntax check but that bcrypt rejects is a wrong
    # password for that entry, not a backend failure.
    def broken(password: bytes, hashed: bytes) -> bool:
        raise ValueError("Invalid salt")
    write_users(f, {"ok": "pw"})
    b = backend(f)
    monkeypatch.setattr(mod.bcrypt, "checkpw", broken)
    failure_of(b.authenticate("ok", "pw")).trap(UnauthorizedLogin)


# -- equal work for unknown users ---------------------------------------------


def test_unknown_user_and_empty_password_run_a_dummy_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "users"
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(5)).decode()
    f.write_text(f"alice:{hashed}\n")
    runner = Runner()
    b = backend(f, runner=runner)
    checked: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(mod.bcrypt, "checkpw", counting)

    assert ok(b, "alice", "secret")
    assert not ok(b, "alice", "wrong")
    assert not ok(b, "mallory", "secret")
    assert not ok(b, "alice", "")
    assert not ok(b, "", "secret")
    # One bcrypt check each, through the runner, never for free.
    assert len(checked) == 5
    assert runner.calls == ["verify", "verify", "_dummy_verify", "_dummy_verify", "_dummy_verify"]
    # The dummy has the cost of the file's entries, not of the real hash.
    dummies = checked[2:]
    assert all(h.startswith(b"$2b$05$") for h in dummies), dummies
    assert all(h != hashed.encode() for h in dummies)


def test_dummy_follows_the_files_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "users"
    f.write_text("".join(f"u{i}:{apr1_crypt(b'pw', b'salt')}\n" for i in range(3)))
    calls: list[tuple[Any, ...]] = []
    real = mod.apr1_crypt
    monkeypatch.setattr(mod, "apr1_crypt", lambda *a: calls.append(a) or real(*a))
    b = backend(f)
    calls.clear()
    assert not ok(b, "nobody", "pw")
    assert len(calls) == 1


def test_default_dummy_cost_is_10() -> None:
    assert mod.Users({}).dummy_cost == 10
    assert mod.parse_htpasswd(b"", "x").dummy_scheme == "bcrypt"


# -- reloads ------------------------------------------------------------------


def test_reload_after_change(tmp_path: Path, auth_events: list[dict[str, Any]]) -> None:
    f = tmp_path / "users"
    write_users(f, {"alice": "one"})
    clock = task.Clock()
    clock.advance(1000)
    b = backend(f, clock=clock)
    assert ok(b, "alice", "one")

    write_users(f, {"alice": "two"})
    os.utime(f, (2000, 2000))
    # Checked at most once a second: the old file still counts.
    clock.advance(0.5)
    assert ok(b, "alice", "one")
    clock.advance(0.6)
    assert not ok(b, "alice", "one")
    assert ok(b, "alice", "two")
    assert any("reloaded" in t for t in texts(auth_events))

    # Same size, same mtime, new inode (an editor's rename into place).
    new = tmp_path / "users.new"
    write_users(new, {"alice": "six"})
    os.utime(new, (2000, 2000))
    os.replace(new, f)
    clock.advance(1)
    assert ok(b, "alice", "six")


def test_vanished_file_keeps_last_good_copy(tmp_path: Path,
                                            auth_events: list[dict[str, Any]]) -> None:
    f = tmp_path / "users"
    write_users(f, {"alice": "one"})
    clock = task.Clock()
    b = backend(f, clock=clock)
    f.unlink()
    clock.advance(1)
    assert ok(b, "alice", "one")
    clock.advance(1)
    assert ok(b, "alice", "one")
    assert sum("disappeared" in t for t in texts(auth_events)) == 1
    write_users(f, {"bob": "two"})
    clock.advance(1)
    assert ok(b, "bob", "two") and not ok(b, "alice", "one")


def test_io_error_is_not_unauthorized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "users"
    write_users(f, {"alice": "one"})
    clock = task.Clock()
    b = backend(f, clock=clock)
    os.utime(f, (5, 5))

    def denied(*args: Any, **kw: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mod.WatchedFile, "_read", denied)
    clock.advance(1)
    failure = failure_of(b.authenticate("alice", "one"))
    assert not failure.check(UnauthorizedLogin)
    failure.trap(BackendUnavailable)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        backend(tmp_path / "nope")
    assert e.value.source == str(tmp_path / "nope")
    assert e.value.key == "auth.apps.file"
    f = tmp_path / "users"
    f.write_text("")
    with pytest.raises(ConfigError) as e:
        backend(f, senders=tmp_path / "nope")
    assert e.value.key == "auth.apps.senders_file"


# -- senders_file ---------------------------------------------------------------


def test_senders_file_parsing_and_reload(tmp_path: Path) -> None:
    f = tmp_path / "users"
    f.write_text("")
    s = tmp_path / "senders"
    s.write_text("# who may send as whom\napp1: *@app1.example.org, noreply@example.org\n"
                 "\napp2:alerts@example.org\nempty:\n")
    clock = task.Clock()
    b = backend(f, senders=s, clock=clock)
    assert result_of(b.sender_patterns("app1")) == ("*@app1.example.org", "noreply@example.org")
    assert result_of(b.sender_patterns("app2")) == ("alerts@example.org",)
    assert result_of(b.sender_patterns("empty")) == ()
    assert result_of(b.sender_patterns("other")) is None
    assert result_of(b.sender_patterns("APP1")) is None

    s.write_text("app2: *@example.org\n")
    os.utime(s, (3000, 3000))
    clock.advance(1)
    assert result_of(b.sender_patterns("app1")) is None
    assert result_of(b.sender_patterns("app2")) == ("*@example.org",)


def test_no_senders_file_means_unlimited(tmp_path: Path) -> None:
    f = tmp_path / "users"
    f.write_text("")
    assert result_of(backend(f).sender_patterns("anyone")) is None


def test_parse_senders_warns_on_bad_lines(auth_events: list[dict[str, Any]]) -> None:
    assert parse_senders(b"nonsense\na: x@y\na: z@y\n", "S") == {"a": ("x@y",)}
    warned = texts(auth_events)
    assert any("S:1:" in t for t in warned) and any("S:3:" in t for t in warned)


# -- wiring ---------------------------------------------------------------------


def test_make_backend_and_thread_pool(tmp_path: Path) -> None:
    f = tmp_path / "users"
    write_users(f, {"alice": "one"})
    clock = task.Clock()
    b = make_backend(config(f), clock)
    assert isinstance(b, HtpasswdBackend)
    b.start()
    try:
        threads = b._threads._pool
        assert threads is not None
        assert (threads.min, threads.max, threads.name) == (1, 4, "relayd-auth")
    finally:
        b.stop()
    assert b._threads._pool is None


def test_default_runner_uses_the_pool(tmp_path: Path) -> None:
    """Without an injected runner the check runs in a "relayd-auth" thread
    and the result comes back through reactor.callFromThread."""
    import queue
    import threading

    class Reactor(task.Clock):
        def __init__(self) -> None:
            super().__init__()
            self.calls: queue.Queue[tuple[Any, tuple[Any, ...]]] = queue.Queue()

        def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:  # noqa: N802
            self.calls.put((f, args))

    threads: list[str] = []
    real_verify = mod.verify

    def recording(entry: Any, password: bytes) -> bool:
        threads.append(threading.current_thread().name)
        return real_verify(entry, password)

    f = tmp_path / "users"
    write_users(f, {"alice": "one"})
    reactor = Reactor()
    b = HtpasswdBackend(config(f), reactor)
    b.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mod, "verify", recording)
            d = b.authenticate("alice", "one")
            f_, args = reactor.calls.get(timeout=10)
            f_(*args)
        assert result_of(d) == "alice"
        assert threads and "relayd-auth" in threads[0]
    finally:
        b.stop()


def test_not_started_is_not_unauthorized(tmp_path: Path) -> None:
    f = tmp_path / "users"
    f.write_text("")
    b = HtpasswdBackend(config(f), task.Clock())
    failure = failure_of(b.authenticate("alice", "one"))
    assert not failure.check(UnauthorizedLogin)
