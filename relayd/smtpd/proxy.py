"""PROXY protocol v1 and v2 in front of an SMTP listener (HAProxy's proxy-protocol.txt).

Not Twisted's ``haproxy:`` endpoint (see the design notes): that one lets the
wrapped protocol greet before the header is read, reports the balancer as
the peer at connect time, drops headers that arrive in small pieces and
takes headers from anyone.  Here:

* :class:`HeaderParser` is a pure incremental parser: fed any fragments
  (one byte at a time works), it answers ``None`` (more, please), the
  parsed :class:`ProxyHeader` with the bytes after it, or raises
  :class:`ProxyHeaderError`.
* :class:`ProxyProtocolFactory` wraps a listener's factory (outermost, so
  on an implicit-TLS listener the header comes before the TLS handshake).
  Its protocol closes connections from peers outside ``proxy_trusted`` at
  once, reads the header (bounded in size and time) before the wrapped
  protocol even sees the connection, then connects it with ``getPeer()``
  answering the client address from the header; bytes after the header go
  to it as input.  So the greeting, mynetworks, per-IP limits, logs and
  the Received header all see the real client.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Any, cast

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from relayd.ipaddr import in_networks

log = Logger(namespace="relayd.smtpd")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

V1_PREFIX = b"PROXY "
#: proxy-protocol.txt §2.1: the longest v1 line, CRLF included.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
#: The most address-and-TLV bytes a v2 header may announce; balancers send
#: a few dozen (more with SSL TLVs).  Beyond it the connection is refused.
V2_MAX_PAYLOAD = 1024
#: Seconds a trusted peer has to send the whole header.
HEADER_TIMEOUT = 10.0

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1


class ProxyHeaderError(ValueError):
    """The input is not a valid PROXY protocol header."""


@frozen
class ProxyHeader:
    """A parsed header.

    ``source`` is the client's ``(address, port)``, or ``None`` when the
    header does not name one (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 UNSPEC/UNIX
    families): the connection's own peer is then the client.
    """

    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


class HeaderParser:
    """Incremental parser of one PROXY v1 or v2 header."""

    def __init__(self, max_v2_payload: int = V2_MAX_PAYLOAD) -> None:
        self._buf = b""
        self._max_v2_payload = max_v2_payload
        self._done = False

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; the header and the bytes after it once complete.

        :raises ProxyHeaderError: on anything but a valid header (decided as
            early as possible: a wrong first byte fails at once).
        """
        if self._done:
            raise ProxyHeaderError("header already parsed")
        self._buf += data
        buf = self._buf
        if buf[:1] == V1_PREFIX[:1]:
            result = self._v1(buf)
        else:
            result = self._v2(buf)
        if result is not None:
            self._done = True
            self._buf = b""
        return result

    # -- v1 ------------------------------------------------------------------

    def _v1(self, buf: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buf.startswith(V1_PREFIX[: len(buf)]):
            raise ProxyHeaderError("not a PROXY protocol header")
        end = buf.find(b"\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyHeaderError("v1 header longer than 107 bytes")
            return None
        if end == 0 or buf[end - 1 : end] != b"\r":
            raise ProxyHeaderError("v1 header does not end with CRLF")
        return _parse_v1(buf[: end - 1]), buf[end + 1 :]

    # -- v2 ------------------------------------------------------------------

    def _v2(self, buf: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not V2_SIGNATURE.startswith(buf[:12]):
            raise ProxyHeaderError("not a PROXY protocol header")
        if len(buf) < V2_HEADER_LENGTH:
            # Check what has arrived of the fixed part early.
            if len(buf) > 12:
                _v2_version_command(buf[12])
            return None
        command = _v2_version_command(buf[12])
        family, proto = buf[13] >> 4, buf[13] & 0x0F
        (length,) = struct.unpack("!H", buf[14:16])
        if length > self._max_v2_payload:
            raise ProxyHeaderError(f"v2 header announces {length} bytes (limit "
                                   f"{self._max_v2_payload})")
        end = V2_HEADER_LENGTH + length
        if len(buf) < end:
            return None
        payload = buf[V2_HEADER_LENGTH:end]
        rest = buf[end:]
        if command == _V2_LOCAL:
            # Health checks and the balancer's own connections: addresses
            # (and family) are to be ignored.
            return ProxyHeader(2), rest
        if family in (_AF_UNSPEC, _AF_UNIX):
            return ProxyHeader(2), rest
        if family not in (_AF_INET, _AF_INET6):
            raise ProxyHeaderError(f"v2 header: unknown address family {family}")
        if proto != _STREAM:
            raise ProxyHeaderError("v2 header: not a stream (TCP) connection")
        size = 4 if family == _AF_INET else 16
        if length < 2 * size + 4:
            raise ProxyHeaderError("v2 header: address block too short")
        cls = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
        src = str(cls(payload[:size]))
        dst = str(cls(payload[size : 2 * size]))
        sport, dport = struct.unpack("!HH", payload[2 * size : 2 * size + 4])
        # TLVs (the rest of the payload) are skipped.
        return ProxyHeader(2, (src, sport), (dst, dport)), rest


def _v2_version_command(byte: int) -> int:
    if byte >> 4 != 0x2:
        raise ProxyHeaderError(f"v2 header: unsupported version {byte >> 4}")
    command = byte & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"v2 header: unknown command {command}")
    return command


def _parse_v1(line: bytes) -> ProxyHeader:
    """``PROXY TCP4|TCP6 src dst sport dport`` or ``PROXY UNKNOWN ...`` (CRLF removed)."""
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        raise ProxyHeaderError("v1 header: control character")
    fields = line.split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        # The rest of an UNKNOWN line is to be ignored.
        return ProxyHeader(1)
    if len(fields) != 6:
        raise ProxyHeaderError("v1 header: wrong number of fields")
    _, proto, src, dst, sport, dport = fields
    cls: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    if proto == b"TCP4":
        cls = ipaddress.IPv4Address
    elif proto == b"TCP6":
        cls = ipaddress.IPv6Address
    else:
        raise ProxyHeaderError("v1 header: protocol is not TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(1, (_v1_address(cls, src), _v1_port(sport)),
                       (_v1_address(cls, dst), _v1_port(dport)))


def _v1_address(
    cls: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address], text: bytes
) -> str:
    try:
        decoded = text.decode("ascii")
        if "%" in decoded:
            raise ValueError("scoped address")
        return str(cls(decoded))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("v1 header: bad address") from None


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and 1 <= len(text) <= 5) or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyHeaderError("v1 header: bad port")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("v1 header: bad port")
    return port


# -- the wrapper ------------------------------------------------------------------


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """Reads the PROXY header, then hands the connection to the wrapped protocol."""

    factory: ProxyProtocolFactory  # type: ignore[assignment]

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: Any) -> None:
        super().__init__(cast(Any, factory), wrappedProtocol)
        self._parser: HeaderParser | None = HeaderParser(factory.max_v2_payload)
        self._timer: IDelayedCall | None = None
        self._peer: Any = None
        self._passing = False
        self._closed = False
        self._proxy = ""

    @property
    def _t(self) -> Any:
        """The real transport (ITransport does not name everything used)."""
        return self.transport

    def makeConnection(self, transport: Any) -> None:
        # Like ProtocolWrapper.makeConnection, but the wrapped protocol is
        # connected only once the header has been read.
        directlyProvides(self, providedBy(transport))
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        peer = transport.getPeer()
        self._proxy = getattr(peer, "host", "") or ""
        if not in_networks(self._proxy, self.factory.trusted):
            log.warn("listener {listener}: connection from [{peer}] refused: not in "
                     "proxy_trusted (PROXY protocol listener)",
                     listener=self.factory.name, peer=self._proxy)
            self._refuse()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _refuse(self) -> None:
        self._closed = True
        self._parser = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._t.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        log.info("listener {listener}: no PROXY protocol header from [{peer}] within "
                 "{timeout}s; connection closed", listener=self.factory.name, peer=self._proxy,
                 timeout=self.factory.timeout)
        self._refuse()

    def dataReceived(self, data: bytes) -> None:
        if self._passing:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._closed or self._parser is None:
            return
        try:
            result = self._parser.feed(data)
        except ProxyHeaderError as e:
            log.info("listener {listener}: bad PROXY protocol header from [{peer}]: {why}; "
                     "connection closed", listener=self.factory.name, peer=self._proxy, why=e)
            self._refuse()
            return
        if result is None:
            return
        header, rest = result
        self._parser = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if header.source is not None:
            host, port = header.source
            self._peer = (IPv6Address("TCP", host, port) if ":" in host
                          else IPv4Address("TCP", host, port))
        self._passing = True
        self.wrappedProtocol.makeConnection(cast(Any, self))
        if rest and self.connected:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self) -> Any:
        """The client named by the header; before it (or without one) the
        connection's own peer."""
        if self._peer is not None:
            return self._peer
        return self._t.getPeer()

    def handshakeCompleted(self) -> None:
        # STARTTLS puts the TLS layer below us: pass its notice on.
        if self._passing and IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = 0
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._passing:
            ProtocolWrapper.connectionLost(self, reason)
        else:
            # The wrapped protocol never saw the connection.
            self.factory.unregisterProtocol(self)


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a listener's factory: PROXY header first, from trusted peers only."""

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrappedFactory: Any,
        trusted: Iterable[Network],
        clock: IReactorTime,
        *,
        name: str = "",
        timeout: float = HEADER_TIMEOUT,
        max_v2_payload: int = V2_MAX_PAYLOAD,
    ) -> None:
        super().__init__(wrappedFactory)
        self.trusted = tuple(trusted)
        self.clock = clock
        self.name = name
        self.timeout = timeout
        self.max_v2_payload = max_v2_payload


__all__ = [
    "HEADER_TIMEOUT",
    "HeaderParser",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyProtocolFactory",
    "ProxyProtocolWrapper",
]
