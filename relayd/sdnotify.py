"""systemd's service notification protocol (sd_notify(3)), in a few lines.

Under ``Type=notify`` systemd hands the service ``$NOTIFY_SOCKET``: an
AF_UNIX datagram socket, a path or, when it starts with ``@``, a name in the
abstract namespace.  The service reports its state by sending datagrams of
newline-separated ``KEY=value`` lines: ``READY=1`` once it serves (systemd
holds ``systemctl start`` and ordered units until then), ``RELOADING=1`` ...
``READY=1`` around a reload, ``STOPPING=1`` when it begins to shut down and
``STATUS=...`` for ``systemctl status``.  Without ``$NOTIFY_SOCKET`` (not run
by systemd, or by a unit of another ``Type=``) every call does nothing.

Why not a library: the protocol is one ``sendto``.  python3-systemd binds
libsystemd (a C extension, no PyPI wheels) and the pure-Python ``sdnotify``
package is unmaintained; neither is worth a dependency for this.

Two rules:

- **Never raise into the relay.**  A relay that cannot tell systemd it is
  ready still relays mail (and systemd timing the start out says more than a
  traceback would).  The first failure is logged as a warning, later ones
  are not: a broken socket would otherwise log on every reload.
- **``$NOTIFY_SOCKET`` is read once and removed from ``os.environ``** (what
  sd_notify's ``unset_environment`` does).  The address is kept in the
  notifier, so relayd can still notify; but programs started from relayd
  must not inherit it and speak for the service: with ``NotifyAccess=main``
  systemd ignores them (and logs each datagram), with ``all`` a child's
  ``READY=1`` or ``STOPPING=1`` would be believed.

This module imports no reactor: it is safe to import anywhere, and the
reactor is handed to :class:`SystemdNotifier` by the caller.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger(namespace="relayd")

#: How long one datagram may wait for room in systemd's receive queue.  The
#: queue is drained by PID 1 at once in practice; the bound keeps a wedged
#: receiver from stalling the reactor thread for longer than this.
SEND_TIMEOUT = 2.0


def _address(value: str) -> bytes:
    """``$NOTIFY_SOCKET`` as a sockaddr_un path: ``@name`` is abstract."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    # systemd >= 254 also passes vsock:CID:PORT (for VMs); not relayd's case.
    raise ValueError(f"unsupported NOTIFY_SOCKET address {value!r}")


def _field(key: str, value: object) -> str:
    if value is True:
        value = 1
    # One datagram is a list of lines: a newline in a value would start a
    # new (forged) assignment.
    text = str(value).replace("\r", " ").replace("\n", " ")
    return f"{key}={text}\n"


class Notifier:
    """Sends notifications to one ``$NOTIFY_SOCKET`` address (or nowhere)."""

    def __init__(self, address: str | None) -> None:
        #: The socket address as systemd gave it; None: notifications are off.
        self.address = address or None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``, which is then removed from
        the environment (see the module docstring)."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram, in the order given.

        :return: True if the datagram was sent; False when notifications are
            off or sending failed (logged once, never raised).
        """
        if self.address is None or not fields:
            return False
        message = "".join(_field(k, v) for k, v in fields.items()).encode("utf-8")
        try:
            target = _address(self.address)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, target)
        except Exception as e:
            if not self._warned:
                self._warned = True
                log.warn("systemd notification to {address} failed: {error} "
                         "(further failures are not logged)", address=self.address, error=e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: serving (at start, and to end a reload)."""
        return self.notify(READY=1, **_status(status), MAINPID=os.getpid())

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1``: a reload began; follow it with :meth:`ready`.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd >= 253)
        requires with it, so the unit can switch to that type unchanged.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, **_status(status or "reloading the configuration"),
                           MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutting down."""
        return self.notify(STOPPING=1, **_status(status or "stopping"))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line for ``systemctl status``."""
        return self.notify(STATUS=text)


def _status(text: str | None) -> dict[str, str]:
    return {"STATUS": text} if text else {}


_default: Notifier | None = None


def default() -> Notifier:
    """The process's notifier, from ``$NOTIFY_SOCKET`` at first use."""
    global _default
    if _default is None:
        _default = Notifier.from_environment()
    return _default


def notify(**fields: object) -> bool:
    return default().notify(**fields)


def ready(status: str | None = None) -> bool:
    return default().ready(status)


def reloading(status: str | None = None) -> bool:
    return default().reloading(status)


def stopping(status: str | None = None) -> bool:
    return default().stopping(status)


def status(text: str) -> bool:
    return default().status(text)


class SystemdNotifier(Service):
    """``READY=1`` once the relay serves, ``STOPPING=1`` as it goes down.

    Add it as the **last** child of the relay's MultiService.  Children start
    in order, so by its ``startService`` every listener before it is bound;
    READY=1 then waits for the reactor to run, i.e. until accepted
    connections are really served.  MultiService stops children in reverse,
    so its ``stopService`` runs first and STOPPING=1 goes out before anything
    closes.  A graceful stop that waits before stopping the children should
    call :meth:`stopping` itself when it begins (a second call sends nothing).
    """

    name = "systemd-notify"

    def __init__(self, reactor: Any, describe: Callable[[], str],
                 notifier: Notifier | None = None) -> None:
        """
        :param reactor: an ``IReactorCore`` (for ``callWhenRunning``).
        :param describe: the ``STATUS=`` text sent with READY=1, e.g. the
            addresses mail is accepted on; called each time READY=1 is sent.
        :param notifier: default: the process's, from ``$NOTIFY_SOCKET``.
        """
        self._reactor = reactor
        self._describe = describe
        self.notifier = notifier if notifier is not None else default()
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._reactor.callWhenRunning(self._started)

    def _started(self) -> None:
        if self.running:
            self.ready()

    def ready(self) -> bool:
        """READY=1 with the current status; also ends a reload."""
        try:
            text = self._describe()
        except Exception:
            log.failure("systemd status text")
            text = "running"
        return self.notifier.ready(text)

    def reloading(self) -> bool:
        return self.notifier.reloading()

    def stopping(self) -> bool:
        if self._stopping:
            return False
        self._stopping = True
        return self.notifier.stopping("stopping: closing listeners, finishing sessions")

    def stopService(self) -> None:
        super().stopService()
        self.stopping()


__all__ = ["Notifier", "SystemdNotifier", "default", "notify", "ready", "reloading",
           "status", "stopping"]
