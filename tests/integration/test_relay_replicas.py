"""Two in-process gateway replicas on one PostgreSQL database receive messages over mutual TLS
at the same time; each has its own bus and inbox relay. Every accepted message is published
by exactly one relay and audited ``delivered`` exactly once: the relays claim pending inbox
rows with a lease instead of both publishing whatever is pending."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from https_env import MX, Env, make_message, post, write_environment

from gateway.config import load_config
from gateway.crypto.keys import KeyRing, load_signing_key
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter, InboundRecord
from gateway.transports.bus import MemoryBus

pytestmark = pytest.mark.postgres

MESSAGES = 200
CLIENTS = 16


@contextlib.asynccontextmanager
async def replica(root: Path, store_url: str, arrived: asyncio.Event) -> AsyncIterator[Env]:
    config = dataclasses.replace(load_config(root / "gateway.toml"), store_url=store_url)
    bus = MemoryBus()
    delivered: list[InboundRecord] = []

    async def consume(record: InboundRecord) -> None:
        delivered.append(record)
        arrived.set()

    bus.subscribe(consume)
    gateway = Gateway(config, bus=bus)
    await gateway.start()
    keys = {MX: load_signing_key(root / "pki" / MX / "sign.key", party=MX, alg="EdDSA")}
    our_keys = KeyRing(key.verification_key() for key in gateway.signing_keys)
    try:
        yield Env(root, gateway, delivered, arrived, keys, our_keys)
    finally:
        await gateway.stop()


async def test_two_replicas_relay_and_audit_each_message_once(tmp_path: Path, pg_dsn: str) -> None:
    write_environment(tmp_path)
    arrived = asyncio.Event()
    async with (
        replica(tmp_path, pg_dsn, arrived) as a,
        replica(tmp_path, pg_dsn, arrived) as b,
    ):
        replicas = [a, b]
        sent = [make_message(a) for _ in range(MESSAGES)]
        queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        for index, (_, body) in enumerate(sent):
            queue.put_nowait((index, body))

        async def client() -> None:
            while not queue.empty():
                index, body = queue.get_nowait()
                answer = await post(replicas[index % 2], body)
                assert answer.status == 202, answer.body

        async with asyncio.timeout(120):
            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            while sum(len(env.delivered) for env in replicas) < MESSAGES:
                await arrived.wait()
                arrived.clear()
        # a few more poll rounds of both relays: a second publish would show up here
        await asyncio.sleep(1.5)

        published = Counter(r.message_id for env in replicas for r in env.delivered)
        assert set(published) == {message_id for message_id, _ in sent}
        assert [m for m, n in published.items() if n > 1] == []
        # both relays did part of the work (each is woken by its own replica's commits)
        assert a.delivered
        assert b.delivered
        rows = await a.gateway.store.audit_entries(AuditFilter(event="delivered"), limit=10**6)
        audited = Counter(json.loads(row.entry)["message_id"] for row in rows)
        assert audited == Counter({message_id: 1 for message_id, _ in sent})
