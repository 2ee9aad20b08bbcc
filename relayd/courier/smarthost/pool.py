"""The connection cache of a route (Postfix's ``scache``): at most
``concurrency`` connections at once, idle ones reused and closed with QUIT
after :data:`IDLE_TIMEOUT`.

A cached connection carries the session it was opened with — the server it
reached, the TLS it negotiated, the SASL identity it authenticated as — so
it is filed under a :class:`SessionKey` and only ever handed to a caller
asking with an equal key.  Postfix's connection cache keys by destination
only, which is how ``smtp_sender_dependent_authentication`` ends up sending
one user's mail over another user's session; here two routes (or two
identities on one route) to the same ``host:port`` never share a connection.

The pool does not open connections: :meth:`ConnectionPool.acquire` hands out
an idle connection or a *slot* (``None``), and the caller opens one in it and
either :meth:`~ConnectionPool.add`\\ s it or :meth:`~ConnectionPool.give_back`\\ s
the slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relayd.courier.smarthost.protocol import SMTPClientProtocol
from relayd.errors import TransientDeliveryError

#: An unused cached connection is closed (with QUIT) after this long.
IDLE_TIMEOUT = 5.0


@attrs.frozen
class SessionKey:
    """What a cached connection is good for: a session opened to
    ``destination`` with this TLS policy and SASL identity.  Secrets are not
    part of it (a rotated password needs a reload, which makes a new pool),
    and never shown."""

    #: Where: a route's smarthost list, or one MX destination.
    destination: Hashable
    #: TLS policy: mode ("starttls", "implicit", "opportunistic", "none"),
    #: verification, the CA, the name verified and the client certificate.
    tls: str
    tls_verify: bool
    ca_file: str | None = None
    tls_server_name: str | None = None
    client_cert: str | None = None
    #: SASL identity: the mechanism setting and the user (None: no AUTH).
    sasl: str = "auto"
    username: str | None = None


@attrs.define(eq=False)
class _Waiter:
    key: SessionKey
    d: Deferred[SMTPClientProtocol | None]


class ConnectionPool:
    """Connection slots and idle connections of one courier.

    :param name: the route, for error texts.
    :param concurrency: connections open (or being opened) at most.
    :param clock: idle timers.
    """

    def __init__(self, name: str, concurrency: int, clock: IReactorTime) -> None:
        self._name = name
        self._concurrency = concurrency
        self._clock = clock
        self._idle: dict[SessionKey, list[SMTPClientProtocol]] = {}
        self._keys: dict[SMTPClientProtocol, SessionKey] = {}
        self._opening = 0
        self._waiters: deque[_Waiter] = deque()
        self._evicting: set[SMTPClientProtocol] = set()
        self._stopping = False

    # -- views -----------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections open or being opened."""
        return len(self._keys) + self._opening

    @property
    def idle_connections(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    # -- taking and giving back -----------------------------------------------

    def acquire(self, key: SessionKey) -> Deferred[SMTPClientProtocol | None]:
        """An idle connection opened with ``key``, or ``None``: a slot to
        open a new one in (then :meth:`add` it or :meth:`give_back`)."""
        if self._stopping:
            return defer.fail(self._shutting_down())
        if not self._waiters:
            conn = self._take_idle(key)
            if conn is not None:
                return defer.succeed(conn)
            if self._slot_free():
                self._opening += 1
                return defer.succeed(None)
        d: Deferred[SMTPClientProtocol | None] = Deferred()
        self._waiters.append(_Waiter(key, d))
        self._wake()
        return d

    def add(self, conn: SMTPClientProtocol, key: SessionKey) -> None:
        """A connection opened in a slot from :meth:`acquire` is up."""
        self._opening -= 1
        self._keys[conn] = key
        conn.on_lost = self._lost

    def give_back(self) -> None:
        """A slot from :meth:`acquire` was not used (the connect failed)."""
        self._opening -= 1
        self._wake()

    def replace(self, conn: SMTPClientProtocol) -> bool:
        """Take a broken connection's slot over to open a fresh one in.

        :return: False if its slot went already (it was lost): ask again.
        """
        conn.on_lost = None
        self._evicting.discard(conn)
        if self._keys.pop(conn, None) is None:
            return False
        self._opening += 1
        return True

    def release(self, conn: SMTPClientProtocol, reusable: bool) -> None:
        """``conn`` finished a delivery: cache it if ``reusable``, else close
        it (QUIT if the session is fine, abort if not)."""
        key = self._keys.get(conn)
        if key is None or not reusable or self._stopping or conn.lost or conn.closing:
            if not conn.lost:
                if reusable:
                    conn.quit()
                else:
                    conn.abort()
            return
        for waiter in self._waiters:
            if waiter.key == key:
                self._waiters.remove(waiter)
                waiter.d.callback(conn)
                return
        self._idle.setdefault(key, []).append(conn)
        conn.idle_call = self._clock.callLater(IDLE_TIMEOUT, self._idle_timeout, conn)
        # Someone may wait for another session: this one makes room.
        self._wake()

    def stop(self) -> Deferred[None]:
        """Close the idle connections (QUIT) and hand out nothing more;
        fires when they are closed.  Deliveries in flight finish and then
        close their connections."""
        self._stopping = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle = {}
        waits = []
        for conn in idle:
            self._cancel_idle(conn)
            waits.append(conn.when_lost())
            conn.quit()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.d.errback(self._shutting_down())
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # -- inside ------------------------------------------------------------------

    def _shutting_down(self) -> TransientDeliveryError:
        return TransientDeliveryError(f"route {self._name}: shutting down")

    def _slot_free(self) -> bool:
        return len(self._keys) + self._opening < self._concurrency

    def _take_idle(self, key: SessionKey) -> SMTPClientProtocol | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        conn = conns.pop()
        if not conns:
            del self._idle[key]
        self._cancel_idle(conn)
        return conn

    def _make_room(self) -> None:
        """All slots taken and a waiter wants another session: close an
        idle connection.  Its slot frees when it is gone, so the smarthost
        never sees more than ``concurrency`` connections."""
        if self._evicting:
            return
        for key, conns in self._idle.items():
            conn = conns.pop(0)
            if not conns:
                del self._idle[key]
            self._cancel_idle(conn)
            self._evicting.add(conn)
            conn.quit()
            return

    @staticmethod
    def _cancel_idle(conn: SMTPClientProtocol) -> None:
        if conn.idle_call is not None and conn.idle_call.active():
            conn.idle_call.cancel()
        conn.idle_call = None

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            conn = self._take_idle(waiter.key)
            if conn is not None:
                self._waiters.popleft().d.callback(conn)
            elif self._slot_free():
                self._opening += 1
                self._waiters.popleft().d.callback(None)
            else:
                self._make_room()
                return

    def _lost(self, conn: SMTPClientProtocol) -> None:
        self._evicting.discard(conn)
        key = self._keys.pop(conn, None)
        if key is not None:
            conns = self._idle.get(key)
            if conns and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._idle[key]
        self._wake()

    def _idle_timeout(self, conn: SMTPClientProtocol) -> None:
        conn.idle_call = None
        key = self._keys.get(conn)
        conns = self._idle.get(key) if key is not None else None
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[key]  # type: ignore[arg-type]
        conn.quit()
