"""A broker message that aiormq logs (a return it has no publish for: ``log.error("Unhandled
message %r returning", message)``) must not put the partner's payload in the log."""

from __future__ import annotations

import json
import logging

import pytest
import structlog
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from gateway.logging import configure_logging


def test_a_logged_broker_message_names_its_id_and_size_not_its_body(
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = b'{"header":{},"payload":{"consignee":"SECRET-NAME-4711"}}'
    header = ContentHeader(
        body_size=len(body),
        properties=spec.Basic.Properties(message_id="01a2426d-709e-761a-bbb5-5b2cc1d453c5"),
    )
    message = DeliveredMessage(
        delivery=spec.Basic.Return(
            reply_code=312, reply_text="NO_ROUTE", exchange="c2c.inbound", routing_key="k"
        ),
        header=header,
        body=body,
        channel=None,  # type: ignore[arg-type]
    )
    root = logging.getLogger()
    saved = structlog.get_config(), list(root.handlers), root.level
    configure_logging(logging.INFO, json=True, cache=False)
    try:
        logging.getLogger("aiormq.channel").error("Unhandled message %r returning", message)
    finally:
        structlog.configure(**saved[0])
        root.handlers[:] = saved[1]
        root.setLevel(saved[2])
    err = capsys.readouterr().err
    assert "SECRET-NAME-4711" not in err
    line = json.loads(err.strip().splitlines()[-1])
    assert line["event"] == (
        "Unhandled message <DeliveredMessage message_id='01a2426d-709e-761a-bbb5-5b2cc1d453c5',"
        f" body of {len(body)} bytes not logged> returning"
    )
    assert line["level"] == "error"
