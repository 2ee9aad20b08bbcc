"""One set of ISpool tests, run against the real spool and its in-memory twin.

``MemorySpool`` stands in for ``Spool`` in the cleanup and queue manager
tests; these tests are what makes that substitution honest: every test in
``SpoolContract`` runs once per implementation (the ``spool`` fixture is
parametrized), so a difference in behaviour fails here rather than hiding
in the tests that use the fake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from relayd import testing
from relayd.content import IN_MEMORY_LIMIT
from relayd.diskio import InlineDiskWriter
from relayd.envelope import Envelope, Event, QueuedMessage, is_queue_id
from relayd.interfaces import ISpool, ISpoolWriter
from relayd.queue import spool as spool_module
from relayd.queue.spool import Spool
from relayd.testing import MemorySpool, failure_of
from relayd.testing import result_of as result

NOW = 1_700_000_000.0


def envelope(**kw: Any) -> Envelope:
    base: dict[str, Any] = dict(
        sender="a@example.org", recipients=("b@example.net", "ç@exemple.fr"), route="outbox",
        arrival=NOW + 0.25, listener="mta", client_address="192.0.2.7", helo="c.test",
        user="app1", smtputf8=True, body="8BITMIME",
    )
    base.update(kw)
    return Envelope(**base)






def make_real(tmp_path: Path, clock: Clock) -> Spool:
    spool = Spool(str(tmp_path / "spool"), clock, InlineDiskWriter())
    spool.prepare()
    return spool


def make_memory(tmp_path: Path, clock: Clock) -> MemorySpool:
    spool = MemorySpool(clock)
    spool.prepare()
    return spool


@pytest.fixture(params=[make_real, make_memory], ids=["Spool", "MemorySpool"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    clock = Clock()
    clock.advance(NOW)
    return request.param(tmp_path, clock)


def commit(spool: Any, content: bytes, env: Envelope | None = None, chunk: int = 5) -> QueuedMessage:
    writer = spool.open_message(env or envelope())
    for i in range(0, len(content), chunk):
        writer.write(content[i : i + chunk])
    return result(writer.commit())


class TestSpoolContract:
    """What the queue manager and cleanup may rely on from any ``ISpool``."""

    def test_provides_the_interfaces(self, spool: Any) -> None:
        """Both spools and their writers declare and implement the interfaces."""
        assert verifyObject(ISpool, spool)
        assert verifyObject(ISpoolWriter, spool.open_message(envelope()))

    def test_new_spool_is_empty_and_writable(self, spool: Any) -> None:
        """A freshly prepared spool recovers nothing and accepts writes."""
        assert result(spool.recover()) == []
        assert spool.writable() is True

    def test_commit_then_recover_lists_it(self, spool: Any) -> None:
        """A committed message is recovered with the same envelope and its size."""
        content = b"Subject: hi\r\n\r\nbody\r\n"
        env = envelope()
        message = commit(spool, content, env)
        assert message.envelope == evolve(env, size=len(content))
        assert (message.attempts, message.next_attempt, message.last_error, message.held,
                message.done) == (0, 0.0, None, False, ())
        [found] = result(spool.recover())
        assert found == message
        assert found.envelope.size == len(content)
        assert found.envelope.recipients == ("b@example.net", "ç@exemple.fr")
        assert result(spool.read(message.queue_id)) == message

    def test_queue_id_is_known_before_commit(self, spool: Any) -> None:
        """The writer's queue id (used in Received:) is the committed message's id."""
        writer = spool.open_message(envelope())
        assert is_queue_id(writer.queue_id)
        writer.write(b"x\r\n")
        assert result(writer.commit()).queue_id == writer.queue_id

    def test_uncommitted_message_is_invisible(self, spool: Any) -> None:
        """Until commit, a message being written is neither recovered nor loadable."""
        writer = spool.open_message(envelope())
        writer.write(b"x\r\n")
        assert result(spool.recover()) == []
        assert isinstance(failure_of(spool.load(writer.queue_id)), OSError)

    def test_load_returns_exact_content(self, spool: Any) -> None:
        """load() gives back every byte, CRLFs, NULs and 8-bit included."""
        content = b"Subject: \xc3\xa7a\r\n\r\n" + bytes(range(256)) + b"\r\n.\r\n\r\n"
        message = commit(spool, content, chunk=3)
        assert result(spool.load(message.queue_id)).read() == content

    def test_load_of_a_big_message(self, spool: Any) -> None:
        """Past IN_MEMORY_LIMIT, load() still gives the exact size, header section,
        chunks and bytes (the real spool leaves the content in its file)."""
        content = b"Subject: big\r\n\r\n" + bytes(range(256)) * 1000 + b"\r\n"
        assert len(content) > IN_MEMORY_LIMIT
        message = commit(spool, content, chunk=65536)
        loaded = result(spool.load(message.queue_id))
        assert loaded.size == len(content) == message.envelope.size
        assert loaded.head(16) == b"Subject: big\r\n\r\n"
        chunks = list(loaded.chunks(1000))
        assert max(map(len, chunks)) == 1000 and b"".join(chunks) == content
        assert not loaded.isascii()
        assert loaded.read() == content

    def test_empty_message(self, spool: Any) -> None:
        """An empty message commits with size 0 and loads as b''."""
        message = commit(spool, b"")
        assert message.envelope.size == 0
        assert result(spool.load(message.queue_id)).read() == b""

    def test_recover_orders_oldest_first(self, spool: Any) -> None:
        """recover() lists messages by arrival, whatever the commit order."""
        late = commit(spool, b"late\r\n", envelope(arrival=NOW + 50))
        early = commit(spool, b"early\r\n", envelope(arrival=NOW - 50))
        middle = commit(spool, b"middle\r\n", envelope(arrival=NOW))
        ids = [m.queue_id for m in result(spool.recover())]
        assert ids == [early.queue_id, middle.queue_id, late.queue_id]

    def test_defer_persists_retry_state(self, spool: Any) -> None:
        """attempts, next_attempt, last_error, held and done survive recover() and read()."""
        message = commit(spool, b"x\r\n")
        deferred = evolve(message, attempts=3, next_attempt=NOW + 900.5,
                          last_error="451 4.7.1 try later", held=True, done=("ç@exemple.fr",))
        assert result(spool.defer(deferred)) is None
        [found] = result(spool.recover())
        assert (found.attempts, found.next_attempt, found.last_error, found.held, found.done) == (
            3, NOW + 900.5, "451 4.7.1 try later", True, ("ç@exemple.fr",),
        )
        assert found.envelope == message.envelope
        assert result(spool.read(message.queue_id)) == found

    def test_defer_again_replaces_state(self, spool: Any) -> None:
        """A later defer() overwrites the earlier state (release of a held message)."""
        message = commit(spool, b"x\r\n")
        result(spool.defer(evolve(message, attempts=1, held=True, last_error="550 no")))
        result(spool.defer(evolve(message, attempts=2, next_attempt=NOW + 60, held=False,
                                  done=("b@example.net",))))
        [found] = result(spool.recover())
        assert (found.attempts, found.next_attempt, found.last_error, found.held, found.done) == (
            2, NOW + 60, None, False, ("b@example.net",),
        )

    def test_defer_does_not_change_the_envelope(self, spool: Any) -> None:
        """Only retry state is persisted: the committed envelope is kept."""
        message = commit(spool, b"x\r\n")
        other = evolve(message, envelope=envelope(sender="mallory@example.org"), attempts=1)
        result(spool.defer(other))
        [found] = result(spool.recover())
        assert found.envelope == message.envelope
        assert found.attempts == 1

    def test_remove_forgets_it(self, spool: Any) -> None:
        """A removed message is gone for recover(), read() and load(); others stay."""
        gone = commit(spool, b"gone\r\n")
        result(spool.defer(evolve(gone, attempts=1, next_attempt=NOW + 60)))
        kept = commit(spool, b"kept\r\n")
        assert result(spool.remove(gone.queue_id)) is None
        assert [m.queue_id for m in result(spool.recover())] == [kept.queue_id]
        assert isinstance(failure_of(spool.load(gone.queue_id)), OSError)
        assert isinstance(failure_of(spool.read(gone.queue_id)), OSError)
        assert result(spool.load(kept.queue_id)).read() == b"kept\r\n"

    def test_removed_message_keeps_its_final_state(self, spool: Any) -> None:
        """remove(id, final) keeps final (envelope, state, history) for finished();
        a later removal of the same id wins; never-removed ids have none."""
        message = commit(spool, b"x\r\n")
        final = evolve(message, attempts=2, done=message.envelope.recipients,
                       history=(Event.of(NOW, "deferred", ("b@example.net",), "outbox",
                                         reply="451 4.3.0 later"),
                                Event.of(NOW + 60, "sent", message.envelope.recipients,
                                         "outbox", "smtp.test[192.0.2.1]:25", "250 ok")))
        assert result(spool.finished(message.queue_id)) is None
        result(spool.remove(message.queue_id, final))
        assert result(spool.finished(message.queue_id)) == final
        assert result(spool.finished("0" * 20)) is None
        assert result(spool.recover()) == []

    def test_remove_unknown_fails(self, spool: Any) -> None:
        """Removing a message that is not there is an error (OSError), not silence."""
        assert isinstance(failure_of(spool.remove("0" * 20)), OSError)

    def test_defer_after_remove_does_not_resurrect(self, spool: Any) -> None:
        """Retry state written for a removed message does not bring it back."""
        message = commit(spool, b"x\r\n")
        result(spool.remove(message.queue_id))
        spool.defer(evolve(message, attempts=1))
        assert result(spool.recover()) == []

    def test_abort_leaves_nothing(self, spool: Any) -> None:
        """An aborted message is never listed or loadable, spilled or not."""
        for size in (10, 3 * 1024 * 1024):
            writer = spool.open_message(envelope())
            writer.write(b"q" * size)
            writer.abort()
            assert isinstance(failure_of(spool.load(writer.queue_id)), OSError)
        assert result(spool.recover()) == []
        if isinstance(spool, Spool):
            assert Path(spool.path("tmp")).exists() and not any(Path(spool.path("tmp")).iterdir())

    def test_ids_unique(self, spool: Any) -> None:
        """Queue ids are valid and never repeat, even within one clock tick."""
        ids = [commit(spool, b"x\r\n").queue_id for _ in range(200)]
        assert len(set(ids)) == len(ids)
        assert all(is_queue_id(i) for i in ids)
        assert {m.queue_id for m in result(spool.recover())} == set(ids)

    def test_id_collision_fails_without_overwriting(
        self, spool: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A writer whose id is already queued fails to commit; the first message stays."""
        first = commit(spool, b"first\r\n")
        monkeypatch.setattr(spool_module, "new_queue_id", lambda now: first.queue_id)
        monkeypatch.setattr(testing.spool, "new_queue_id", lambda now: first.queue_id)
        writer = spool.open_message(envelope())
        writer.write(b"second\r\n")
        assert isinstance(failure_of(writer.commit()), OSError)
        assert result(spool.load(first.queue_id)).read() == b"first\r\n"
        assert [m.queue_id for m in result(spool.recover())] == [first.queue_id]
