"""Pins the Twisted internals relayd.netio.write_now relies on (the one place
relayd reads a private attribute of Twisted: see netio's docstring).  Runs on
both stacks (Twisted 22.4 from Debian 12, 26.x from PyPI): if a Twisted
release moves unsent data elsewhere, this fails instead of write_now sending
a reply ahead of data still queued."""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp


class _FD(abstract.FileDescriptor):
    """A FileDescriptor with no socket: writeSomeData takes ``room`` bytes."""

    def __init__(self) -> None:
        super().__init__(reactor=object())  # type: ignore[arg-type]
        self.connected = 1
        self.room = 0
        self.sent: list[bytes] = []
        self.writing = False

    def startWriting(self) -> None:
        self.writing = True

    def stopWriting(self) -> None:
        self.writing = False

    def writeSomeData(self, data: Any) -> int:
        n = min(self.room, len(data))
        self.sent.append(bytes(data[:n]))
        return n


def _nothing_queued(t: Any) -> bool:
    # The exact condition write_now tests.
    return not t._tempDataBuffer and t.offset == len(t.dataBuffer)


def test_plain_tcp_transports_use_filedescriptor_buffers() -> None:
    for cls in (tcp.Server, tcp.Client):
        assert issubclass(cls, abstract.FileDescriptor)
        assert cls.doWrite is abstract.FileDescriptor.doWrite
        assert cls.TLS is False  # the class default write_now checks
        assert callable(cls.writeSomeData)


def test_written_data_waits_in_tempdatabuffer_then_databuffer() -> None:
    fd = _FD()
    assert _nothing_queued(fd)
    fd.write(b"hello ")
    fd.write(b"world")
    # write() only queues, in _tempDataBuffer, and asks to be told when writable.
    assert fd._tempDataBuffer == [b"hello ", b"world"] and fd.writing
    assert not _nothing_queued(fd)
    # A partial send: the rest is dataBuffer[offset:], still "queued".
    fd.room = 4
    fd.doWrite()
    assert fd.sent == [b"hell"]
    assert not fd._tempDataBuffer and fd.dataBuffer[fd.offset:] == b"o world"
    assert not _nothing_queued(fd)
    # All sent: both buffers empty again, writing stopped.
    fd.room = 100
    fd.doWrite()
    assert b"".join(fd.sent) == b"hello world"
    assert _nothing_queued(fd) and not fd.writing
