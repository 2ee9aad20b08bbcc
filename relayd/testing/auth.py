"""An in-memory ``IAuthBackend`` (SMTP AUTH) with knobs for slow or
failing backends."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from relayd.interfaces import (
    IAuthBackend,
)


@implementer(IAuthBackend)
class FakeAuthBackend:
    """An ``IAuthBackend`` over a dict, for protocol tests.

    Knobs, set as attributes by the test:

    - ``users``: user name -> password; ``authenticate`` fires with the name
      for the right password and fails with ``UnauthorizedLogin`` otherwise.
    - ``canonical``: optional user name -> canonical name the backend
      answers with (as an LDAP directory might normalise case).
    - ``senders``: user name -> sender patterns for ``sender_patterns``;
      users not in it are not limited (None).
    - ``fail_with``: an exception instance every ``authenticate`` fails
      with (backend trouble: answered 454).
    - ``senders_fail_with``: the same for ``sender_patterns``.
    - ``hold``: ``authenticate`` returns a pending Deferred, kept in
      ``pending`` until the test calls ``release()`` / ``fail_pending()``.

    Records: ``calls`` (every ``(user, password)`` asked), ``sender_calls``,
    ``started``/``stopped``.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        senders: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.canonical: dict[str, str] = {}
        self.senders: dict[str, tuple[str, ...]] = dict(senders or {})
        self.fail_with: BaseException | None = None
        self.senders_fail_with: BaseException | None = None
        self.hold = False
        self.pending: list[tuple[Deferred[str], str, str]] = []
        self.calls: list[tuple[str, str]] = []
        self.sender_calls: list[str] = []
        self.started = False
        self.stopped = False

    def _verdict(self, username: str, password: str) -> Deferred[str]:
        if self.fail_with is not None:
            return fail(self.fail_with)
        if username in self.users and self.users[username] == password:
            return succeed(self.canonical.get(username, username))
        return fail(UnauthorizedLogin(f"bad credentials for {username!r}"))

    def authenticate(self, username: str, password: str) -> Deferred[str]:
        self.calls.append((username, password))
        if self.hold:
            d: Deferred[str] = Deferred()
            self.pending.append((d, username, password))
            return d
        return self._verdict(username, password)

    def release(self, index: int = 0) -> None:
        """Answer the ``index``-th held ``authenticate`` as the dict says."""
        d, username, password = self.pending.pop(index)
        self._verdict(username, password).chainDeferred(d)

    def fail_pending(self, error: BaseException, index: int = 0) -> None:
        d, _, _ = self.pending.pop(index)
        d.errback(error)

    def sender_patterns(self, username: str) -> Deferred[tuple[str, ...] | None]:
        self.sender_calls.append(username)
        if self.senders_fail_with is not None:
            return fail(self.senders_fail_with)
        return succeed(self.senders.get(username))

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True
