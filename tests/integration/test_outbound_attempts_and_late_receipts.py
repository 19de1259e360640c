"""How an outbound message ends: ``[outbox] max_attempts`` (no cap by default: until expiry),
over a synchronous (HTTPS) and an asynchronous (AMQP) transport; a partner's signed receipt
that comes after the message was given up on, or closed by an operator; an operator retry of
an expired message.

Real parts: the store, a mutual-TLS partner stub (``test_dispatch_faults``'s ``env``), and
RabbitMQ for the AMQP case."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from amqp_env import AMQP_PARTNER
from amqp_peer import amqp_gateway
from rabbit import RabbitVhost
from test_dispatch_faults import OUTBOX, Env, env, hand_back_receipt

from gateway.audit.events import EventKind
from gateway.config import OutboxConfig, load_config
from gateway.crypto.jws import parse_detached, verify_signature
from gateway.envelope import parse_envelope
from gateway.errors import NackCode
from gateway.outbound.dispatcher import RESIGN_AFTER, Dispatcher
from gateway.outbound.operator import operator_close, operator_retry
from gateway.outbound.submission import Submission, submit
from gateway.runtime import load_own_signing_keys, load_partner_keys
from gateway.store.base import AuditFilter, OutboundState, Store

__all__ = ["env"]


async def audit_of(store: Store, message_id: str) -> list[dict[str, str]]:
    rows = await store.audit_entries(AuditFilter(message_id=message_id))
    return [json.loads(row.entry) for row in rows]


# F6 -----------------------------------------------------------------------------------


def test_max_attempts_is_no_cap_unless_set(tmp_path: Path) -> None:
    assert OutboxConfig().max_attempts is None


async def test_by_default_a_message_is_tried_until_it_expires(env: Env) -> None:
    """PROTOCOL.md section 7: sent until the partner ACKs, NACKs, or it expires. With the
    default ``[outbox]`` (no max_attempts) a partner down for longer than the old 20-attempt
    budget does not kill a message before its expiry."""
    defaults = OutboxConfig()
    env.config = dataclasses.replace(
        env.config,
        outbox=dataclasses.replace(OUTBOX, max_attempts=defaults.max_attempts),
    )
    env.dispatcher = dataclasses_dispatcher(env)
    env.stub.behaviours = ["503"]
    await env.stub.start(env.port)
    record = await env.submit(ttl_s=1800)
    row = record
    for _ in range(1000):
        row = await env.step(record.message_id)
        if row.state is OutboundState.DEAD:
            break
    assert row.state is OutboundState.DEAD
    assert row.attempts > 20
    assert (row.last_error or "").startswith("expired at"), row.last_error
    assert env.clock.now() >= record.expires_at  # type: ignore[operator]


def dataclasses_dispatcher(env: Env) -> Dispatcher:
    """``env``'s dispatcher again, on ``env.config`` (changed by the test)."""
    old = env.dispatcher
    return Dispatcher(
        store=env.store,
        config=env.config,
        transports=old._transports,
        partner_keys=load_partner_keys(env.config),
        signing_keys=load_own_signing_keys(env.config),
        clock=env.clock,
        rng=random.Random(4),
        metrics=env.metrics,
    )


# F3 -----------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_amqp_handed_attempts_count_toward_max_attempts(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """A partner that never answers over AMQP gets max_attempts copies, not one per backoff
    until expiry; the row then ends as an HTTPS message's last failed attempt does."""
    async with amqp_gateway(tmp_path, rabbit_vhost) as amqp:
        gateway = amqp.gateway
        assert gateway.amqp is not None
        config = dataclasses.replace(
            load_config(tmp_path / "gateway.toml"),
            outbox=OutboxConfig(
                max_attempts=3,
                base_delay_s=0.05,
                max_delay_s=0.1,
                poll_interval_s=0.02,
                breaker_failures=1000,
            ),
        )
        dispatcher = Dispatcher(
            store=gateway.store,
            config=config,
            transports={"amqp": gateway.amqp.outbound_transport},
            partner_keys=load_partner_keys(config),
            signing_keys=load_own_signing_keys(config),
            clock=gateway.clock,
        )
        record = await submit(
            gateway.submission_services(),
            Submission(
                recipient=AMQP_PARTNER,
                message_type="shipment.status",
                payload=gateway.registry.examples("shipment.status", "1.0")[0],
                actor="test",
            ),
        )
        assert record.transport == "amqp"
        async with asyncio.timeout(15):
            while True:
                await dispatcher.run_once()
                row = await gateway.store.get_outbound(record.message_id)
                assert row is not None
                if row.state is not OutboundState.SENT and row.attempts > 0:
                    break
                await asyncio.sleep(0.02)
        # a while longer: nothing more is published
        for _ in range(10):
            await dispatcher.run_once()
            await asyncio.sleep(0.05)
        copies = 0
        while not amqp.peer.out.empty():
            out = amqp.peer.out.get_nowait()
            copies += out.message_id == record.message_id
        row = await gateway.store.get_outbound(record.message_id)
        assert row is not None
        assert (row.state, row.attempts, copies) == (OutboundState.DEAD, 3, 3)
        assert (row.last_error or "").startswith(
            "gave up after 3 attempts; last error: no receipt for attempt 3"
        ), row.last_error
        events = [
            (e["event"], e.get("outcome")) for e in await audit_of(gateway.store, row.message_id)
        ]
        assert events == [
            ("submitted", "queued"),
            ("sent", "sent"),
            ("sent", "sent"),
            ("sent", "sent"),
            ("attempt_failed", "failed"),
            ("dead", "dead"),
        ]


# F4 -----------------------------------------------------------------------------------


async def dead_by_expiry(env: Env) -> str:
    env.stub.behaviours = ["503"]
    await env.stub.start(env.port)
    record = await env.submit(ttl_s=30)
    assert (await env.step(record.message_id)).state is OutboundState.SENT
    env.clock.advance(timedelta(seconds=31))
    dead = await env.step(record.message_id)
    assert dead.state is OutboundState.DEAD
    return record.message_id


async def test_a_late_ack_settles_a_dead_message(env: Env) -> None:
    message_id = await dead_by_expiry(env)
    record = await env.row(message_id)
    receipt = await hand_back_receipt(env, env.dispatcher, record)
    row = await env.row(message_id)
    assert row.state is OutboundState.ACKNOWLEDGED
    assert row.receipt_body == receipt
    assert row.last_error is None
    tail = [(e["event"], e.get("outcome")) for e in await audit_of(env.store, message_id)][-2:]
    assert tail == [("receipt_received", "ACK"), ("acknowledged", "ACK")]

    # a further receipt for the now acknowledged message settles nothing: audited, not lost
    await hand_back_receipt(env, env.dispatcher, record, code=NackCode.SCHEMA_INVALID)
    again = await env.row(message_id)
    assert (again.state, again.receipt_body) == (OutboundState.ACKNOWLEDGED, receipt)
    rows = await env.store.audit_entries(AuditFilter(event=EventKind.REJECTED))
    refused = [json.loads(r.entry) for r in rows]
    assert len(refused) == 1
    assert refused[0]["outcome"] == "DUPLICATE_CONFLICT"
    assert message_id in refused[0]["reason"]
    assert "already acknowledged" in refused[0]["reason"]
    assert "settles nothing" in refused[0]["reason"]


async def test_an_ack_arriving_while_the_message_dies_settles_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receipt handler reads the row (still sent), then the dispatcher ends it dead at its
    expiry before the receipt is written: the partner's ACK still settles it."""
    env.stub.behaviours = ["503"]
    await env.stub.start(env.port)
    record = await env.submit(ttl_s=30)
    assert (await env.step(record.message_id)).state is OutboundState.SENT
    env.clock.advance(timedelta(seconds=31))
    sent = await env.row(record.message_id)
    read = env.store.get_outbound

    async def read_then_expire(message_id: str) -> Any:
        row = await read(message_id)
        monkeypatch.setattr(env.store, "get_outbound", read)
        assert (await env.step(message_id)).state is OutboundState.DEAD
        return row

    monkeypatch.setattr(env.store, "get_outbound", read_then_expire)
    receipt = await hand_back_receipt(env, env.dispatcher, sent)
    row = await env.row(record.message_id)
    assert (row.state, row.receipt_body) == (OutboundState.ACKNOWLEDGED, receipt)
    assert await env.store.audit_entries(AuditFilter(event=EventKind.REJECTED)) == []


async def test_a_late_nack_for_a_dead_message_rejects_it_with_its_code(env: Env) -> None:
    message_id = await dead_by_expiry(env)
    record = await env.row(message_id)
    # STALE too: a message given up on is settled as it is, not signed again
    for code in (NackCode.STALE,):
        receipt = await hand_back_receipt(env, env.dispatcher, record, code=code)
        row = await env.row(message_id)
        assert row.state is OutboundState.REJECTED
        assert row.body == record.body
        assert row.receipt_body == receipt
        assert (row.last_error or "").startswith(f"NACK {code.value}")
        tail = [(e["event"], e.get("outcome")) for e in await audit_of(env.store, message_id)]
        assert tail[-2:] == [("receipt_received", code.value), ("partner_rejected", code.value)]


async def test_a_late_nack_for_later_leaves_a_dead_message_dead_and_is_audited(
    env: Env,
) -> None:
    message_id = await dead_by_expiry(env)
    record = await env.row(message_id)
    await hand_back_receipt(env, env.dispatcher, record, code=NackCode.UNAVAILABLE)
    row = await env.row(message_id)
    assert row.state is OutboundState.DEAD
    rows = await env.store.audit_entries(AuditFilter(event=EventKind.REJECTED))
    assert [json.loads(r.entry)["outcome"] for r in rows] == ["DUPLICATE_CONFLICT"]


async def closed_by_an_operator(env: Env) -> str:
    message_id = await dead_by_expiry(env)
    closed = await operator_close(
        env.store,
        party="US-CBP",
        message_id=message_id,
        actor="test:op",
        reason="the partner was asked to confirm by mail",
        now=env.clock.now(),
    )
    assert closed.state is OutboundState.CLOSED
    return message_id


@pytest.mark.parametrize(
    ("code", "state"),
    [(None, OutboundState.ACKNOWLEDGED), (NackCode.STALE, OutboundState.REJECTED)],
)
async def test_a_late_final_receipt_settles_a_closed_message(
    env: Env, code: NackCode | None, state: OutboundState
) -> None:
    """The partner's signed answer is the truth about the message, whatever an operator
    concluded when closing it."""
    message_id = await closed_by_an_operator(env)
    record = await env.row(message_id)
    receipt = await hand_back_receipt(env, env.dispatcher, record, code=code)
    row = await env.row(message_id)
    assert (row.state, row.receipt_body) == (state, receipt)
    answer = "ACK" if code is None else code.value
    tail = [(e["event"], e.get("outcome")) for e in await audit_of(env.store, message_id)][-3:]
    assert tail == [
        ("operator_action", "close"),
        ("receipt_received", answer),
        ("acknowledged" if code is None else "partner_rejected", answer),
    ]
    assert await env.store.audit_entries(AuditFilter(event=EventKind.REJECTED)) == []


async def test_a_late_stale_for_a_closed_message_not_expired_settles_it_unsigned_again(
    env: Env,
) -> None:
    """Dead after its last allowed attempt, before it expired, then closed; the gateway
    restarted with more attempts allowed: the partner's STALE settles it as rejected, it is
    not signed again to be sent once more."""
    env.config = dataclasses.replace(env.config, outbox=dataclasses.replace(OUTBOX, max_attempts=1))
    env.dispatcher = dataclasses_dispatcher(env)
    env.stub.behaviours = ["503"]
    await env.stub.start(env.port)
    submitted = await env.submit(ttl_s=1800)
    assert (await env.step(submitted.message_id)).state is OutboundState.DEAD
    await operator_close(
        env.store,
        party="US-CBP",
        message_id=submitted.message_id,
        actor="test:op",
        reason="settled with the partner by phone",
        now=env.clock.now(),
    )
    # restarted since with more attempts allowed: the message has attempts left
    env.config = dataclasses.replace(env.config, outbox=dataclasses.replace(OUTBOX, max_attempts=5))
    env.dispatcher = dataclasses_dispatcher(env)
    env.clock.advance(RESIGN_AFTER + timedelta(seconds=1))  # its bytes old enough to re-sign
    record = await env.row(submitted.message_id)
    assert record.expires_at is not None
    assert record.expires_at > env.clock.now()
    await hand_back_receipt(env, env.dispatcher, record, code=NackCode.STALE)
    row = await env.row(submitted.message_id)
    assert (row.state, row.body) == (OutboundState.REJECTED, record.body)
    assert await env.store.audit_entries(AuditFilter(event=EventKind.REJECTED)) == []


async def test_a_late_nack_for_later_leaves_a_closed_message_closed_and_is_audited(
    env: Env,
) -> None:
    message_id = await closed_by_an_operator(env)
    record = await env.row(message_id)
    await hand_back_receipt(env, env.dispatcher, record, code=NackCode.UNAVAILABLE)
    assert (await env.row(message_id)).state is OutboundState.CLOSED
    rows = await env.store.audit_entries(AuditFilter(event=EventKind.REJECTED))
    [refused] = [json.loads(r.entry) for r in rows]
    assert refused["outcome"] == "DUPLICATE_CONFLICT"
    assert f"for {message_id}, which is already closed: it settles nothing" in refused["reason"]


# F5 -----------------------------------------------------------------------------------


async def test_an_operator_retry_of_an_expired_message_signs_it_again(env: Env) -> None:
    message_id = await dead_by_expiry(env)
    old = await env.row(message_id)
    assert old.body is not None
    assert old.expires_at is not None
    now = env.clock.now()
    retried = await operator_retry(
        env.store,
        party="US-CBP",
        message_id=message_id,
        actor="test:op",
        now=now,
        config=env.config,
        signing_keys=load_own_signing_keys(env.config),
    )
    assert (retried.state, retried.attempts) == (OutboundState.QUEUED, 0)
    assert retried.body is not None
    assert retried.body != old.body
    ms = timedelta(milliseconds=1)
    assert retried.expires_at is not None
    assert abs(retried.expires_at - (now + timedelta(seconds=30))) < ms
    before = parse_envelope(old.body, max_bytes=1 << 20)
    after = parse_envelope(retried.body, max_bytes=1 << 20)
    assert after.header.message_id == message_id
    assert after.payload == before.payload
    assert abs(after.header.created_at - now) < ms
    assert after.header.expires_at == after.header.created_at + timedelta(seconds=30)
    assert after.header == dataclasses.replace(
        before.header, created_at=after.header.created_at, expires_at=after.header.expires_at
    )
    entry = (await audit_of(env.store, message_id))[-1]
    assert (entry["event"], entry["outcome"], entry["actor"]) == (
        "operator_action",
        "retry",
        "test:op",
    )
    assert "signed again" in entry["reason"]
    assert old.body_digest in entry["reason"]
    assert entry["body_digest"] == retried.body_digest

    env.stub.behaviours = ["ack"]
    env.stub.seen.clear()
    done = await env.step(message_id)
    assert done.state is OutboundState.ACKNOWLEDGED
    sent = env.stub.seen[-1]
    assert sent.body == retried.body
    assert sent.signature is not None
    key = load_own_signing_keys(env.config)[-1]
    verify_signature(parse_detached(sent.signature), sent.body, key.verification_key())
