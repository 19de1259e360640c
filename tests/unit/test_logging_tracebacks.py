"""A traceback is logged in full once a minute per event and place; repeats are one line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gateway.logging import RepeatedTracebacks, configure_logging


def _raise_here(message: str) -> None:
    raise RuntimeError(message)


def _raise_elsewhere() -> None:
    raise RuntimeError("elsewhere")


def _caught(raiser: Any, *args: Any) -> BaseException:
    try:
        raiser(*args)
    except RuntimeError as exc:
        return exc
    raise AssertionError("did not raise")


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _render(processor: RepeatedTracebacks, event: str, exc: BaseException) -> dict[str, Any]:
    out = processor(None, "error", {"event": event, "exc_info": exc})
    return dict(structlog.processors.format_exc_info(None, "error", out))


def test_a_repeat_within_the_window_is_one_line_naming_where_it_was_raised() -> None:
    clock = FakeMonotonic()
    processor = RepeatedTracebacks(60.0, monotonic=clock)
    first = _render(processor, "inbound_internal_error", _caught(_raise_here, "input 1"))
    assert first["exception"].startswith("Traceback (most recent call last)")
    assert "repeats_since_last_traceback" not in first

    clock.now += 59.0
    second = _render(processor, "inbound_internal_error", _caught(_raise_here, "input 2"))
    assert "Traceback" not in second["exception"]
    assert second["exception"].startswith("RuntimeError: input 2 (raised at ")
    assert "test_logging_tracebacks.py:" in second["exception"]
    assert "the same traceback was logged in full at " in second["exception"]
    assert "exc_info" not in second

    clock.now += 1.0
    third = _render(processor, "inbound_internal_error", _caught(_raise_here, "input 3"))
    assert third["exception"].startswith("Traceback (most recent call last)")
    assert third["repeats_since_last_traceback"] == 1


def test_another_place_or_another_event_gets_its_own_full_traceback() -> None:
    processor = RepeatedTracebacks(60.0, monotonic=FakeMonotonic())
    _render(processor, "inbound_internal_error", _caught(_raise_here, "x"))
    elsewhere = _render(processor, "inbound_internal_error", _caught(_raise_elsewhere))
    assert elsewhere["exception"].startswith("Traceback (most recent call last)")
    other_event = _render(processor, "relay_failed", _caught(_raise_here, "x"))
    assert other_event["exception"].startswith("Traceback (most recent call last)")


def test_the_oldest_traceback_is_forgotten_beyond_the_bound() -> None:
    processor = RepeatedTracebacks(60.0, max_keys=2, monotonic=FakeMonotonic())
    for event in ("a", "b", "c"):
        _render(processor, event, _caught(_raise_here, "x"))
    assert _render(processor, "a", _caught(_raise_here, "x"))["exception"].startswith("Traceback")
    assert "Traceback" not in _render(processor, "c", _caught(_raise_here, "x"))["exception"]


@pytest.fixture
def json_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = structlog.get_config(), list(root.handlers), root.level
    configure_logging(logging.INFO, json=True, cache=False)
    try:
        yield
    finally:
        structlog.configure(**saved[0])
        root.handlers[:] = saved[1]
        root.setLevel(saved[2])


def _lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.strip().splitlines()]


def test_the_configured_loggers_log_a_repeated_traceback_once(
    json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = structlog.get_logger("test")
    for attempt in range(3):
        try:
            _raise_here(f"attempt {attempt}")
        except RuntimeError:
            log.exception("poison_attempt_failed_in_test", attempt=attempt)
    stdlib = logging.getLogger("test.stdlib")
    for attempt in range(2):
        try:
            _raise_here(f"stdlib {attempt}")
        except RuntimeError:
            stdlib.exception("stdlib_failure_in_test")
    lines = _lines(capsys.readouterr().err)
    assert [line["attempt"] for line in lines[:3]] == [0, 1, 2]
    assert lines[0]["exception"].startswith("Traceback (most recent call last)")
    for line in lines[1:3]:
        assert line["exception"].startswith("RuntimeError: attempt ")
        assert "Traceback" not in line["exception"]
    assert lines[3]["exception"].startswith("Traceback (most recent call last)")
    assert lines[4]["exception"].startswith("RuntimeError: stdlib 1 (raised at ")
