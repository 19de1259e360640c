"""The same message over HTTPS and AMQP at once (RELIABILITY-SECURITY T45).

A partner that fails over between transports, or runs both, may send one message down both at
the same moment. 25 copies over mutual TLS and 25 over the partner's ``.in`` queue race for the
one ``(sender, message_id)`` row: one is stored, the other 49 are answered with that row's
receipt, byte for byte, on whichever transport they came; the CBP side gets it once. With
different bytes under one id, the bytes that won are ACKed on both transports and every copy of
the others is refused ``DUPLICATE_CONFLICT``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from amqp_env import AMQP_PARTNER, GATEWAY
from amqp_peer import AmqpEnv, amqp_gateway, queue_depth
from rabbit import RabbitVhost

from gateway.envelope import body_digest
from gateway.errors import NackCode
from gateway.receipts import verify_receipt
from gateway.store.base import AuditFilter

pytestmark = pytest.mark.rabbitmq

COPIES = 25
IN_QUEUE = f"c2c.partner.{AMQP_PARTNER}.in"


def _client_ssl(env: AmqpEnv) -> ssl.SSLContext:
    certs = env.root / "certs"
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(
        str(certs / AMQP_PARTNER / "tls.pem"), str(certs / AMQP_PARTNER / "tls.key")
    )
    return context


@asynccontextmanager
async def _https(env: AmqpEnv) -> AsyncIterator[aiohttp.ClientSession]:
    """A session of the partner's with ``COPIES`` kept-alive connections already open, so
    the HTTPS copies race the AMQP ones without a handshake in front of them."""
    connector = aiohttp.TCPConnector(ssl=_client_ssl(env), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = env.gateway.partner_url + "/c2c/v1/keys"

        async def warm() -> None:
            async with session.get(url) as response:
                assert response.status == 200
                await response.read()

        await asyncio.gather(*(warm() for _ in range(COPIES)))
        yield session


async def _post(
    env: AmqpEnv, session: aiohttp.ClientSession, body: bytes
) -> tuple[int, bytes, str]:
    headers = {"Content-Type": "application/json", "C2C-Signature": env.sign(body)}
    url = env.gateway.partner_url + "/c2c/v1/messages"
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, await response.read(), response.headers["C2C-Signature"]


async def _race(
    env: AmqpEnv,
    session: aiohttp.ClientSession,
    message_id: str,
    bodies: tuple[bytes, bytes],
    amqp_lead_s: float = 0.0,
) -> tuple[list[tuple[int, bytes, str]], list[tuple[bytes, str]]]:
    """``COPIES`` posts of ``bodies[0]`` and ``COPIES`` publishes of ``bodies[1]``, all at
    once, or the posts ``amqp_lead_s`` later; returns the HTTPS answers and the receipts
    that came on ``.out``."""
    https_body, amqp_body = bodies
    signature = env.sign(amqp_body)

    async def posts() -> list[tuple[int, bytes, str]]:
        await asyncio.sleep(amqp_lead_s)
        return await asyncio.gather(*(_post(env, session, https_body) for _ in range(COPIES)))

    answers, _ = await asyncio.gather(
        posts(),
        asyncio.gather(
            *(
                env.peer.send(amqp_body, signature=signature, message_id=message_id)
                for _ in range(COPIES)
            )
        ),
    )
    receipts = []
    for _ in range(COPIES):
        out = await env.peer.next_out()
        signature_header = out.headers["c2c-signature"]
        assert isinstance(signature_header, str)
        receipts.append((out.body, signature_header))
    return list(answers), receipts


async def _entries(env: AmqpEnv, event: str, message_id: str) -> list[dict[str, Any]]:
    rows = await env.gateway.store.audit_entries(AuditFilter(event=event, message_id=message_id))
    return [json.loads(row.entry) for row in rows]


async def _settled(env: AmqpEnv, vhost: RabbitVhost) -> None:
    """Every delivery answered and acked, the stored rows relayed; nothing dead-lettered."""
    async with asyncio.timeout(15):
        while True:
            if not (
                await env.gateway.store.pending_relay(10) or await queue_depth(vhost, IN_QUEUE)
            ):
                break
            await asyncio.sleep(0.05)
    assert await queue_depth(vhost, f"{IN_QUEUE}.dead") == 0


async def test_one_message_raced_over_both_transports_is_stored_and_delivered_once(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    async with (
        amqp_gateway(tmp_path, rabbit_vhost, amqp_partner_https=True) as env,
        _https(env) as session,
    ):
        winners = Counter[str]()
        message_ids = []
        # The AMQP copies reach the pipeline a little later than the posts on open
        # connections; giving them a lead of a few milliseconds lets either side win.
        for lead_ms in (0, 1, 2, 3, 4, 5, 6, 8):
            message_id, body = env.message()
            message_ids.append(message_id)
            answers, receipts = await _race(env, session, message_id, (body, body), lead_ms / 1000)

            row = await env.gateway.store.get_inbound(AMQP_PARTNER, message_id)
            assert row is not None
            assert row.body == body
            winners[row.transport] += 1
            statuses = sorted(status for status, _, _ in answers)
            # one 202 only when HTTPS stored it; every other copy is an exact re-send (200)
            expected = [200] * COPIES if row.transport == "amqp" else [200] * (COPIES - 1) + [202]
            assert statuses == expected, (row.transport, statuses)
            # all 50 answers are the stored ACK receipt and its signature, byte for byte
            answered = {(receipt, signature) for _, receipt, signature in answers}
            assert answered | set(receipts) == {(answers[0][1], answers[0][2])}
            assert row.receipt_body == answers[0][1]
            receipt = verify_receipt(
                answers[0][1], answers[0][2], env.our_keys, GATEWAY, message_id, body_digest(body)
            )
            assert receipt.status == "ACK"

            accepted = await _entries(env, "accepted", message_id)
            duplicates = await _entries(env, "duplicate", message_id)
            assert [entry["transport"] for entry in accepted] == [row.transport]
            assert Counter(entry["transport"] for entry in duplicates) == {
                "https": COPIES - (row.transport == "https"),
                "amqp": COPIES - (row.transport == "amqp"),
            }
            assert {entry["body_digest"] for entry in accepted + duplicates} == {body_digest(body)}
        await _settled(env, rabbit_vhost)
        await env.sink.wait_for(len(message_ids))
        await asyncio.sleep(0.5)  # a second delivery would arrive within this
        assert sorted(m.message_id for m in env.sink.messages) == sorted(message_ids)
        print("stored by", dict(winners))  # shown with -s: usually both transports win some


@pytest.mark.parametrize("amqp_lead_ms", [0, 8])
async def test_different_bytes_under_one_id_over_both_transports_store_one_version(
    tmp_path: Path, rabbit_vhost: RabbitVhost, amqp_lead_ms: int
) -> None:
    async with (
        amqp_gateway(tmp_path, rabbit_vhost, amqp_partner_https=True) as env,
        _https(env) as session,
    ):
        message_id, https_body = env.message()
        payload = dict(env.gateway.registry.examples("shipment.advance_data", "1.0")[0])
        payload["advance_data_ref"] = "EXP-2026-AMQP-COPY"
        _, amqp_body = env.message(message_id=message_id, payload=payload)
        assert https_body != amqp_body
        answers, receipts = await _race(
            env, session, message_id, (https_body, amqp_body), amqp_lead_ms / 1000
        )

        row = await env.gateway.store.get_inbound(AMQP_PARTNER, message_id)
        assert row is not None
        assert row.body == (https_body if row.transport == "https" else amqp_body)
        assert row.receipt_body is not None
        https_won = row.transport == "https"
        statuses = sorted(status for status, _, _ in answers)
        if https_won:
            assert statuses == [200] * (COPIES - 1) + [202]
            assert {receipt for _, receipt, _ in answers} == {row.receipt_body}
        else:
            assert statuses == [409] * COPIES
        out_statuses = Counter(json.loads(receipt)["payload"]["status"] for receipt, _ in receipts)
        assert out_statuses == {"NACK" if https_won else "ACK": COPIES}
        refused = (
            [json.loads(receipt)["payload"] for receipt, _ in receipts]
            if https_won
            else [json.loads(body)["payload"] for _, body, _ in answers]
        )
        assert {(nack["code"], nack["ref_digest"]) for nack in refused} == {
            (
                NackCode.DUPLICATE_CONFLICT.value,
                body_digest(amqp_body if https_won else https_body),
            )
        }
        rejected = await _entries(env, "rejected", message_id)
        assert len(rejected) == COPIES
        assert {entry["outcome"] for entry in rejected} == {NackCode.DUPLICATE_CONFLICT.value}
        assert {entry["transport"] for entry in rejected} == {"amqp" if https_won else "https"}
        await _settled(env, rabbit_vhost)
        await env.sink.wait_for(1)
        assert [m.body for m in env.sink.messages] == [row.body]
