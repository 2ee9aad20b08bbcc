"""In-memory fakes of relayd's interfaces, and helpers to wire them up in tests.

Why fakes rather than mocks: each fake keeps the contract of its interface
(``finish`` or ``abort`` exactly once, a queue id only once the message is
"durable") and records what happened in plain attributes, so a test asserts
on outcomes (the message that would be on disk, the replies on the wire)
rather than on the sequence of calls an implementation happens to make.
Everything here is synchronous and driven by ``task.Clock``: no sockets, no
real time, no filesystem.

One module per seam: ``submission`` (ISubmissionSink), ``spool`` (ISpool),
``arrival`` (IQueueArrival), ``courier`` (ICourier), ``auth``
(IAuthBackend); and the harnesses: ``server`` (the SMTP server on fake
transports), ``config`` (listener configs), ``observe`` (mail log and
metrics), ``deferreds`` (results of fired Deferreds).  Every name is
re-exported here, so ``from relayd.testing import X`` keeps working.
"""

from relayd.testing.arrival import RecordingArrival
from relayd.testing.auth import FakeAuthBackend
from relayd.testing.config import listener_config, listener_toml
from relayd.testing.courier import HOLD, DeliveryAttempt, RecordingCourier
from relayd.testing.deferreds import failure_of, result_of
from relayd.testing.observe import LogCapture, sample
from relayd.testing.server import (
    BackpressureTransport,
    Conversation,
    TLSStringTransport,
    smtp_server,
)
from relayd.testing.spool import MemorySpool, MemorySpoolWriter
from relayd.testing.submission import RecordedMessage, RecordingReceiver, RecordingSink

__all__ = [
    "HOLD",
    "BackpressureTransport",
    "Conversation",
    "DeliveryAttempt",
    "FakeAuthBackend",
    "LogCapture",
    "MemorySpool",
    "MemorySpoolWriter",
    "RecordedMessage",
    "RecordingArrival",
    "RecordingCourier",
    "RecordingReceiver",
    "RecordingSink",
    "TLSStringTransport",
    "failure_of",
    "listener_config",
    "listener_toml",
    "result_of",
    "sample",
    "smtp_server",
]
