"""Log observers for ``[server] log_format``.

``text`` is twistd's own line format, with the timestamp formatted once a
second instead of once a line (working out the local UTC offset and
strftime cost ~4% of the reactor thread at a few hundred messages/s).
``json`` writes one JSON object per line for log pipelines: the formatted
text (the Postfix-style mail log line)
plus every structured field the event carried (``queue_id``, ``rcpt``,
``relay``, ``status``...), so nothing has to be parsed back out of text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, formatEvent, formatEventAsClassicLogText, formatTime

_SCALARS = (str, int, float, bool, type(None))


def json_line(event: dict[str, Any]) -> str:
    """One log event as a JSON line."""
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, UTC).isoformat() if when else None,
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key.startswith("_"):
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False)


def json_observer(out: IO[str] | None = None) -> Callable[[dict[str, Any]], None]:
    """twistd ``--logger relayd.logs.json_observer``: JSON lines on stdout."""
    stream = out if out is not None else sys.stdout

    def observe(event: dict[str, Any]) -> None:
        stream.write(json_line(event) + "\n")
        stream.flush()

    return observe


def text_observer(out: IO[str] | None = None) -> FileLogObserver:
    """twistd ``--logger relayd.logs.text_observer``: twistd's text lines on
    stdout."""
    stream = out if out is not None else sys.stdout
    cached: tuple[int, str] = (-1, "")

    def format_time(when: float | None) -> str:
        nonlocal cached
        if when is None:
            return "-"
        second = int(when)
        if cached[0] != second:
            # One tuple, replaced whole: a log call from another thread
            # never sees one second's key with another's text.
            cached = (second, formatTime(second))
        return cached[1]

    return FileLogObserver(
        stream, lambda event: formatEventAsClassicLogText(event, formatTime=format_time)
    )
