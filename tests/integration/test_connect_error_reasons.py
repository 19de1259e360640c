"""Why the broker or the store cannot be reached, as the operator reads it (SRE report): the
reason names the endpoint tried (``amqp://host:port/vhost``, ``postgresql://host:port/db``;
never the password), and a broker's refusal gives its Connection.Close reply code and text
rather than ``InvalidFrameError: ... got <Connection.Close object at 0x...>``. Against the
local RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pgdb
import pytest
import rabbit
import structlog
from outbound_env import free_port
from rabbit import RabbitVhost

from gateway.clock import ManualClock
from gateway.config import AmqpConfig
from gateway.errors import Unavailable
from gateway.store import open_store
from gateway.transports.amqp import AmqpBroker

#: a password no reason may repeat (the broker's guest/guest cannot be changed for the tests
#: that need a login to succeed; the others use this one)
SECRET = "s3cr3t-Pw-0f-th3-t3st"
CONNECTION = "c2c-test-connect-reasons"


def _one_line_without_reprs(reason: str) -> None:
    assert "\n" not in reason
    assert "object at 0x" not in reason, reason
    assert SECRET not in reason


async def _connect_reason(url: str) -> str:
    broker = AmqpBroker(AmqpConfig(url=url), connection_name=CONNECTION)
    try:
        with pytest.raises(Unavailable) as refused:
            await broker.connect(timeout_s=10)
    finally:
        await broker.close()
    return refused.value.reason


@pytest.mark.rabbitmq
async def test_an_unknown_vhost_at_start_gives_the_endpoint_and_the_brokers_reply() -> None:
    vhost = f"c2c-test-nonexistent-{uuid.uuid4().hex}"
    url = f"amqp://{rabbit.USER}:{rabbit.PASSWORD}@{rabbit.HOST}:{rabbit.PORT}/{vhost}"
    reason = await _connect_reason(url)
    assert reason == (
        f"cannot connect to RabbitMQ at amqp://{rabbit.HOST}:{rabbit.PORT}/{vhost}: "
        f"connection closed by the broker: 530 NOT_ALLOWED - vhost {vhost} not found"
    )
    _one_line_without_reprs(reason)


@pytest.mark.rabbitmq
async def test_a_closed_broker_port_gives_the_endpoint() -> None:
    port = free_port()
    reason = await _connect_reason(f"amqp://{rabbit.USER}:{SECRET}@127.0.0.1:{port}/c2c-x")
    assert reason.startswith(
        f"cannot connect to RabbitMQ at amqp://127.0.0.1:{port}/c2c-x: ConnectionRefusedError: "
    ), reason
    _one_line_without_reprs(reason)


@pytest.mark.rabbitmq
async def test_wrong_credentials_give_the_brokers_reply_not_the_password() -> None:
    url = f"amqp://{rabbit.USER}:{SECRET}@{rabbit.HOST}:{rabbit.PORT}/"
    reason = await _connect_reason(url)
    assert reason.startswith(
        f"cannot connect to RabbitMQ at amqp://{rabbit.HOST}:{rabbit.PORT}/%2F: "
        "connection closed by the broker: 403 ACCESS_REFUSED - "
    ), reason
    _one_line_without_reprs(reason)


async def test_a_broker_that_never_answers_gives_the_endpoint_and_the_wait() -> None:
    """A listener that takes the connection and says nothing (a wrong port, a stuck broker):
    the reason was "TimeoutError" alone. And the connection cut short by the timeout is
    closed: its reconnect task went on, and swallowed the cancel of asyncio.run's shutdown,
    so ``serve`` never exited."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        broker = AmqpBroker(
            AmqpConfig(url=f"amqp://u:{SECRET}@127.0.0.1:{port}/v"), connection_name=CONNECTION
        )
        with pytest.raises(Unavailable) as refused:
            await broker.connect(timeout_s=0.5)
        await broker.close()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert refused.value.reason == (
        f"cannot connect to RabbitMQ at amqp://127.0.0.1:{port}/v: no answer within 0.5 s"
    )
    await asyncio.sleep(0.2)
    left = [
        getattr(task.get_coro(), "__qualname__", "?")
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task()
    ]
    assert left == []


async def _lost_reasons(
    broker: AmqpBroker, logs: list[dict[str, Any]], wanted: str, *, within_s: float = 20
) -> list[str]:
    """The reasons of ``amqp_connection_lost`` once one of them holds ``wanted``."""
    async with asyncio.timeout(within_s):
        while True:
            reasons = [e["reason"] for e in logs if e["event"] == "amqp_connection_lost"]
            if any(wanted in reason for reason in reasons):
                return reasons
            await asyncio.sleep(0.1)


@pytest.mark.rabbitmq
async def test_a_vhost_connection_limit_at_runtime_is_the_lost_connections_reason(
    rabbit_vhost: RabbitVhost,
) -> None:
    broker = AmqpBroker(AmqpConfig(url=rabbit_vhost.url()), connection_name=CONNECTION)
    await broker.connect()
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.to_thread(
                rabbit.rabbitmqctl,
                "set_vhost_limits",
                "-p",
                rabbit_vhost.name,
                '{"max-connections": 0}',
            )
            closed = await asyncio.to_thread(
                rabbit_vhost.close_connections, CONNECTION, "test: limit"
            )
            assert closed == 1
            reasons = await _lost_reasons(broker, logs, "connection limit (0) is reached")
    finally:
        await broker.close()
    # the close, then the refused reconnect attempts
    assert reasons[0] == "connection closed by the broker: 320 CONNECTION_FORCED - test: limit"
    refused = [r for r in reasons if "connection limit" in r]
    assert refused[0] == (
        "connection closed by the broker: 530 NOT_ALLOWED - access to vhost"
        f" '{rabbit_vhost.name}' refused for user '{rabbit.USER}': connection limit (0) is reached"
    )
    lost = [e for e in logs if e["event"] == "amqp_connection_lost"]
    assert {e["endpoint"] for e in lost} == {
        f"amqp://{rabbit.HOST}:{rabbit.PORT}/{rabbit_vhost.name}"
    }
    for reason in reasons:
        _one_line_without_reprs(reason)


@pytest.fixture
def doomed_vhost() -> Iterator[RabbitVhost]:
    """A vhost of this test's own, which the test deletes (again afterwards, if it did not)."""
    vhost = rabbit.create_vhost()
    try:
        yield vhost
    finally:
        with contextlib.suppress(RuntimeError):
            rabbit.delete_vhost(vhost)


@pytest.mark.rabbitmq
async def test_a_vhost_deleted_at_runtime_is_the_lost_connections_reason(
    doomed_vhost: RabbitVhost,
) -> None:
    broker = AmqpBroker(AmqpConfig(url=doomed_vhost.url()), connection_name=CONNECTION)
    await broker.connect()
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.to_thread(rabbit.delete_vhost, doomed_vhost)
            reasons = await _lost_reasons(broker, logs, "not found")
    finally:
        await broker.close()
    assert (
        f"connection closed by the broker: 530 NOT_ALLOWED - vhost {doomed_vhost.name} not found"
        in reasons
    ), reasons
    for reason in reasons:
        assert reason.startswith("connection closed by the broker: "), reason
        _one_line_without_reprs(reason)


def _clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))


async def _open_reason(url: str) -> Unavailable:
    store = open_store(url, clock=_clock(), timeout_s=10)
    with pytest.raises(Unavailable) as failed:
        await store.open()
    return failed.value


@pytest.mark.postgres
async def test_a_closed_store_port_gives_the_endpoint() -> None:
    port = free_port()
    failed = await _open_reason(f"postgresql://{pgdb.USER}:{SECRET}@127.0.0.1:{port}/c2c_x")
    # the start of the reason is as before (`serve` says "cannot serve: postgresql: ...")
    assert failed.reason.startswith("postgresql: ConnectionRefusedError: "), failed.reason
    assert failed.reason.endswith(f", connecting to postgresql://127.0.0.1:{port}/c2c_x")
    assert failed.outage
    _one_line_without_reprs(failed.reason)


@pytest.mark.postgres
async def test_an_unknown_database_gives_the_endpoint() -> None:
    database = f"c2c_test_nonexistent_{uuid.uuid4().hex}"
    url = f"postgresql://{pgdb.USER}:{SECRET}@{pgdb.HOST}:{pgdb.PORT}/{database}"
    failed = await _open_reason(url)
    assert failed.reason == (
        f'postgresql: InvalidCatalogNameError: database "{database}" does not exist,'
        f" connecting to postgresql://{pgdb.HOST}:{pgdb.PORT}/{database}"
    )
    _one_line_without_reprs(failed.reason)
