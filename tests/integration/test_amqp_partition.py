"""A network partition between the gateway and RabbitMQ (RELIABILITY-SECURITY T72): the path
goes silent, as behind a firewall that drops packets both ways, while a partner keeps sending
over HTTPS, and then heals.

T72 asks for a 5-minute cut. What a long cut does that a short one does not is outlast the
AMQP heartbeat, so the gateway must find the connection dead by itself, and then fail to
reconnect again and again. Here the heartbeat is 5 s (the broker's default is 60 s) and the
silence 30 s: six heartbeat intervals, as a 5-minute silence is five of the default's.

A real ``c2c-gateway serve`` talks to the local RabbitMQ through a loopback relay that the test
silences. Ingest goes on: every message is answered 202 and stored. ``/readyz`` says the broker
is down. After the heal, the gateway is connected again, and every message reaches the CBP
side's queue.

``/readyz`` does not wait for the heartbeat: it sends RabbitMQ a round trip of its own, and a
silence of a few seconds, far shorter than a heartbeat interval, is reported as the broker
being unavailable until the path carries the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aio_pika
import aiohttp
import pytest
import rabbit
from amqp_env import partner_messages, write_config
from amqp_peer import bind_sink, drain
from rabbit import RabbitVhost
from serve_proc import ServeProcess, partner_client_ssl, readiness, send_until_receipt
from store_rows import Database
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

HEARTBEAT_S = 5
SILENCE_S = 30.0
PATH = "/c2c/v1/messages"
#: the broker's default: no heartbeat is missed during the short stall of the readiness test
DEFAULT_HEARTBEAT_S = 60


async def through_proxy(
    tmp_path: Path, rabbit_vhost: RabbitVhost, heartbeat_s: int
) -> tuple[TcpProxy, Path]:
    """A proxy to the broker, started, and a gateway configuration reaching the broker
    through it with ``heartbeat_s``."""
    proxy = TcpProxy(rabbit.PORT, rabbit.HOST)
    await proxy.start()
    url = (
        f"amqp://{rabbit.USER}:{rabbit.PASSWORD}@127.0.0.1:{proxy.port}/{rabbit_vhost.name}"
        f"?heartbeat={heartbeat_s}"
    )
    return proxy, write_config(tmp_path, amqp_url=url, amqp_partner_https=True)


async def test_a_silent_broker_path_stops_nothing_and_drains_after_the_heal(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    proxy, source = await through_proxy(tmp_path, rabbit_vhost, HEARTBEAT_S)
    pki = tmp_path / "certs"
    messages = partner_messages(tmp_path, 90)
    before, during, after = messages[:30], messages[30:60], messages[60:]
    database = Database(f"sqlite:///{tmp_path / 'c2c.db'}")
    direct = await aio_pika.connect(rabbit_vhost.url())
    serve = ServeProcess(source)
    try:
        sink = await bind_sink(await direct.channel())
        await serve.start()
        url = serve.partner_url + PATH
        connector = aiohttp.TCPConnector(ssl=partner_client_ssl(pki))
        async with aiohttp.ClientSession(connector=connector) as session:

            async def send(batch: list[tuple[str, bytes, str]]) -> list[int]:
                statuses = []
                for _, body, signature in batch:
                    async with asyncio.timeout(10):
                        status, _, _ = await send_until_receipt(session, url, body, signature)
                    statuses.append(status)
                return statuses

            assert await send(before) == [202] * len(before)
            assert (await readiness(serve, pki))[0] == 200

            proxy.black_hole = True
            loop = asyncio.get_running_loop()
            silenced_at = loop.time()
            # ingest goes on through the silence: stored and answered, a message at a time
            answered = []
            broker_down_seen = False
            for item in during:
                answered += await send([item])
                status, body = await readiness(serve, pki)
                if status == 503:
                    assert "amqp" in str(body).lower() or "rabbitmq" in str(body).lower(), body
                    broker_down_seen = True
                await asyncio.sleep(SILENCE_S / len(during))
            assert answered == [202] * len(during)
            assert loop.time() - silenced_at >= SILENCE_S
            # the gateway found the silent connection dead by itself (heartbeats)
            assert broker_down_seen
            stranded = await database.rows(
                "SELECT count(*) FROM inbound_messages WHERE NOT relayed"
            )
            assert stranded[0][0] > 0, "nothing waited for the broker"

            proxy.black_hole = False
            assert await send(after) == [202] * len(after)
        # connected again by itself, and the backlog drains
        await database.until("SELECT count(*) FROM inbound_messages WHERE NOT relayed", [(0,)], 60)
        async with asyncio.timeout(30):
            while (await readiness(serve, pki))[0] != 200:  # noqa: ASYNC110 (polled state)
                await asyncio.sleep(0.2)
        assert await serve.stop() == 0
        assert b'"amqp_connection_lost"' in serve.stderr_log
        assert b'"amqp_reconnected"' in serve.stderr_log
        on_the_bus = await drain(sink)
        assert {m.message_id for m in on_the_bus} == {m for m, _, _ in messages}
        stored = await database.rows("SELECT count(*) FROM inbound_messages")
        assert stored == [(len(messages),)]
    finally:
        if serve.proc is not None and serve.proc.returncode is None:
            with contextlib.suppress(Exception):
                await serve.stop()
        await direct.close()
        await proxy.cut()


async def test_readyz_finds_a_stalled_broker_path_within_seconds_not_heartbeats(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    proxy, source = await through_proxy(tmp_path, rabbit_vhost, DEFAULT_HEARTBEAT_S)
    pki = tmp_path / "certs"
    serve = ServeProcess(source)
    loop = asyncio.get_running_loop()
    try:
        await serve.start()
        assert await readiness(serve, pki) == (
            200,
            {"status": "ready", "checks": {"store": "ok", "broker": "ok"}},
        )

        proxy.stall()
        stalled_at = loop.time()
        answers = []
        for _ in range(3):
            asked = loop.time()
            status, body = await readiness(serve, pki)
            answers.append((status, body["checks"]["broker"], loop.time() - asked))
        assert loop.time() - stalled_at < 10, answers
        for status, broker, took in answers:
            assert status == 503, answers
            assert broker.startswith("unavailable: RabbitMQ has not answered a round trip"), broker
            # a caller waits at most the probe's timeout, whatever the probe before it did
            assert took < 4, answers
        assert body["checks"]["store"] == "ok"

        proxy.flow()
        async with asyncio.timeout(10):
            while (await readiness(serve, pki))[0] != 200:  # noqa: ASYNC110 (polled state)
                await asyncio.sleep(0.2)
        # the same connection carried the answer: no reconnect was needed
        assert b"amqp_connection_lost" not in serve.stderr_log
        assert await serve.stop() == 0
    finally:
        proxy.flow()
        if serve.proc is not None and serve.proc.returncode is None:
            with contextlib.suppress(Exception):
                await serve.stop()
        await proxy.cut()
