"""SMTP AUTH credential backends: an htpasswd file or an LDAP directory.

Both implement :class:`relayd.interfaces.IAuthBackend`.  Their blocking work
(bcrypt, LDAP round trips) runs through a *runner*: a callable
``runner(f, *args) -> Deferred``.  In production that is a dedicated thread
pool (:class:`AuthThreads`), so slow hashing or a slow directory never
starves the reactor's shared pool (DNS, metrics); tests pass
``twisted.internet.defer.maybeDeferred`` and stay synchronous.

Failure contract (the SMTP layer relies on it): wrong credentials fail with
``twisted.cred.error.UnauthorizedLogin`` (535 5.7.8); trouble in the backend
itself fails with anything else, normally :class:`BackendUnavailable`
(454 4.7.0), so an LDAP outage never tells a client its password is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from relayd.config import AuthBackendConfig
from relayd.interfaces import IAuthBackend

__all__ = ["AuthThreads", "BackendUnavailable", "Runner", "make_backend"]

Runner = Callable[..., "Deferred[Any]"]


class BackendUnavailable(Exception):
    """The credential store cannot answer now (I/O error, LDAP down, TLS
    failure, service bind refused).  Deliberately not ``UnauthorizedLogin``:
    the client gets 454 4.7.0 and tries again later."""


class AuthThreads:
    """A backend's own small thread pool and the runner that uses it.

    Auth work gets its own pool (not ``deferToThread``'s reactor pool, shared
    with DNS and metrics): at most four bcrypt checks or LDAP round trips at
    once, whatever the number of clients trying passwords.
    """

    def __init__(self, reactor: Any, name: str = "relayd-auth") -> None:
        self._reactor = reactor
        self._name = name
        self._pool: ThreadPool | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=4, name=self._name)
            self._pool.start()

    def stop(self) -> None:
        # Joins the workers: a bcrypt check takes ~60 ms; an LDAP attempt is
        # bounded by the backend's timeout.
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._pool is None:
            raise RuntimeError("the auth thread pool is not running (start() not called)")
        return deferToThreadPool(self._reactor, self._pool, f, *args)


def make_backend(config: AuthBackendConfig, reactor: Any) -> IAuthBackend:
    """The backend for one ``[auth.NAME]`` table.

    May raise ``ConfigError`` (htpasswd file unreadable, CA file unusable).
    The submodules are imported here so that a relay without LDAP never
    imports ldap3, and to keep them free to import this package.
    """
    backend: IAuthBackend
    if config.type == "htpasswd":
        from relayd.auth.htpasswd import HtpasswdBackend

        backend = HtpasswdBackend(config, reactor)
    elif config.type == "ldap":
        from relayd.auth.ldap import LDAPBackend

        backend = LDAPBackend(config, reactor=reactor)
    else:
        raise ValueError(f"unknown auth backend type {config.type!r}")
    verifyObject(IAuthBackend, backend)
    return backend
