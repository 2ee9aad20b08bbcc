"""The log observers: relayd's text lines are exactly twistd's, the JSON
lines carry the structured fields."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher, formatEventAsClassicLogText

from relayd.logs import json_observer, text_observer


def _event(when: float | None, **fields: object) -> dict[str, object]:
    event: dict[str, object] = {
        "log_format": "{queue_id}: to=<{rcpt}> status=sent",
        "log_namespace": "relayd.mail",
        "log_level": LogLevel.info,
        "queue_id": "60E796D29F991AB9BA26",
        "rcpt": "a@example.org",
    }
    if when is not None:
        event["log_time"] = when
    event.update(fields)
    return event


def test_text_lines_are_twistds_own_format() -> None:
    out = io.StringIO()
    observe = text_observer(out)
    events = [
        _event(1_700_000_000.25),
        _event(1_700_000_000.75),  # same second: the cached timestamp
        _event(1_700_000_001.0),  # next second: a new one
        _event(None),
        _event(1_700_000_002.0, log_system="-"),
        _event(1_700_000_003.0, log_format="two\nlines"),
    ]
    for event in events:
        observe(event)
    assert out.getvalue() == "".join(formatEventAsClassicLogText(e) or "" for e in events)
    lines = out.getvalue().splitlines()
    assert lines[0].split(" ")[0] == lines[1].split(" ")[0] != lines[2].split(" ")[0]
    assert lines[3].startswith("- [relayd.mail#info] 60E796D29F991AB9BA26: to=<a@example.org>")


def test_text_observer_with_a_logger() -> None:
    out = io.StringIO()
    publisher = LogPublisher(text_observer(out))
    Logger(namespace="relayd.mail", observer=publisher).info("{queue_id}: removed",
                                                             queue_id="ABC")
    assert out.getvalue().endswith(" [relayd.mail#info] ABC: removed\n")


def test_json_lines_carry_the_fields() -> None:
    out = io.StringIO()
    json_observer(out)(_event(1_700_000_000.0))
    record = json.loads(out.getvalue())
    assert record["message"] == "60E796D29F991AB9BA26: to=<a@example.org> status=sent"
    assert record["queue_id"] == "60E796D29F991AB9BA26"
    assert record["rcpt"] == "a@example.org"
    assert record["level"] == "info"
    assert record["time"].startswith("2023-11-14T22:13:20")
