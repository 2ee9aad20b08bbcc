"""SMTP AUTH against an Apache htpasswd file (and an optional senders file).

Accepted hash formats are the ones Apache's ``htpasswd`` writes that are worth
trusting: bcrypt (``-B``: ``$2y$``, also ``$2b$``/``$2a$``), apr1 MD5-crypt
(``-m``, the old default) and ``{SHA}`` (``-s``, unsalted: a warning at load).
Plaintext (``-p``), crypt()/DES (``-d``) and anything unrecognised are refused
line by line with a warning naming the file and line, never accepted:
Apache's plaintext fallback would let any hash-looking string be a password.

The files are reread when they change (inode, size, mtime), checked at most
once a second before an authentication; a file that vanishes later keeps its
last good contents (an editor's rename-into-place must not lock everyone out).

Timing: an unknown user or an empty password runs the same kind of check as
a real entry (a dummy hash of the file's most common scheme and bcrypt cost),
so response times do not reveal which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import os
import re
from collections.abc import Callable
from typing import Any

import attrs
import bcrypt
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from relayd.auth import AuthThreads, BackendUnavailable, Runner
from relayd.config import AuthBackendConfig
from relayd.errors import ConfigError
from relayd.interfaces import IAuthBackend

__all__ = ["HtpasswdBackend", "apr1_crypt", "parse_htpasswd", "parse_senders"]

log = Logger(namespace="relayd.auth")

CHECK_INTERVAL = 1.0  # seconds between stat() calls on the watched files
DEFAULT_BCRYPT_COST = 10

_B64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BCRYPT_RE = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_APR1_RE = re.compile(r"^\$apr1\$([./0-9A-Za-z]{0,8})\$[./0-9A-Za-z]{22}$")
_CRYPT_RE = re.compile(r"^(?:[./0-9A-Za-z]{13}|\$(?:1|5|6|md5|sha1|y|gy|7)\$.*)$")


# ---------------------------------------------------------------------------
# Hash schemes
# ---------------------------------------------------------------------------


def _to64(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_B64[value & 0x3F])
        value >>= 6
    return "".join(out)


def apr1_crypt(password: bytes, salt: bytes, magic: bytes = b"$apr1$") -> str:
    """Apache's MD5-crypt (``htpasswd -m``): Poul-Henning Kamp's md5crypt with
    the ``$apr1$`` magic.  Python has no implementation left (``crypt`` is
    gone in 3.13, passlib is unmaintained), and it is short."""
    salt = salt[:8]
    alt = hashlib.md5(password + salt + password).digest()
    ctx = hashlib.md5(password + magic + salt)
    n = len(password)
    while n > 0:
        ctx.update(alt[: min(16, n)])
        n -= 16
    n = len(password)
    while n:
        ctx.update(b"\0" if n & 1 else password[:1])
        n >>= 1
    final = ctx.digest()
    for i in range(1000):
        step = hashlib.md5(password if i & 1 else final)
        if i % 3:
            step.update(salt)
        if i % 7:
            step.update(password)
        step.update(final if i & 1 else password)
        final = step.digest()
    encoded = "".join(
        _to64((final[a] << 16) | (final[b] << 8) | final[c], 4)
        for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5))
    )
    encoded += _to64(final[11], 2)
    return f"{magic.decode()}{salt.decode('ascii')}${encoded}"


@attrs.frozen
class Entry:
    """One usable htpasswd line: the scheme decides how ``hash`` is checked."""

    scheme: str  # "bcrypt" | "apr1" | "sha"
    hash: str = attrs.field(repr=False)
    cost: int = 0  # bcrypt only


def verify(entry: Entry, password: bytes) -> bool:
    """Check ``password`` against ``entry``; blocking (bcrypt: ~60 ms).

    A hash bcrypt cannot use (``ValueError``) counts as a wrong password: it
    is one broken line, not a broken backend.
    """
    if entry.scheme == "bcrypt":
        # Apache and bcrypt < 5 silently use the first 72 bytes; bcrypt 5
        # raises instead.  Truncate so every version agrees with htpasswd.
        try:
            return bool(bcrypt.checkpw(password[:72], entry.hash.encode("ascii")))
        except ValueError as e:
            log.warn("corrupt bcrypt hash in an htpasswd entry: {error}", error=str(e))
            return False
    if entry.scheme == "apr1":
        salt = entry.hash.split("$")[2].encode("ascii")
        computed = apr1_crypt(password, salt).encode("ascii")
        return hmac.compare_digest(computed, entry.hash.encode("ascii"))
    if entry.scheme == "sha":
        stored = base64.b64decode(entry.hash[5:])  # checked at load: 20 bytes
        return hmac.compare_digest(hashlib.sha1(password).digest(), stored)
    return False


_dummy_cache: dict[tuple[str, int], Entry] = {}


def dummy_entry(scheme: str, cost: int = DEFAULT_BCRYPT_COST) -> Entry:
    """A fixed hash of a random secret, used to spend on an unknown user the
    same work as on a known one.  Cached per scheme and cost: making a bcrypt
    hash costs as much as checking one."""
    key = (scheme, cost if scheme == "bcrypt" else 0)
    entry = _dummy_cache.get(key)
    if entry is None:
        secret = os.urandom(16).hex().encode("ascii")
        if scheme == "bcrypt":
            hashed = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=cost)).decode("ascii")
            entry = Entry("bcrypt", hashed, cost)
        elif scheme == "apr1":
            salt = "".join(_B64[b & 0x3F] for b in os.urandom(8)).encode("ascii")
            entry = Entry("apr1", apr1_crypt(secret, salt))
        else:
            digest = base64.b64encode(hashlib.sha1(secret).digest()).decode("ascii")
            entry = Entry("sha", f"{{SHA}}{digest}")
        _dummy_cache[key] = entry
    return entry


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


@attrs.frozen
class Users:
    """A parsed htpasswd file: usable entries and the dummy of the file's most
    common scheme (bcrypt at the most common cost when the file is empty or
    mostly bcrypt)."""

    entries: dict[str, Entry]
    dummy_scheme: str = "bcrypt"
    dummy_cost: int = DEFAULT_BCRYPT_COST


def _classify(value: str) -> tuple[Entry | None, str]:
    """An entry for a hash field, or None and why it is refused."""
    if value.startswith(("$2y$", "$2b$", "$2a$")):
        m = _BCRYPT_RE.match(value)
        if m is None or not 4 <= int(m.group(1)) <= 31:
            return None, "malformed bcrypt hash"
        return Entry("bcrypt", value, int(m.group(1))), ""
    if value.startswith("$apr1$"):
        if _APR1_RE.match(value) is None:
            return None, "malformed apr1 (MD5) hash"
        return Entry("apr1", value), ""
    if value.startswith("{SHA}"):
        try:
            raw = base64.b64decode(value[5:], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 20:
            return None, "malformed {SHA} hash"
        return Entry("sha", value), ""
    if _CRYPT_RE.match(value):
        return None, "crypt() hashes are not supported; use bcrypt (htpasswd -B)"
    return None, "plaintext or unknown password format refused; use bcrypt (htpasswd -B)"


def parse_htpasswd(data: bytes, path: str) -> Users:
    """Parse htpasswd content, warning (``relayd.auth``) for each refused line.

    Like Apache: ``user:hash`` (anything after a second colon is ignored),
    user names are exact (case-sensitive), ``#`` comments and blank lines are
    skipped, and the first line for a user wins.
    """
    entries: dict[str, Entry] = {}
    seen: set[str] = set()
    unsalted: list[int] = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            log.warn("{path}:{line}: not UTF-8, line ignored", path=path, line=lineno)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, rest = line.partition(":")
        if not colon or not user:
            log.warn("{path}:{line}: not a user:hash line, ignored", path=path, line=lineno)
            continue
        if user in seen:
            log.warn(
                "{path}:{line}: duplicate user {user!r} ignored (the first line wins)",
                path=path, line=lineno, user=user,
            )
            continue
        seen.add(user)
        entry, reason = _classify(rest.split(":", 1)[0].strip())
        if entry is None:
            log.warn(
                "{path}:{line}: user {user!r} refused: {reason}",
                path=path, line=lineno, user=user, reason=reason,
            )
            continue
        if entry.scheme == "sha":
            unsalted.append(lineno)
        entries[user] = entry
    if unsalted:
        log.warn(
            "{path}: unsalted {{SHA}} hashes on line(s) {lines}; prefer bcrypt (htpasswd -B)",
            path=path, lines=", ".join(map(str, unsalted)),
        )
    schemes = collections.Counter(e.scheme for e in entries.values())
    costs = collections.Counter(e.cost for e in entries.values() if e.scheme == "bcrypt")
    scheme = max(("bcrypt", "apr1", "sha"), key=lambda s: schemes[s])  # ties: bcrypt
    cost = costs.most_common(1)[0][0] if costs else DEFAULT_BCRYPT_COST
    return Users(entries, scheme, cost)


def parse_senders(data: bytes, path: str) -> dict[str, tuple[str, ...]]:
    """Parse ``user: pattern, pattern`` lines (``#`` comments, blank lines).

    The first line for a user wins, as in the htpasswd file.
    """
    senders: dict[str, tuple[str, ...]] = {}
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            log.warn("{path}:{line}: not UTF-8, line ignored", path=path, line=lineno)
            continue
        if not line or line.startswith("#"):
            continue
        user, colon, rest = line.partition(":")
        user = user.strip()
        if not colon or not user:
            log.warn("{path}:{line}: not a 'user: pattern, ...' line, ignored",
                     path=path, line=lineno)
            continue
        if user in senders:
            log.warn("{path}:{line}: duplicate user {user!r} ignored (the first line wins)",
                     path=path, line=lineno, user=user)
            continue
        patterns = tuple(p for p in (p.strip() for p in re.split(r"[,\s]+", rest)) if p)
        senders[user] = patterns
    return senders


# ---------------------------------------------------------------------------
# Watching a file
# ---------------------------------------------------------------------------


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFile:
    """A parsed file that is reread when its inode, size or mtime change.

    Checked at most once per ``CHECK_INTERVAL`` of the injected clock.  The
    first load raises ``ConfigError``; later, a vanished file keeps the last
    good contents, and any other I/O error raises ``BackendUnavailable``
    (the caller answers 454) until the file can be read again.
    """

    def __init__(
        self, path: str, key: str, parse: Callable[[bytes, str], Any], clock: Any
    ) -> None:
        self.path = path
        self._parse = parse
        self._clock = clock
        self._missing_logged = False
        try:
            data, ident = self._read()
        except OSError as e:
            raise ConfigError(path, key, f"cannot read: {e.strerror or e}") from e
        self.value = parse(data, path)
        self._ident = ident
        self._checked = clock.seconds()

    def _read(self) -> tuple[bytes, tuple[int, int, int, int]]:
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), _identity(st)

    def refresh(self) -> None:
        now = self._clock.seconds()
        if now - self._checked < CHECK_INTERVAL:
            return
        self._checked = now
        try:
            if _identity(os.stat(self.path)) == self._ident:
                self._missing_logged = False
                return
            data, ident = self._read()
        except FileNotFoundError:
            if not self._missing_logged:
                log.warn("{path} has disappeared; keeping its last good contents",
                         path=self.path)
                self._missing_logged = True
            return
        except OSError as e:
            # Not "wrong password": the operator broke the file (permissions,
            # I/O error); clients get 454 and retry.  Checked again next second.
            log.error("cannot reread {path}: {error}", path=self.path, error=str(e))
            raise BackendUnavailable(f"cannot read {self.path}: {e.strerror or e}") from e
        self._missing_logged = False
        self.value = self._parse(data, self.path)
        self._ident = ident
        log.info("reloaded {path}", path=self.path)


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


@implementer(IAuthBackend)
class HtpasswdBackend:
    """``[auth.NAME] type = "htpasswd"``.

    :param reactor: an ``IReactorTime`` (file checks) that is also the
        reactor the default thread-pool runner reports back to.
    :param runner: ``runner(f, *args) -> Deferred`` for the hash checks;
        default: this backend's own pool, running between ``start()`` and
        ``stop()``.
    :raises ConfigError: the htpasswd or senders file cannot be read.
    """

    def __init__(
        self, config: AuthBackendConfig, reactor: Any, runner: Runner | None = None
    ) -> None:
        if config.file is None:
            raise ConfigError("-", f"auth.{config.name}.file", "required for htpasswd backends")
        self.name = config.name
        self._threads = AuthThreads(reactor)
        self._runner: Runner = runner if runner is not None else self._threads.run
        self._users = WatchedFile(config.file, f"auth.{config.name}.file", parse_htpasswd, reactor)
        self._senders: WatchedFile | None = None
        if config.senders_file is not None:
            self._senders = WatchedFile(
                config.senders_file, f"auth.{config.name}.senders_file", parse_senders, reactor
            )
        # Make the dummy hash now (as costly as a check), not on the first
        # unknown user, whose answer would then take twice as long.
        users: Users = self._users.value
        dummy_entry(users.dummy_scheme, users.dummy_cost)

    def start(self) -> None:
        self._threads.start()

    def stop(self) -> None:
        self._threads.stop()

    def authenticate(self, username: str, password: str) -> Deferred[str]:
        try:
            self._users.refresh()
            users: Users = self._users.value
            secret = password.encode("utf-8", "surrogateescape")
        except Exception:
            return fail()
        entry = users.entries.get(username) if username and password else None
        try:
            if entry is None:
                # Same work as a real check, and never a success.
                d = self._runner(
                    _dummy_verify, users.dummy_scheme, users.dummy_cost, secret or b"x"
                )
            else:
                d = self._runner(verify, entry, secret)
        except Exception:  # e.g. the pool is not running: 454, not 535
            return fail()

        def decide(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return username

        return d.addCallback(decide)

    def sender_patterns(self, username: str) -> Deferred[tuple[str, ...] | None]:
        if self._senders is None:
            return succeed(None)
        try:
            self._senders.refresh()
        except Exception:
            return fail()
        return succeed(self._senders.value.get(username))


def _dummy_verify(scheme: str, cost: int, password: bytes) -> bool:
    verify(dummy_entry(scheme, cost), password)
    return False
