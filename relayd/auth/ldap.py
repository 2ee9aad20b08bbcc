"""SMTP AUTH by binding to an LDAP directory (ldap3, in a thread pool).

Two modes, as configured:

* direct bind: ``user_dn = "uid={user},ou=people,dc=example,dc=org"``; the
  user name is escaped for a DN (``escape_rdn``) before it is put in;
* search: bind as the service account (``bind_dn``/``bind_password``, or
  anonymously), search ``search_base`` with ``search_filter`` (the user name
  escaped for a filter, ``escape_filter_chars``), require exactly one entry,
  then bind as that entry with the client's password.

Every attempt uses fresh ``SYNC`` connections, never a shared or
``SAFE_SYNC`` one: with ``SAFE_SYNC``, ``bind()`` returns a non-empty tuple,
so ``if not conn.bind()`` never fires (research/twisted-audit.md §4).

Classification: an empty user or password is refused before any bind (an
RFC 4513 "unauthenticated bind" would succeed); invalid credentials are
``UnauthorizedLogin`` (535); a directory that cannot be reached, a timeout,
a TLS failure, a refused service bind or an unexpected result code is
:class:`BackendUnavailable` (454 4.7.0).
"""

from __future__ import annotations

import collections
import math
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from relayd.auth import AuthThreads, BackendUnavailable, Runner
from relayd.config import AuthBackendConfig
from relayd.errors import ConfigError
from relayd.interfaces import IAuthBackend

__all__ = ["LDAPBackend"]

log = Logger(namespace="relayd.auth")

# Bind results that mean "these credentials do not get in" rather than "the
# directory is in trouble": invalidCredentials, inappropriateAuthentication,
# insufficientAccessRights, unwillingToPerform (disabled/locked accounts).
_REFUSED_BIND = frozenset({49, 48, 50, 53})
_SIZE_LIMIT_EXCEEDED = 4
_SENDER_CACHE_SIZE = 10000


class _VerifiedTls(ldap3.Tls):
    """ldap3's ``Tls`` with an ``SSLContext`` built here: the CA file (or the
    system store), TLS >= 1.2 whatever the Python/OpenSSL defaults, and the
    host name checked by OpenSSL during the handshake.  ldap3's own check uses
    ``ssl.match_hostname`` (deprecated, gone in Python 3.12), and its
    ``ssl_options`` route to a minimum version uses deprecated flags.
    """

    def __init__(self, ca_file: str | None, host: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        self._context = context
        self._host = host

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=self._host,
        )


def _result_code(conn: ldap3.Connection) -> int:
    result = conn.result or {}
    code = result.get("result")
    return code if isinstance(code, int) else -1


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # closing a broken connection tells nothing new
        pass


def _describe(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    text = f"{result.get('description', '?')} ({result.get('result', '?')})"
    if result.get("message"):
        text += f": {result['message']}"
    return text


@implementer(IAuthBackend)
class LDAPBackend:
    """``[auth.NAME] type = "ldap"``.

    :param runner: ``runner(f, *args) -> Deferred`` for the blocking LDAP
        work; default: this backend's own pool between ``start()`` and
        ``stop()`` (which needs ``reactor``, the global one if omitted).
    :raises ConfigError: the URL or the CA file cannot be used.
    """

    def __init__(
        self, config: AuthBackendConfig, runner: Runner | None = None, reactor: Any = None
    ) -> None:
        key = f"auth.{config.name}"
        if config.url is None:
            raise ConfigError("-", f"{key}.url", "required for ldap backends")
        if config.user_dn is None and (config.search_base is None or config.search_filter is None):
            raise ConfigError("-", f"{key}.search_base", "give user_dn or search_base/search_filter")
        self._config = config
        url = urlsplit(config.url)
        scheme = url.scheme.lower()
        try:
            port = url.port
        except ValueError as e:
            raise ConfigError(config.url, f"{key}.url", f"bad port: {e}") from e
        if scheme not in ("ldap", "ldaps") or not url.hostname:
            raise ConfigError(config.url, f"{key}.url", "must be ldap://HOST[:PORT] or ldaps://")
        self._use_ssl = scheme == "ldaps"
        self._host = url.hostname
        self._port = port or (636 if self._use_ssl else 389)
        self._tls: _VerifiedTls | None = None
        if self._use_ssl or config.start_tls:
            try:
                self._tls = _VerifiedTls(config.ca_file, self._host)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    config.ca_file or "-", f"{key}.ca_file", f"cannot load CA certificates: {e}"
                ) from e
        self._reactor = reactor
        self._threads: AuthThreads | None = None
        self._runner = runner
        # Sender attribute values seen at the last successful authentication
        # of each user (read in the same round trips), bounded.
        self._senders: collections.OrderedDict[str, tuple[str, ...]] = collections.OrderedDict()
        self._senders_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self._runner is None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor  # type: ignore[no-redef]
            self._threads = AuthThreads(reactor)
            self._threads.start()
            self._runner = self._threads.run

    def stop(self) -> None:
        if self._threads is not None:
            self._threads.stop()
            self._threads = None
            self._runner = None

    def _run(self, f: Any, *args: Any) -> Deferred[Any]:
        if self._runner is None:
            return fail(BackendUnavailable("the LDAP backend is not started"))
        return self._runner(f, *args)

    # -- IAuthBackend ---------------------------------------------------------

    def authenticate(self, username: str, password: str) -> Deferred[str]:
        if not username or not password:
            # Never reaches the directory: an empty password is an RFC 4513
            # unauthenticated bind, which servers answer with success.
            return fail(UnauthorizedLogin())
        return self._run(self._authenticate, username, password)

    def sender_patterns(self, username: str) -> Deferred[tuple[str, ...] | None]:
        if self._config.sender_attribute is None:
            return succeed(None)
        with self._senders_lock:
            cached = self._senders.get(username)
        if cached is not None:
            return succeed(cached)
        return self._run(self._lookup_senders, username)

    # -- blocking work (in the pool) -------------------------------------------

    def _connection(self, user: str | None = None, password: str | None = None) -> ldap3.Connection:
        """A new, opened (and StartTLS-protected) connection; not yet bound."""
        server = ldap3.Server(
            self._host,
            port=self._port,
            use_ssl=self._use_ssl,
            tls=self._tls,
            get_info=ldap3.NONE,
            connect_timeout=self._config.timeout,
        )
        conn = ldap3.Connection(
            server,
            user=user,
            password=password,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            # Whole seconds: ldap3 packs it into SO_RCVTIMEO as an integer.
            receive_timeout=max(1, math.ceil(self._config.timeout)),
            raise_exceptions=False,
            read_only=True,
            # A referral would send the password to another server.
            auto_referrals=False,
        )
        conn.open(read_server_info=False)
        if self._config.start_tls and not self._use_ssl:
            try:
                started = conn.start_tls(read_server_info=False)
            except BaseException:
                _close(conn)
                raise
            if started is not True:
                _close(conn)
                raise BackendUnavailable(f"StartTLS with {self._config.url} failed")
        return conn

    def _attributes(self) -> list[str]:
        attr = self._config.sender_attribute
        return [attr] if attr else []

    def _values(self, attributes: dict[str, Any]) -> tuple[str, ...]:
        attr = self._config.sender_attribute
        if not attr:
            return ()
        for name, value in attributes.items():
            if name.lower() == attr.lower():
                values = value if isinstance(value, list | tuple) else [value]
                return tuple(str(v) for v in values)
        return ()

    def _service_connection(self) -> ldap3.Connection:
        """Bound as the service account (or anonymously); any refusal is the
        backend's problem, never the client's."""
        conn = self._connection(self._config.bind_dn, self._config.bind_password)
        if self._config.bind_dn is not None:
            ok = conn.bind()
            if ok is not True:
                what = _describe(conn)
                _close(conn)
                raise BackendUnavailable(f"service bind as {self._config.bind_dn} failed: {what}")
        return conn

    def _find_user(self, conn: ldap3.Connection, username: str) -> tuple[str, dict[str, Any]] | None:
        """The one entry matching the filter, or None (none, or ambiguous)."""
        assert self._config.search_base is not None and self._config.search_filter is not None
        search_filter = self._config.search_filter.replace("{user}", escape_filter_chars(username))
        conn.search(
            self._config.search_base,
            search_filter,
            search_scope=ldap3.SUBTREE,
            attributes=self._attributes(),
            size_limit=2,
        )
        code = _result_code(conn)
        entries = [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]
        if code not in (0, _SIZE_LIMIT_EXCEEDED):
            raise BackendUnavailable(f"search in {self._config.search_base} failed: {_describe(conn)}")
        if len(entries) != 1:
            if entries:
                log.warn(
                    "LDAP backend {name}: search for {user!r} matched more than one entry; refused",
                    name=self._config.name, user=username,
                )
            return None
        return entries[0]["dn"], dict(entries[0].get("attributes") or {})

    def _authenticate(self, username: str, password: str) -> str:
        try:
            if self._config.user_dn is not None:
                dn = self._config.user_dn.replace("{user}", escape_rdn(username))
                attributes = None
            else:
                service = self._service_connection()
                try:
                    found = self._find_user(service, username)
                finally:
                    _close(service)
                if found is None:
                    raise UnauthorizedLogin()
                dn, attributes = found
            conn = self._connection(dn, password)
            try:
                if conn.bind() is not True:
                    code = _result_code(conn)
                    if code in _REFUSED_BIND:
                        raise UnauthorizedLogin()
                    raise BackendUnavailable(f"bind as {dn} failed: {_describe(conn)}")
                if self._config.sender_attribute and attributes is None:
                    # Direct bind: read the sender addresses as the user.
                    attributes = self._read_entry(conn, dn)
            finally:
                _close(conn)
        except (UnauthorizedLogin, BackendUnavailable):
            raise
        except (LDAPException, OSError) as e:
            raise BackendUnavailable(f"LDAP server {self._config.url}: {e}") from e
        if self._config.sender_attribute:
            self._remember(username, self._values(attributes or {}))
        return username

    def _read_entry(self, conn: ldap3.Connection, dn: str) -> dict[str, Any]:
        conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=self._attributes())
        code = _result_code(conn)
        entries = [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]
        if code != 0 or not entries:
            raise BackendUnavailable(f"cannot read {dn}: {_describe(conn)}")
        return dict(entries[0].get("attributes") or {})

    def _remember(self, username: str, values: tuple[str, ...]) -> None:
        with self._senders_lock:
            self._senders[username] = values
            self._senders.move_to_end(username)
            while len(self._senders) > _SENDER_CACHE_SIZE:
                self._senders.popitem(last=False)

    def _lookup_senders(self, username: str) -> tuple[str, ...]:
        """Sender addresses without a password at hand: searched or read as
        the service account (anonymously without one).  An unknown user has
        none."""
        try:
            conn = self._service_connection()
            try:
                if self._config.user_dn is None:
                    found = self._find_user(conn, username)
                    values = () if found is None else self._values(found[1])
                else:
                    dn = self._config.user_dn.replace("{user}", escape_rdn(username))
                    conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE,
                                attributes=self._attributes())
                    code = _result_code(conn)
                    if code not in (0, 32):  # 32: noSuchObject, an unknown user
                        raise BackendUnavailable(f"cannot read {dn}: {_describe(conn)}")
                    entries = [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]
                    values = self._values(dict(entries[0].get("attributes") or {})) if entries else ()
            finally:
                _close(conn)
        except BackendUnavailable:
            raise
        except (LDAPException, OSError) as e:
            raise BackendUnavailable(f"LDAP server {self._config.url}: {e}") from e
        self._remember(username, values)
        return values
