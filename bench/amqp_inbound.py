"""AMQP inbound: raw aio-pika consume + publish-with-confirm + ack vs the gateway's AMQP
partner path (``c2c.partner.MX-ANAM.in`` through the full inbound pipeline, receipt published
to ``.out`` with a confirm, accepted message relayed to ``c2c.inbound``).

Both consumers start on the same backlog of pre-signed messages (published before timing) in
quorum queues of a throwaway vhost (removed afterwards). The rate is measured from outside,
by polling the reply queue's depth: replies per second from the first reply to the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson

from bench.common import (
    PARTNER,
    Process,
    Serve,
    Table,
    cpu_seconds,
    prepare,
    scaled,
    sign_messages,
)
from gateway.config import AmqpConfig
from gateway.transports.amqp import (
    INBOUND_EXCHANGE,
    AmqpBroker,
    OutgoingMessage,
    partner_in_queue,
    partner_out_queue,
    quorum_queue_arguments,
)

RABBIT = "guest:guest@127.0.0.1:5672"
RAW_IN, RAW_OUT = "bench.raw.in", "bench.raw.out"


def rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl not found on PATH: the AMQP benchmark needs it")
    subprocess.run([exe, "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.asynccontextmanager
async def vhost() -> AsyncIterator[str]:
    name = f"c2c-bench-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://{RABBIT}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


async def publish_backlog(url: str, lines: list[bytes], *, exchange: str, routing_key: str) -> int:
    """Publish every pre-signed message (confirmed, pipelined) before anything consumes."""
    connection = await aio_pika.connect(url)
    count = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        pending = []
        for line in lines:
            item = orjson.loads(line)
            body = item["b"].encode()
            message = OutgoingMessage(
                body=body,
                message_id=orjson.loads(body)["header"]["message_id"],
                message_type="shipment.advance_data",
                app_id=PARTNER,
                signature=item["s"],
            )
            pending.append(target.publish(message.to_aio_pika(), routing_key=routing_key))
            count += 1
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await connection.close()
    return count


async def drain_rate(url: str, queue: str, expected: int, timeout_s: float) -> float:
    """Replies per second in ``queue``, first reply to the last (polled every 20 ms)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        first: tuple[float, int] | None = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            declared = await channel.declare_queue(queue, passive=True)
            depth = declared.declaration_result.message_count or 0
            now = time.monotonic()
            if depth and first is None:
                first = (now, depth)
            if depth >= expected and first is not None:
                return (depth - first[1]) / (now - first[0]) if now > first[0] else 0.0
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{queue}: fewer than {expected} replies within {timeout_s} s")
    finally:
        await connection.close()


def broker_pid() -> int | None:
    """The local RabbitMQ node's process (``beam.smp`` running ``rabbit``), if readable."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "beam.smp":
                continue
            if b"rabbit" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    return None


async def drain_measured(
    url: str, queue: str, expected: int, timeout_s: float, consumer: int
) -> tuple[float, float, float | None]:
    """``drain_rate``, plus the consumer's and the broker's CPU per message meanwhile (µs)."""
    broker = broker_pid()
    pids = [consumer] + ([broker] if broker is not None else [])
    before = [cpu_seconds(pid) for pid in pids]
    rate = await drain_rate(url, queue, expected, timeout_s)
    used = [(cpu_seconds(pid) - b) / expected * 1e6 for pid, b in zip(pids, before, strict=True)]
    return rate, used[0], used[1] if broker is not None else None


async def declare_raw_queues(url: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in (RAW_IN, RAW_OUT):
            await channel.declare_queue(
                name, durable=True, arguments=quorum_queue_arguments(name, delivery_limit=5)
            )
    finally:
        await connection.close()


async def declare_gateway_topology(url: str) -> None:
    """The gateway's own declarations, plus a consumer-side queue bound to ``c2c.inbound``
    (a CBP system), without which the relay's mandatory publishes are never confirmed."""
    broker = AmqpBroker(AmqpConfig(url=url))
    await broker.connect()
    try:
        await broker.declare_topology([PARTNER])
    finally:
        await broker.close()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("bench.cbp", durable=True)
        await queue.bind(INBOUND_EXCHANGE, routing_key="#")
    finally:
        await connection.close()


async def amqp_inbound(root: Path) -> Table:
    count = int(scaled(6_000, 1_500))
    timeout = scaled(300.0, 120.0)
    table = Table("3. AMQP inbound (raw aio-pika consume+confirm+ack vs gateway partner path)")
    async with vhost() as url:
        config = prepare(root, amqp_url=url)
        raw_payloads = sign_messages(root, root / "raw.jsonl", count=count)
        await declare_raw_queues(url)
        await publish_backlog(
            url, raw_payloads.read_bytes().splitlines(), exchange="", routing_key=RAW_IN
        )
        raw = await Process(
            ["-m", "bench.raw_amqp", "--url", url, "--in-queue", RAW_IN, "--out-queue", RAW_OUT]
        ).start()
        try:
            raw_rate, raw_cpu, raw_broker = await drain_measured(
                url, RAW_OUT, count, timeout, raw.pid
            )
        finally:
            await raw.stop()

        payloads = sign_messages(root, root / "gateway.jsonl", count=count)
        await declare_gateway_topology(url)
        inbox = partner_in_queue(PARTNER)
        await publish_backlog(
            url, payloads.read_bytes().splitlines(), exchange=inbox, routing_key=""
        )
        gateway = await Serve(config).start()
        try:
            gw_rate, gw_cpu, gw_broker = await drain_measured(
                url, partner_out_queue(PARTNER), count, timeout, gateway.pid
            )
        finally:
            await gateway.stop()
    table.add(f"messages/s ({count:,} backlog, prefetch 50)", raw_rate, gw_rate, "/s")
    table.add("consumer CPU per message", raw_cpu, gw_cpu, "us")
    table.add("broker CPU per message", raw_broker, gw_broker, "us")
    table.notes.append(
        f"target >= 0.50 of raw aio-pika: {'MET' if gw_rate >= 0.5 * raw_rate else 'MISSED'}"
        f" ({gw_rate / raw_rate:.2f})"
    )
    table.notes.append(
        "gateway per message: verify, validate, store (SQLite), signed receipt published to "
        ".out with a confirm, then ack; the relay also publishes it to c2c.inbound (confirmed)"
    )
    return table
