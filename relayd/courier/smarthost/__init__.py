"""Delivery to a smarthost over ESMTP (``[route.NAME] smarthost = [...]``).

The package, by job: :mod:`.protocol` (the client state machine: replies,
timeouts, STARTTLS, the body producer), :mod:`.dotstuff` (RFC 5321 §4.5.2,
whole or a chunk at a time), :mod:`.session` (connect, EHLO, STARTTLS,
AUTH), :mod:`.sasl` (the client's SASL mechanisms), :mod:`.transaction`
(MAIL/RCPT/DATA for one message over an open session), :mod:`.pool` (the
connection cache, keyed by destination, TLS policy and SASL identity),
:mod:`.rate` (``max_rate``) and :mod:`.courier` (the ``ICourier`` that wires
them).  The names other modules import are re-exported here.
"""

from relayd.courier.smarthost.courier import SmarthostCourier, session_key
from relayd.courier.smarthost.dotstuff import BODY_CHUNK, DotStuffer, dot_stuff
from relayd.courier.smarthost.pool import IDLE_TIMEOUT, ConnectionPool, SessionKey
from relayd.courier.smarthost.protocol import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    DATA_BLOCK_TIMEOUT,
    DATA_END_TIMEOUT,
    DATA_INIT_TIMEOUT,
    GREETING_TIMEOUT,
    Reply,
    SessionError,
    SMTPClientProtocol,
    tls_verification_error,
)
from relayd.courier.smarthost.session import SessionOpener

__all__ = [
    "BODY_CHUNK",
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DATA_BLOCK_TIMEOUT",
    "DATA_END_TIMEOUT",
    "DATA_INIT_TIMEOUT",
    "GREETING_TIMEOUT",
    "IDLE_TIMEOUT",
    "ConnectionPool",
    "DotStuffer",
    "Reply",
    "SMTPClientProtocol",
    "SessionError",
    "SessionKey",
    "SessionOpener",
    "SmarthostCourier",
    "dot_stuff",
    "session_key",
    "tls_verification_error",
]
