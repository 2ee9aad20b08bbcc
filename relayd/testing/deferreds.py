"""Results of Deferreds that have fired already (fakes and the inline disk
writer answer at once, driven by ``task.Clock``)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def result_of(d: Deferred[Any]) -> Any:
    """The value of a Deferred that has already fired (in-memory fakes and
    the inline disk writer answer at once); re-raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception of a Deferred that has already failed."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert hasattr(out[0], "value"), f"expected a failure, got {out[0]!r}"
    return out[0].value
