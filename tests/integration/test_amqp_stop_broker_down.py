"""Stopping ``c2c-gateway serve`` while RabbitMQ cannot be reached (SRE review M1), and the
outage on ``/metrics`` (M2).

A rolling restart or a node drain during a broker incident sends SIGTERM to a gateway whose
robust connection is reconnecting (the broker refuses), or whose path to the broker is silent
(a firewall dropping packets: the connection still looks open). Either way ``serve`` must
finish within its documented bound and exit 0, well inside Kubernetes' default 30 s grace
period, instead of waiting on consumer cancels that cannot be answered.

A real ``serve`` reaches the local RabbitMQ through a loopback relay the test cuts (every
connection dropped, new ones refused) or silences (connections kept, nothing delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
import rabbit
from amqp_env import write_config
from rabbit import RabbitVhost
from serve_proc import ServeProcess, readiness
from tcp_proxy import TcpProxy

from gateway.config import AmqpConfig
from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.transports.amqp import AmqpBroker

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

#: what a stop may take here: no request and no delivery is in flight, so nothing is waited
#: for but the broker side's own bounded steps (Kubernetes' default grace period is 30 s)
STOP_BOUND_S = 15.0


async def serving_through_proxy(
    tmp_path: Path, vhost: RabbitVhost
) -> tuple[TcpProxy, ServeProcess]:
    proxy = TcpProxy(rabbit.PORT, rabbit.HOST)
    await proxy.start()
    # the broker's default heartbeat (60 s): a silent path is not found dead during the test
    url = f"amqp://{rabbit.USER}:{rabbit.PASSWORD}@127.0.0.1:{proxy.port}/{vhost.name}"
    serve = ServeProcess(write_config(tmp_path, amqp_url=url, amqp_partner_https=True))
    await serve.start()
    assert (await readiness(serve, tmp_path / "certs"))[0] == 200
    return proxy, serve


async def broker_gauges(serve: ServeProcess, root: Path) -> tuple[float, float]:
    """``c2c_amqp_connected`` and ``c2c_amqp_connection_losses_total`` on serve's /metrics."""
    ca = ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(serve.api_url + "/metrics", ssl=ca) as response,
    ):
        text = await response.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("c2c_amqp_"):
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values["c2c_amqp_connected"], values["c2c_amqp_connection_losses_total"]


async def stop_within(serve: ServeProcess, bound_s: float) -> tuple[int, float]:
    """SIGTERM; the exit status and how long it took (fails at ``bound_s``, then kills)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    proc = serve.proc
    assert proc is not None
    try:
        async with asyncio.timeout(bound_s):
            code = await serve.stop()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"serve still running {bound_s}s after SIGTERM: {serve.stderr_log[-2000:]!r}")
    return code, loop.time() - began


@pytest.mark.parametrize("outage", ["refused", "silent"])
async def test_sigterm_while_the_broker_cannot_be_reached_stops_in_time(
    tmp_path: Path, rabbit_vhost: RabbitVhost, outage: str
) -> None:
    proxy, serve = await serving_through_proxy(tmp_path, rabbit_vhost)
    try:
        assert await broker_gauges(serve, tmp_path) == (1.0, 0.0)
        if outage == "refused":
            await proxy.cut()
        else:
            proxy.black_hole = True
        # the gateway notices (refused: the robust connection reconnects every second)
        await asyncio.sleep(3)
        if outage == "refused":
            assert b'"amqp_connection_lost"' in serve.stderr_log
            # serve exports the outage (M2): Prometheus sees it, not only /readyz
            assert await broker_gauges(serve, tmp_path) == (0.0, 1.0)
        code, took = await stop_within(serve, STOP_BOUND_S)
        assert code == 0
        assert b'"gateway_stopped"' in serve.stderr_log
        # reconnect attempts are the gateway's amqp_connection_lost warnings, not library
        # errors (SRE review L1)
        lines = [json.loads(line) for line in serve.stderr_log.splitlines() if line[:1] == b"{"]
        errors = [line for line in lines if line.get("level") in ("error", "critical")]
        assert errors == [], errors
        if outage == "silent":
            # one bound for every consumer's cancel, not one per consumer
            assert took < 10.0, took
    finally:
        proxy.black_hole = False
        if serve.proc is not None and serve.proc.returncode is None:
            serve.proc.kill()
            with contextlib.suppress(Exception):
                await serve.proc.wait()
        await proxy.cut()


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_a_lost_broker_shows_on_metrics_until_it_is_back(rabbit_vhost: RabbitVhost) -> None:
    """SRE review M2: ``c2c_amqp_connected`` goes 0 while the connection is lost and back to 1
    on reconnect; ``c2c_amqp_connection_losses_total`` counts the outage once, not once per
    failed reconnect attempt. A gateway without RabbitMQ exports neither."""
    assert sample(Metrics(), "c2c_amqp_connected") is None
    proxy = TcpProxy(rabbit.PORT, rabbit.HOST)
    await proxy.start()
    url = f"amqp://{rabbit.USER}:{rabbit.PASSWORD}@127.0.0.1:{proxy.port}/{rabbit_vhost.name}"
    broker = AmqpBroker(AmqpConfig(url=url))
    metrics = Metrics()
    metrics.watch_broker(broker)
    metrics.watch_broker(broker)  # once per registry
    try:
        assert sample(metrics, "c2c_amqp_connected") == 0.0  # not connected yet
        await broker.connect()
        assert sample(metrics, "c2c_amqp_connected") == 1.0
        assert sample(metrics, "c2c_amqp_connection_losses_total") == 0.0

        await proxy.cut()
        async with asyncio.timeout(10):
            while sample(metrics, "c2c_amqp_connected") != 0.0:  # noqa: ASYNC110 (polled)
                await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # three failed reconnect attempts
        assert sample(metrics, "c2c_amqp_connected") == 0.0
        assert sample(metrics, "c2c_amqp_connection_losses_total") == 1.0

        await proxy.start()  # the same port again
        async with asyncio.timeout(15):
            while sample(metrics, "c2c_amqp_connected") != 1.0:  # noqa: ASYNC110 (polled)
                await asyncio.sleep(0.05)
        assert sample(metrics, "c2c_amqp_connection_losses_total") == 1.0

        # a silent path: connected until a readiness round trip goes unanswered
        proxy.stall()
        with pytest.raises(Unavailable):
            await broker.ping()
        assert sample(metrics, "c2c_amqp_connected") == 0.0
        proxy.flow()
        async with asyncio.timeout(10):
            while sample(metrics, "c2c_amqp_connected") != 1.0:  # noqa: ASYNC110 (polled)
                await asyncio.sleep(0.05)
        await broker.close()
        assert sample(metrics, "c2c_amqp_connected") == 0.0
    finally:
        proxy.flow()
        await broker.close()
        await proxy.cut()
