"""The kill -9 matrix (RELIABILITY-SECURITY T68): ``c2c-gateway serve`` armed with
``GW_CRASH_AT=<point>:<hit>`` kills itself at that named point, twice, while a partner sends
messages over mutual TLS and retries each until it holds a receipt; a third start, unarmed,
finishes the run.

For each point: each crash came from that point (its stderr line, exit by SIGKILL), every
message ends acknowledged, stored once with one ``accepted`` audit entry, re-sending it returns
the byte-identical receipt, it reached the CBP side's queue on RabbitMQ (raw duplicates carry
the partner's id and bytes), and ``c2c-gateway audit check`` passes on the log after the
crashes. The outbound points (S9, S10) run US-CBP's dispatcher against a partner endpoint:
every message ends acknowledged, the partner holds each one, a crash between the partner's
answer and its record makes the message go out again, and each message's outcome reaches a
queue bound to ``c2c.outcomes`` (again, after a crash between its confirm and its mark). The
inbound points also run over AMQP, draining a backlog from the partner's queue.

Where the message in hand was at the crash is checked from outside: its final answer over
HTTPS (202: stored by its retry; 200: found stored), its audit entries over AMQP (a
``duplicate`` on its redelivery only when it was committed before the crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from amqp_env import ADVANCE_DATA, HTTPS_PARTNER, partner_messages, write_config
from amqp_peer import IN_EXCHANGE, ack_receipts, bind_sink, drain, preload, queue_depth
from outbound_env import auth, client_ssl, free_port, token
from partner_stub import PartnerStub
from rabbit import RabbitVhost
from serve_proc import ServeProcess, edit_toml, partner_client_ssl, run_cli, send_until_receipt
from store_rows import Database, use_store

from gateway.config import load_config
from gateway.crashpoints import POINTS
from gateway.schemas.registry import SchemaRegistry

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

CRASHES = 2
MESSAGES = 60
CLIENTS = 8
PATH = "/c2c/v1/messages"

#: point -> the hit it crashes at: far enough in that some messages went through before it
INBOUND_POINTS = {
    "S2": 7,
    "S3": 7,
    "S5": 7,
    "S4": 7,
    "S6-before-commit": 7,
    "S6-after-commit": 7,
    "S7-after-response": 7,
    "S8-before-confirm": 7,
    "S8-after-confirm-before-mark": 1,
    "audit-append": 7,
    "checkpoint-sign": 1,
}
#: the answer the partner finally got for the message in hand at the crash: at S6-before-commit
#: nothing of it was committed; at S6-after-commit it was; at S7-after-response the crashed
#: process had answered it already
IN_HAND_ANSWER = {"S6-before-commit": 202, "S6-after-commit": 200, "S7-after-response": 202}
OUTBOUND_POINTS = {
    "S9-after-send-before-mark": 1,
    "S9-after-mark-before-commit": 1,
    "S10-outcome-after-confirm-before-mark": 1,
}
#: run on PostgreSQL too: the inbox commit and the outbound record (``audit-append`` on
#: PostgreSQL: test_store_crash_points, as the inbox and the relay append inside one statement)
ON_POSTGRES = ("S6-before-commit", "S6-after-commit")
ON_POSTGRES_OUT = ("S9-after-mark-before-commit", "S10-outcome-after-confirm-before-mark")
#: a crashed relay's rows wait for its lease: a short one, for a quick run
RELAY_LEASE_S = 2.0
RELAY = f"""
[relay]
lease_s = {RELAY_LEASE_S}
"""
#: quick retries; a crashed dispatcher's rows wait for their lease, send_timeout_s + 10 s
OUTBOX = """
[outbox]
base_delay_s = 0.2
max_delay_s = 0.5
send_timeout_s = 2.0
poll_interval_s = 0.05
"""


def test_the_matrix_covers_every_crash_point() -> None:
    assert sorted([*INBOUND_POINTS, *OUTBOUND_POINTS]) == sorted(POINTS)


class CrashingServe:
    """``serve`` armed at ``point``; after each of its ``CRASHES`` crashes it is started again,
    armed the same way, and after the last one unarmed."""

    def __init__(self, source: Path, point: str, hit: int) -> None:
        self.point = point
        self.serve = ServeProcess(source, env={**os.environ, "GW_CRASH_AT": f"{point}:{hit}"})
        self.exits: list[int] = []
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.serve.start(may_die=True)
        self._watch = asyncio.create_task(self._restarts())

    async def _restarts(self) -> None:
        # over AMQP a backlog is consumed while the process starts: it may die before ready
        while len(self.exits) < CRASHES:
            self.exits.append(await self.serve.wait())
            if len(self.exits) == CRASHES:
                self.serve.env = None
            await self.serve.start(may_die=len(self.exits) < CRASHES)

    async def crashed(self, timeout_s: float) -> None:
        """Wait until the last crash's process was started again unarmed; fail saying how
        many crashes there were if the point was not reached often enough."""
        assert self._watch is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._watch), timeout_s)
        except TimeoutError:
            self._watch.cancel()
            pytest.fail(f"{self.point} crashed {len(self.exits)} time(s), not {CRASHES}")

    async def stop(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.serve.proc is not None:
            assert await self.serve.stop() == 0

    def crash_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in bytes(self.serve.stderr_log).splitlines():
            if raw.startswith(b"{") and b'"crash_point"' in raw:
                lines.append(json.loads(raw))
        return lines

    def messages_in_hand(self, *, last: bool = False) -> list[str]:
        """The messages the crash lines name (only the last crash's with ``last``)."""
        named = []
        for line in self.crash_lines()[-1:] if last else self.crash_lines():
            named += line.get("message_ids", "").split()
            if "message_id" in line:
                named.append(line["message_id"])
        return named

    def assert_crashed_at_the_point(self) -> None:
        assert self.exits == [-signal.SIGKILL] * CRASHES, self.exits
        lines = self.crash_lines()
        assert [line["point"] for line in lines] == [self.point] * CRASHES, lines


@pytest.mark.parametrize(
    ("point", "backend"),
    [(point, "sqlite") for point in INBOUND_POINTS]
    + [pytest.param(point, "postgres", marks=pytest.mark.postgres) for point in ON_POSTGRES],
)
async def test_a_crash_at_the_point_loses_and_doubles_nothing(
    point: str,
    backend: str,
    tmp_path: Path,
    rabbit_vhost: RabbitVhost,
    request: pytest.FixtureRequest,
) -> None:
    source = write_config(tmp_path, amqp_url=rabbit_vhost.url(), amqp_partner_https=True)
    database = await use_store(source, backend, request)
    # the partner keeps its URL across the restarts
    edit_toml(source, "[partner_listen]\nport = 0", f"[partner_listen]\nport = {free_port()}")
    with source.open("a", encoding="utf-8") as handle:
        if point == "checkpoint-sign":
            # the audit table is the file's last: checkpoints are signed while messages come in
            handle.write("checkpoint_interval_s = 0.2\n")
        handle.write(RELAY)
    messages = partner_messages(tmp_path, MESSAGES)
    sent = {message_id: body for message_id, body, _ in messages}
    connection = await aio_pika.connect(rabbit_vhost.url())
    crashing = CrashingServe(source, point, INBOUND_POINTS[point])
    try:
        sink = await bind_sink(await connection.channel())
        await crashing.start()
        url = crashing.serve.partner_url + PATH
        receipts: dict[str, tuple[bytes, str]] = {}
        answered: dict[str, int] = {}
        queue: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue()
        for item in messages:
            queue.put_nowait(item)
        # one connection per client, closed by every crash: each retry connects again
        connector = aiohttp.TCPConnector(ssl=partner_client_ssl(tmp_path / "certs"), limit=CLIENTS)

        async def client(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                message_id, body, signature = queue.get_nowait()
                status, receipt, receipt_sig = await send_until_receipt(
                    session, url, body, signature
                )
                receipts[message_id] = (receipt, receipt_sig)
                answered[message_id] = status

        async with aiohttp.ClientSession(connector=connector) as session:
            async with asyncio.timeout(120):
                await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
            await crashing.crashed(15)
            crashing.assert_crashed_at_the_point()
            if point in IN_HAND_ANSWER:
                # where the message in hand was when the process died, told by its answer:
                # stored anew on its retry (202), or found stored by it (200). The last
                # crash's: an earlier one's retry may be stored by a process that then
                # crashes before answering it, and its answer is then 200 whatever the point.
                in_hand = crashing.messages_in_hand(last=True)
                assert in_hand
                assert {answered[m] for m in in_hand} == {IN_HAND_ANSWER[point]}, in_hand
            # acknowledged means committed: a re-send gets the very receipt given first
            resent = await asyncio.gather(
                *(send_until_receipt(session, url, body, sig) for _, body, sig in messages)
            )
        for (message_id, _, _), (status, receipt, receipt_sig) in zip(
            messages, resent, strict=True
        ):
            assert status == 200, message_id
            assert (receipt, receipt_sig) == receipts[message_id], message_id
            assert orjson.loads(receipt)["payload"]["status"] == "ACK"
        await database.until("SELECT count(*) FROM inbound_messages WHERE NOT relayed", [(0,)], 60)
        if point == "checkpoint-sign":
            # a checkpoint signed after the crashes covers the whole log (checked below)
            (size,) = (await database.rows("SELECT size FROM audit_head"))[0]
            await database.until("SELECT max(size) FROM audit_checkpoints", [(size,)], 30)
        await crashing.stop()

        await database.assert_stored_once(sent)
        on_the_bus = await drain(sink)
        assert {m.message_id for m in on_the_bus} == set(sent)
        for message in on_the_bus:
            assert message.message_id is not None
            assert message.body == sent[message.message_id]
        if point == "S8-after-confirm-before-mark":
            # the crashed batch was confirmed and not marked: it goes out again
            assert len(on_the_bus) > MESSAGES
        code, out, err = await run_cli("audit", "check", "--config", str(source))
        assert code == 0, (out, err)
        assert out.startswith("OK "), out
    finally:
        await crashing.stop()
        await connection.close()
        await database.drop()


async def test_a_crashed_relays_rows_wait_for_its_lease_and_no_longer(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """``[relay] lease_s``: a message stored and handed to the relay, which died publishing it,
    is published by the restarted process once the dead relay's lease has run out: not before
    (the lease holds), and not the default 10 s after."""
    lease_s = 3.0
    source = write_config(tmp_path, amqp_url=rabbit_vhost.url(), amqp_partner_https=True)
    with source.open("a", encoding="utf-8") as handle:
        handle.write(f"\n[relay]\nlease_s = {lease_s}\n")
    database = Database(f"sqlite:///{tmp_path / 'c2c.db'}")
    ((message_id, body, signature),) = partner_messages(tmp_path, 1)
    serve = ServeProcess(source, env={**os.environ, "GW_CRASH_AT": "S8-before-confirm:1"})
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        sink = await bind_sink(await connection.channel())
        await serve.start()
        connector = aiohttp.TCPConnector(ssl=partner_client_ssl(tmp_path / "certs"))
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(10):
            # answered right after the commit, 20 ms before the relay's round
            status, _, _ = await send_until_receipt(
                session, serve.partner_url + PATH, body, signature
            )
        assert status == 202
        # the relay published it, unconfirmed, and the process died
        assert await serve.wait() == -signal.SIGKILL
        loop = asyncio.get_running_loop()
        crashed_at = loop.time()
        serve.env = None
        await serve.start()
        relayed = "SELECT count(*) FROM inbound_messages WHERE relayed"
        await database.until(relayed, [(1,)], 30)
        waited = loop.time() - crashed_at
        # stored leased at most a few ms before the crash, so its lease ran out lease_s
        # after it, give or take a claim round (0.5 s) and the restart
        assert lease_s - 0.5 <= waited <= lease_s + 4.0, waited
        delivered = await drain(sink)
        assert delivered
        assert {m.message_id for m in delivered} == {message_id}
    finally:
        if serve.proc is not None and serve.proc.returncode is None:
            await serve.stop()
        await connection.close()


async def submit(config_path: Path, serve: ServeProcess, count: int) -> list[str]:
    """``count`` submissions at once, each retried under its Idempotency-Key, as a client of
    the API does, when the crash under test cuts its request off (the dispatcher sends the
    first ones while the others are still being submitted): the retry reaches the restarted
    process, and gets the message its first try stored, or stores it."""
    config = load_config(config_path)
    payload = SchemaRegistry.load_builtin().examples("shipment.status", "1.0")[0]
    submission = {"recipient": HTTPS_PARTNER, "message_type": "shipment.status", "payload": payload}
    async with aiohttp.ClientSession() as session:

        async def one() -> str:
            headers = {**auth(token(config)), "Idempotency-Key": str(uuid.uuid4())}
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with session.post(
                            serve.api_url + "/api/v1/messages",
                            json=submission,
                            headers=headers,
                            ssl=client_ssl(config),
                        ) as response:
                            assert response.status == 202, await response.text()
                            return str((await response.json())["message_id"])
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.2)

        return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.parametrize(
    ("point", "backend"),
    [(point, "sqlite") for point in OUTBOUND_POINTS]
    + [pytest.param(point, "postgres", marks=pytest.mark.postgres) for point in ON_POSTGRES_OUT],
)
async def test_a_crash_at_an_outbound_point_ends_every_message_acknowledged(
    point: str,
    backend: str,
    tmp_path: Path,
    rabbit_vhost: RabbitVhost,
    request: pytest.FixtureRequest,
) -> None:
    source = write_config(tmp_path, amqp_url=rabbit_vhost.url())
    edit_toml(source, "[amqp]\n", "[amqp]\noutcomes = true\n")
    database = await use_store(source, backend, request)
    pki = tmp_path / "certs"
    partner = PartnerStub(pki, party=HTTPS_PARTNER)
    partner_url = await partner.start()
    edit_toml(
        tmp_path / "partners" / HTTPS_PARTNER / "partner.toml",
        "https://127.0.0.1:9/",
        partner_url + "/",
    )
    edit_toml(
        source,
        'public_keys = ["certs/US-CBP/api-token.pub"]',
        'public_keys = ["certs/US-CBP/api-token.pub"]\nsigning_key = "certs/US-CBP/api-token.key"',
    )
    with source.open("a", encoding="utf-8") as handle:
        handle.write(OUTBOX + RELAY)
    crashing = CrashingServe(source, point, OUTBOUND_POINTS[point])
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        outcomes = await bind_outcomes(await connection.channel())
        await crashing.start()
        ids = await submit(source, crashing.serve, MESSAGES // 2)
        await crashing.crashed(60)
        await database.until(
            "SELECT state, count(*) FROM outbound_messages GROUP BY 1",
            [("acknowledged", len(ids))],
            60,
        )
        crashing.assert_crashed_at_the_point()
        # every message's outcome reached the CBP system's queue, at least once; those in
        # hand at an outcome relay's crash (confirmed, not marked) went out again after it
        again = crashing.messages_in_hand() if point.startswith("S10") else []
        assert again or not point.startswith("S10")
        published = await outcomes_until(outcomes, set(ids), set(again), 60)
        assert all(key[1:] == ("acknowledged", "1") for key in published), published
        # and each is forgotten once confirmed (the mark follows the confirm)
        await database.until("SELECT count(*) FROM outbound_outcomes", [(0,)], 30)
        await crashing.stop()
        seen = Counter(orjson.loads(s.body)["header"]["message_id"] for s in partner.seen)
        assert set(seen) == set(ids)
        if point.startswith("S9"):
            # the message in hand at each crash had reached the partner, was not recorded as
            # answered, and went out again after the restart
            in_hand = crashing.messages_in_hand()
            assert len(in_hand) == CRASHES
            assert all(seen[message_id] >= 2 for message_id in in_hand), (in_hand, seen)
        assert await database.rows(
            "SELECT count(*) FROM outbound_messages WHERE receipt_body IS NULL"
        ) == [(0,)]
        code, out, err = await run_cli("audit", "check", "--config", str(source))
        assert code == 0, (out, err)
    finally:
        await crashing.stop()
        await partner.stop()
        await connection.close()
        await database.drop()


async def bind_outcomes(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    """A CBP system's queue on ``c2c.outcomes``, bound before the gateway starts."""
    exchange = await channel.declare_exchange(
        "c2c.outcomes", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        "cbp.outcomes", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange, routing_key="#")
    return queue


async def outcomes_until(
    queue: aio_pika.abc.AbstractQueue, ids: set[str], twice: set[str], timeout_s: float
) -> Counter[tuple[str, str, str]]:
    """The outcomes taken off ``queue`` (``(message_id, state, n)``, counted) once every one
    of ``ids`` has one, and those of ``twice`` two at least."""
    published: Counter[tuple[str, str, str]] = Counter()

    def done() -> bool:
        counts = Counter(key[0] for key in published.elements())
        return ids <= set(counts) and all(counts[m] >= 2 for m in twice)

    async with asyncio.timeout(timeout_s):
        while not done():
            for message in await drain(queue):
                assert message.message_id is not None
                message_id, state, n = message.message_id.split("/")
                published[(message_id, state, n)] += 1
            await asyncio.sleep(0.1)
    return published


#: over AMQP, every point of the inbound path (the delivery in hand is returned by the
#: broker and comes again); a checkpoint is signed whatever the transport
AMQP_POINTS = {point: hit for point, hit in INBOUND_POINTS.items() if point != "checkpoint-sign"}


async def audit_events(database: Database, message_ids: list[str]) -> set[tuple[str, str]]:
    listed = ", ".join(f"'{m}'" for m in message_ids)
    found = await database.rows(
        f"SELECT message_id, event FROM audit_entries WHERE message_id IN ({listed})"
    )
    return {(m, e) for m, e in found}


@pytest.mark.parametrize("point", list(AMQP_POINTS))
async def test_a_crash_at_the_point_over_amqp_loses_and_doubles_nothing(
    point: str, tmp_path: Path, rabbit_vhost: RabbitVhost, request: pytest.FixtureRequest
) -> None:
    # every crash returns what was in hand: the delivery limit outlasts them
    source = write_config(
        tmp_path, amqp_url=rabbit_vhost.url(), prefetch=16, delivery_limit=CRASHES + 3
    )
    with source.open("a", encoding="utf-8") as handle:
        handle.write(RELAY)
    database = await use_store(source, "sqlite", request)
    messages = partner_messages(tmp_path, MESSAGES)
    sent = {message_id: body for message_id, body, _ in messages}
    connection = await aio_pika.connect(rabbit_vhost.url())
    crashing = CrashingServe(source, point, AMQP_POINTS[point])
    try:
        channel = await connection.channel()
        sink = await bind_sink(channel)
        # a first start declares the partner's queues; the messages wait there
        first = ServeProcess(source)
        await first.start()
        assert await first.stop() == 0
        await preload(rabbit_vhost, messages, message_type=ADVANCE_DATA)
        await crashing.start()
        await crashing.crashed(60)
        crashing.assert_crashed_at_the_point()
        await database.until("SELECT count(*) FROM inbound_messages", [(MESSAGES,)], 60)
        await database.until("SELECT count(*) FROM inbound_messages WHERE NOT relayed", [(0,)], 60)
        async with asyncio.timeout(30):
            while True:
                if not await queue_depth(rabbit_vhost, IN_EXCHANGE):
                    break
                await asyncio.sleep(0.1)
        await crashing.stop()
        assert await queue_depth(rabbit_vhost, f"{IN_EXCHANGE}.dead") == 0

        await database.assert_stored_once(sent)
        # an ACK receipt for every message; one answered twice got the same bytes twice
        receipts = await ack_receipts(channel)
        assert set(receipts) == set(sent)
        assert all(len(answers) == 1 for answers in receipts.values())
        on_the_bus = await drain(sink)
        assert {m.message_id for m in on_the_bus} == set(sent)
        if point == "S8-after-confirm-before-mark":
            # the crashed batch was confirmed and not marked: it goes out again
            assert len(on_the_bus) > MESSAGES
        # where the delivery in hand was: committed before the crash, its redelivery is a
        # duplicate; not committed, it is stored by its redelivery
        # (the last crash's: an earlier one's redelivery may be stored by a process that then
        # crashes before its ack, and comes again as a duplicate whatever the point)
        in_hand = crashing.messages_in_hand(last=True)
        assert len(in_hand) == (1 if point in IN_HAND_ANSWER else 0), in_hand
        events = await audit_events(database, in_hand)
        if point == "S6-after-commit":
            assert {(m, "duplicate") for m in in_hand} <= events, events
        if point == "S6-before-commit":
            assert not {e for e in events if e[1] == "duplicate"}, events
        code, out, err = await run_cli("audit", "check", "--config", str(source))
        assert code == 0, (out, err)
    finally:
        await crashing.stop()
        await connection.close()
