"""The endpoint named in a broker's or a store's connect failure, and the one-line description
of a broker error: never a password, never an object repr. The real refusals are in
tests/integration/test_connect_error_reasons.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiormq import exceptions as amqp_errors

from gateway.store.postgres import _endpoint as postgres_endpoint
from gateway.transports.amqp import _describe
from gateway.transports.amqp import _endpoint as amqp_endpoint
from gateway.urls import NOT_SHOWN

SECRET = "s3cr3t"


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        (
            f"amqp://gw:{SECRET}@mq.internal:5673/c2c-review-opz",
            "amqp://mq.internal:5673/c2c-review-opz",
        ),
        (f"amqp://gw:{SECRET}@mq.internal/c2c", "amqp://mq.internal:5672/c2c"),
        (f"amqps://gw:{SECRET}@mq.internal/c2c", "amqps://mq.internal:5671/c2c"),
        # the default vhost, as RabbitMQ's URI spec writes it
        (f"amqp://gw:{SECRET}@mq.internal", "amqp://mq.internal:5672/%2F"),
        (f"amqp://gw:{SECRET}@mq.internal/", "amqp://mq.internal:5672/%2F"),
        (f"amqp://gw:{SECRET}@mq.internal/%2F", "amqp://mq.internal:5672/%2F"),
        (f"amqp://gw:{SECRET}@[::1]:5673/a%2Fb", "amqp://[::1]:5673/a%2Fb"),
        # the query is not shown (it may carry TLS file names, or anything)
        (f"amqp://gw:{SECRET}@mq/c2c?heartbeat=5&password={SECRET}", "amqp://mq:5672/c2c"),
    ],
)
def test_amqp_endpoint(url: str, endpoint: str) -> None:
    assert amqp_endpoint(url) == endpoint
    assert SECRET not in endpoint


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        (f"postgresql://gw:{SECRET}@db.internal:5433/c2c", "postgresql://db.internal:5433/c2c"),
        (f"postgres://gw:{SECRET}@db.internal/c2c", "postgres://db.internal:5432/c2c"),
        (
            f"postgresql://gw:{SECRET}@db1:5433,db2/c2c?sslmode=require",
            "postgresql://db1:5433,db2:5432/c2c",
        ),
        ("postgresql://gw@db1,db2/c2c?port=6001,6002", "postgresql://db1:6001,db2:6002/c2c"),
        ("postgresql://gw@db1,db2/c2c?port=6001", "postgresql://db1:6001,db2:6001/c2c"),
        ("postgresql://gw@[::1]/c2c", "postgresql://[::1]:5432/c2c"),
        ("postgresql://%2Frun%2Fpostgresql/c2c", "postgresql://%2Frun%2Fpostgresql:5432/c2c"),
        (
            f"postgresql:///?host=%2Ftmp&dbname=c2c&password={SECRET}",
            "postgresql://%2Ftmp:5432/c2c",
        ),
    ],
)
def test_postgres_endpoint(url: str, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPORT", raising=False)
    assert postgres_endpoint(url) == endpoint
    assert SECRET not in endpoint


#: passwords holding an unencoded "/" or "?" (or "@" before one): the netloc ends early, so
#: what the driver takes for the host, port and path are the user and pieces of the password
LEAKY = [
    "{scheme}://gw:12/{secret}@mq/c2c",
    "{scheme}://gw:12/{secret}?x@127.0.0.1/c2c",
    "{scheme}://gw:12?{secret}@127.0.0.1/c2c",
    "{scheme}://gw:Pa@{secret}/x@host/vh",
    "{scheme}://us/er:{secret}@host/",
]


@pytest.mark.parametrize("template", LEAKY)
@pytest.mark.parametrize(
    ("scheme", "endpoint"), [("amqp", amqp_endpoint), ("postgresql", postgres_endpoint)]
)
def test_a_password_past_the_host_part_shows_nothing_but_the_scheme(
    template: str, scheme: str, endpoint: Callable[[str], str]
) -> None:
    # not the user either: what the driver takes for the host is the user's name
    assert endpoint(template.format(scheme=scheme, secret=SECRET)) == f"{scheme}://{NOT_SHOWN}"


def test_postgres_endpoint_default_port_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPORT", "6432")
    assert postgres_endpoint("postgresql://gw@db/c2c") == "postgresql://db:6432/c2c"


def test_a_frame_repr_is_not_shown() -> None:
    # without its traceback, the frame behind it is gone: the text is kept, the repr is not
    exc = amqp_errors.InvalidFrameError(
        "Expected one of ['Connection.OpenOk'], got <Connection.Close object at 0x7f8acef74ef0>"
    )
    assert _describe(exc) == (
        "InvalidFrameError: Expected one of ['Connection.OpenOk'], got Connection.Close"
    )


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (
            amqp_errors.ConnectionClosed(
                320, "CONNECTION_FORCED - broker forced connection closure"
            ),
            "ConnectionClosed: 320 CONNECTION_FORCED - broker forced connection closure",
        ),
        (
            amqp_errors.ConnectionNotAllowed("NOT_ALLOWED - vhost v not found"),
            "ConnectionNotAllowed: 530 NOT_ALLOWED - vhost v not found",
        ),
        (
            amqp_errors.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"),
            "ProbableAuthenticationError: 403 ACCESS_REFUSED - Login was refused",
        ),
    ],
)
def test_a_close_without_its_frame_still_gives_the_reply_code(
    exc: BaseException, text: str
) -> None:
    assert _describe(exc) == text


def test_a_refused_tcp_connect_is_named_by_its_cause() -> None:
    # as aiormq raises it: its own type, with the OSError's args
    exc = amqp_errors.AMQPConnectionError(111, "Connection refused")
    exc.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert _describe(exc) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_a_description_is_one_line() -> None:
    assert _describe(RuntimeError("first\nsecond\r\n  third")) == "RuntimeError: first second third"
    assert _describe(TimeoutError()) == "TimeoutError"
