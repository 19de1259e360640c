"""RELIABILITY-SECURITY T55: a backlog waiting in the partner's queue when ``serve`` starts.

The broker holds the backlog, not the gateway: the partner channel's prefetch bounds the
deliveries in hand, nothing else grows with the backlog (asyncio tasks, the relay's hand-over,
the resident set), and the whole backlog drains: each message stored once, ACKed and routed.

The catalogue's 100,000 small messages would take minutes here; 3,000 messages of 64 KiB
(190 MiB waiting, against a resident-set allowance of prefetch x size x 3) make a gateway that
took in more than it handles visible just as well, in about half a minute.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from amqp_env import AMQP_PARTNER, GATEWAY, write_config
from amqp_peer import IN_EXCHANGE, OUT_QUEUE, SINK_QUEUE, bind_sink, preload, queue_depth
from prometheus_client.parser import text_string_to_metric_families
from rabbit import RabbitVhost
from serve_proc import ServeProcess, signed_messages

from gateway.schemas.registry import SchemaRegistry

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

BACKLOG = 3000
PREFETCH = 32
#: house consignments per manifest: a body of about 64 KiB
HOUSES = 130
MiB = 1 << 20
#: the relay's defaults: records per publish round, bytes held for it at most
RELAY_BATCH = 100
HANDOVER_BYTES = 32 * MiB


def large_manifest(houses: int) -> dict[str, Any]:
    """A valid ``shipment.manifest`` of one master with ``houses`` house consignments."""
    payload = copy.deepcopy(SchemaRegistry.load_builtin().examples("shipment.manifest", "1.0")[0])
    master = payload["masters"][0]
    template = master["houses"][1]
    master["houses"] = []
    for n in range(houses):
        house = copy.deepcopy(template)
        house["house_document"]["reference"] = f"HX{n:08d}"
        house["gross_mass_kg"] = 1.0
        master["houses"].append(house)
    master["pieces"], master["gross_mass_kg"] = houses, float(houses)
    payload["totals"] = {"bills": houses, "pieces": houses, "gross_mass_kg": float(houses)}
    return payload


async def scrape(
    session: aiohttp.ClientSession, serve: ServeProcess, ca: ssl.SSLContext
) -> dict[str, float]:
    """The gateway's own ``/metrics``, as sample name -> value (unlabelled or summed)."""
    async with session.get(serve.api_url + "/metrics", ssl=ca) as response:
        assert response.status == 200
        text = await response.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def test_a_preloaded_backlog_drains_with_bounded_memory_and_tasks(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    config = write_config(tmp_path, amqp_url=rabbit_vhost.url(), prefetch=PREFETCH)
    pki = tmp_path / "certs"
    ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    serve = ServeProcess(config)
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        # the CBP side's queue, bound before the gateway routes anything; read at the end
        channel = await connection.channel()
        await bind_sink(channel)

        # a first start declares the partner's queues; its idle figures are the baseline
        async with aiohttp.ClientSession() as session:
            await serve.start()
            await asyncio.sleep(1.0)
            idle = await scrape(session, serve, ca)
            assert await serve.stop() == 0

            messages = signed_messages(
                pki,
                sender=AMQP_PARTNER,
                recipient=GATEWAY,
                count=BACKLOG,
                message_type="shipment.manifest",
                payload=large_manifest(HOUSES),
            )
            await preload(rabbit_vhost, messages, message_type="shipment.manifest")
            sent = {message_id for message_id, _, _ in messages}
            body_size = max(len(body) for _, body, _ in messages)
            assert await queue_depth(rabbit_vhost, IN_EXCHANGE) == BACKLOG

            await serve.start()
            samples: list[dict[str, float]] = []
            async with asyncio.timeout(240):
                while True:
                    sample = await scrape(session, serve, ca)
                    samples.append(sample)
                    if sample.get("c2c_inbound_accepted_total", 0.0) >= BACKLOG and (
                        sample.get("c2c_relay_published_total", 0.0) >= BACKLOG
                    ):
                        break
                    await asyncio.sleep(0.2)
            assert await serve.stop() == 0

        # drained: nothing left or dead-lettered, each message stored once, ACKed and routed
        assert await queue_depth(rabbit_vhost, IN_EXCHANGE) == 0
        assert await queue_depth(rabbit_vhost, f"{IN_EXCHANGE}.dead") == 0
        acked: dict[str, int] = {}
        out = await channel.declare_queue(OUT_QUEUE, passive=True)
        while (message := await out.get(no_ack=True, fail=False)) is not None:
            receipt = json.loads(message.body)["payload"]
            assert receipt["status"] == "ACK", receipt
            acked[receipt["ref_message_id"]] = acked.get(receipt["ref_message_id"], 0) + 1
        # (a redelivered message would be answered again with its original receipt: the
        # duplicate rule; stored once is what counts)
        assert set(acked) == sent
        assert samples[-1]["c2c_inbound_accepted_total"] == BACKLOG
        assert await queue_depth(rabbit_vhost, SINK_QUEUE) >= BACKLOG
    finally:
        await connection.close()

    during = samples[:-1] or samples
    in_flight = max(s["c2c_amqp_deliveries_in_flight"] for s in samples)
    tasks = max(s["c2c_event_loop_tasks"] for s in samples)
    handover = max(s["c2c_relay_handover_bytes"] for s in samples)
    rss_growth = (
        max(s["process_resident_memory_bytes"] for s in samples)
        - idle["process_resident_memory_bytes"]
    )
    idle_rss = idle["process_resident_memory_bytes"]
    report = (
        f"{len(samples)} samples: in flight <= {in_flight:.0f}, tasks <= {tasks:.0f} "
        f"(idle {idle['c2c_event_loop_tasks']:.0f}), hand-over <= {handover / MiB:.1f} MiB, "
        f"RSS +{rss_growth / MiB:.1f} MiB over idle {idle_rss / MiB:.1f} MiB"
    )
    print(report)
    assert len(during) >= 10, report
    # the partner queue's prefetch, plus the one c2c.submit channel that is idle here
    assert in_flight <= PREFETCH, report
    # beyond the idle set: two per delivery in hand (aio-pika's consumer task and the
    # handler's), and the relay's batch of confirmed publishes to c2c.inbound
    assert tasks <= idle["c2c_event_loop_tasks"] + 2 * PREFETCH + RELAY_BATCH + 16, report
    # the bound is checked before each commit, so deliveries in hand may pass it by one body each
    assert handover <= HANDOVER_BYTES + PREFETCH * body_size, report
    # T55's prefetch x message size x 3, plus the relay's hand-over and what the store's caches
    # and the allocator settle into; the backlog itself is 190 MiB (with a prefetch of 5,000,
    # the gateway took in 1,363 deliveries and grew by 409 MiB)
    assert rss_growth <= 4 * PREFETCH * body_size + HANDOVER_BYTES + 48 * MiB, report
