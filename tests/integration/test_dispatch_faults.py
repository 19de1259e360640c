"""The dispatcher against a real mutual-TLS partner stub: receipts, backoff, breaker, expiry.

Time is a ManualClock, moved to each row's next_attempt_at, so backoff and the breaker's
timeouts are observed exactly without waiting for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from outbound_env import free_port, gateway_config
from partner_stub import PartnerStub
from serve_proc import run_cli

from gateway.audit.events import EventKind
from gateway.clock import ManualClock
from gateway.config import GatewayConfig, OutboxConfig
from gateway.crypto.jws import parse_detached, verify_signature
from gateway.crypto.keys import load_signing_key
from gateway.envelope import parse_envelope
from gateway.errors import NackCode
from gateway.inbound.context import ReceivedReceipt
from gateway.metrics import Metrics
from gateway.outbound.backoff import BackoffPolicy
from gateway.outbound.breaker import BreakerState
from gateway.outbound.dispatcher import Dispatcher
from gateway.outbound.submission import Submission, SubmissionServices, submit
from gateway.outbound.transport import Delivery, Handed, PartnerReply
from gateway.receipts import ReceiptSigner
from gateway.runtime import load_own_signing_keys, load_partner_keys
from gateway.schemas.registry import SchemaRegistry
from gateway.store import open_store
from gateway.store.base import AuditFilter, OutboundRecord, OutboundState, Store
from gateway.transports.https_client import HttpsTransport

OUTBOX = OutboxConfig(
    max_attempts=50,
    base_delay_s=1.0,
    max_delay_s=8.0,
    default_ttl_s=3600,
    send_timeout_s=0.5,
    breaker_failures=3,
    breaker_reset_s=30.0,
    poll_interval_s=0.05,
)


@dataclass
class Env:
    config: GatewayConfig
    store: Store
    clock: ManualClock
    dispatcher: Dispatcher
    stub: PartnerStub
    port: int
    registry: SchemaRegistry
    metrics: Metrics

    async def submit(self, ttl_s: int | None = None) -> OutboundRecord:
        services = SubmissionServices(
            config=self.config,
            registry=self.registry,
            signing_keys=load_own_signing_keys(self.config),
            store=self.store,
            clock=self.clock,
        )
        return await submit(
            services,
            Submission(
                recipient="MX-ANAM",
                message_type="shipment.status",
                payload=self.registry.examples("shipment.status", "1.0")[0],
                actor="test",
                ttl_s=ttl_s,
            ),
        )

    async def row(self, message_id: str) -> OutboundRecord:
        record = await self.store.get_outbound(message_id)
        assert record is not None
        return record

    async def step(self, message_id: str) -> OutboundRecord:
        """Move the clock to the row's next attempt and let the dispatcher take it."""
        record = await self.row(message_id)
        if record.next_attempt_at > self.clock.now():
            self.clock.advance(record.next_attempt_at - self.clock.now())
        assert await self.dispatcher.run_once() == 1
        return await self.row(message_id)

    def attempts(self, result: str) -> float:
        """``c2c_outbound_attempts_total`` to MX-ANAM that ended in ``result``."""
        value = self.metrics.registry.get_sample_value(
            "c2c_outbound_attempts_total", {"partner": "MX-ANAM", "result": result}
        )
        return value or 0.0

    async def events(self, message_id: str) -> list[bytes]:
        rows = await self.store.audit_entries(AuditFilter(message_id=message_id))
        return [row.entry for row in rows]


@contextlib.asynccontextmanager
async def dispatcher_env(
    tmp_path: Path,
    *,
    start: datetime,
    store_url: str | None = None,
    port: int | None = None,
) -> AsyncIterator[Env]:
    """US-CBP's dispatcher (not running) on its dev-environment SQLite store, or on
    ``store_url``, sending to MX-ANAM's stub at ``port`` (one free, by default)."""
    port = free_port() if port is None else port
    config = gateway_config(
        tmp_path, "US-CBP", peers={"MX-ANAM": f"https://127.0.0.1:{port}"}, outbox=OUTBOX
    )
    clock = ManualClock(start)
    store = open_store(config.store_url if store_url is None else store_url, clock=clock)
    await store.open()
    transport = HttpsTransport(config.tls, timeout_s=OUTBOX.send_timeout_s, now=clock.now)
    metrics = Metrics(partners=config.partners)
    dispatcher = Dispatcher(
        store=store,
        config=config,
        transports={"https": transport},
        partner_keys=load_partner_keys(config),
        signing_keys=load_own_signing_keys(config),
        clock=clock,
        rng=random.Random(4),
        metrics=metrics,
    )
    stub = PartnerStub(pki=tmp_path / "pki")
    try:
        yield Env(
            config, store, clock, dispatcher, stub, port, SchemaRegistry.load_builtin(), metrics
        )
    finally:
        await stub.stop()
        await transport.aclose()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    # A day behind real time: what expires on this clock has also expired for the CLI,
    # which reads the system clock.
    async with dispatcher_env(tmp_path, start=datetime.now(UTC) - timedelta(days=1)) as running:
        yield running


async def test_a_stale_receipt_arriving_later_signs_the_message_again(
    env: Env, tmp_path: Path
) -> None:
    """Over AMQP the STALE comes back as a receipt on the inbound side, long after the
    hand-over: the message is signed again there and handed over as the new bytes."""
    transport = HandingTransport()
    dispatcher = env.dispatcher = handing_dispatcher(env, transport)
    record = await env.submit()
    assert (await env.step(record.message_id)).state is OutboundState.SENT
    expiring = await env.submit(ttl_s=600)
    assert (await env.step(expiring.message_id)).state is OutboundState.SENT
    env.clock.advance(timedelta(minutes=20))
    await hand_back_receipt(env, dispatcher, record, code=NackCode.STALE)
    queued = await env.row(record.message_id)
    assert (queued.state, queued.attempts) == (OutboundState.QUEUED, 1)
    assert queued.body_digest != record.body_digest
    # past its expires_at, the partner is right: no signing again
    await hand_back_receipt(env, dispatcher, expiring, code=NackCode.STALE)
    rejected = await env.row(expiring.message_id)
    assert rejected.state is OutboundState.REJECTED
    assert rejected.body_digest == expiring.body_digest
    assert (await env.step(record.message_id)).state is OutboundState.SENT
    assert transport.handed == [record.body, expiring.body, queued.body]


async def test_ack_receipt_is_verified_and_archived(env: Env) -> None:
    await env.stub.start(env.port)
    record = await env.submit()
    done = await env.step(record.message_id)
    assert done.state is OutboundState.ACKNOWLEDGED
    assert done.attempts == 1
    assert done.receipt_body is not None
    assert done.receipt_signature is not None
    assert env.stub.seen[0].body == record.body
    assert env.stub.seen[0].signature == record.signature
    kinds = [e.split(b'"event":"')[1].split(b'"')[0] for e in await env.events(record.message_id)]
    assert kinds == [b"submitted", b"sent", b"receipt_received", b"acknowledged"]
    assert env.attempts("acknowledged") == 1
    assert env.attempts("retry") == 0


def kinds_of(entries: list[bytes]) -> list[str]:
    return [json.loads(e)["event"] for e in entries]


async def test_a_message_refused_as_stale_for_its_age_is_signed_again_and_sent(
    env: Env,
) -> None:
    """A partner that was down past its replay window refuses the queued bytes as STALE: the
    same message, signed again with a new created_at, is sent at once and acknowledged."""
    env.stub.behaviours = ["nack_stale", "ack"]
    await env.stub.start(env.port)
    record = await env.submit()
    assert record.body is not None
    env.clock.advance(timedelta(minutes=20))  # the partner's outage
    resigned = await env.step(record.message_id)
    assert (resigned.state, resigned.attempts) == (OutboundState.QUEUED, 1)
    assert resigned.next_attempt_at == env.clock.now()
    assert "NACK STALE" in (resigned.last_error or "")
    assert resigned.body is not None
    assert resigned.body_digest != record.body_digest
    old = parse_envelope(record.body, max_bytes=1 << 20)
    new = parse_envelope(resigned.body, max_bytes=1 << 20)
    now = env.clock.now()
    assert new.header == dataclasses.replace(old.header, created_at=new.header.created_at)
    assert now - timedelta(milliseconds=1) < new.header.created_at <= now  # in milliseconds
    assert new.payload == old.payload
    done = await env.step(record.message_id)
    assert (done.state, done.attempts) == (OutboundState.ACKNOWLEDGED, 2)
    assert [seen.body for seen in env.stub.seen] == [record.body, resigned.body]
    assert env.stub.seen[1].signature == resigned.signature
    (our_key,) = load_own_signing_keys(env.config)
    assert resigned.kid == our_key.kid
    verify_signature(parse_detached(resigned.signature), resigned.body, our_key.verification_key())
    entries = await env.events(record.message_id)
    assert kinds_of(entries) == [
        "submitted",
        "sent",
        "receipt_received",
        "resigned",
        "sent",
        "receipt_received",
        "acknowledged",
    ]
    audited = json.loads(entries[3])
    assert audited["body_digest"] == resigned.body_digest
    assert record.body_digest in audited["reason"]
    # each attempt's entries name the bytes that attempt sent
    assert json.loads(entries[1])["body_digest"] == record.body_digest
    assert json.loads(entries[4])["body_digest"] == resigned.body_digest


async def test_a_stale_answer_to_bytes_just_signed_is_a_rejection(env: Env) -> None:
    """A STALE for fresh bytes is the clocks disagreeing: signing again would not help. After
    one signing again, a second STALE ends the message as rejected too (no loop)."""
    env.stub.behaviours = ["nack_stale"]
    await env.stub.start(env.port)
    fresh = await env.submit()
    rejected = await env.step(fresh.message_id)
    assert rejected.state is OutboundState.REJECTED
    assert rejected.body == fresh.body
    old = await env.submit()
    env.clock.advance(timedelta(minutes=20))
    assert (await env.step(old.message_id)).state is OutboundState.QUEUED
    again = await env.step(old.message_id)
    assert again.state is OutboundState.REJECTED
    assert kinds_of(await env.events(old.message_id)).count("resigned") == 1


async def test_partner_down_backoff_breaker_expiry_then_cli_retry(env: Env) -> None:
    policy = BackoffPolicy(base_s=OUTBOX.base_delay_s, cap_s=OUTBOX.max_delay_s)
    record = await env.submit(ttl_s=120)
    breaker = env.dispatcher.breakers.for_partner("MX-ANAM")
    # Three refused connections: each schedules the next attempt within the jittered ceiling.
    for attempt in (1, 2, 3):
        before = env.clock.now()
        row = await env.step(record.message_id)
        assert row.attempts == attempt
        assert row.state is OutboundState.QUEUED  # nothing reached the partner
        assert "cannot connect" in (row.last_error or "")
        delay = (row.next_attempt_at - before).total_seconds()
        assert 0 <= delay <= policy.ceiling(attempt) + 1e-3
    assert breaker.state is BreakerState.OPEN
    # Open: the row is looked at but not sent; it waits for the breaker's timeout.
    if (await env.row(record.message_id)).next_attempt_at > env.clock.now():
        env.clock.advance((await env.row(record.message_id)).next_attempt_at - env.clock.now())
    assert await env.dispatcher.run_once() == 1
    held = await env.row(record.message_id)
    assert held.attempts == 3
    assert (held.next_attempt_at - env.clock.now()).total_seconds() > 20
    # Half-open after the timeout: exactly one probe, which fails and re-opens the breaker.
    env.clock.advance(held.next_attempt_at - env.clock.now())
    assert breaker.state is BreakerState.HALF_OPEN
    probed = await env.step(record.message_id)
    assert probed.attempts == 4
    assert breaker.state is BreakerState.OPEN
    # Still down when the message expires: dead, with the reason, never deleted.
    env.clock.advance(timedelta(seconds=200))
    assert await env.dispatcher.run_once() == 1
    dead = await env.row(record.message_id)
    assert dead.state is OutboundState.DEAD
    assert (dead.last_error or "").startswith("expired at ")
    assert b'"event":"dead"' in (await env.events(record.message_id))[-1]
    # PROTOCOL.md section 7: retryable by an operator. Its signed header says it expired, so
    # the retry signs it again (same id and payload, new created_at and expires_at).
    code, out, err = await cli_retry(env, record.message_id)
    assert (code, err) == (0, "")
    assert "queued again" in out
    retried = await env.row(record.message_id)
    assert retried.state is OutboundState.QUEUED
    assert retried.body_digest != record.body_digest


async def test_a_message_held_by_an_open_breaker_is_dead_at_its_expiry(env: Env) -> None:
    # The partner refuses connections: three failed attempts open its breaker.
    tripping = await env.submit(ttl_s=3600)
    for _ in range(OUTBOX.breaker_failures):
        await env.step(tripping.message_id)
    breaker = env.dispatcher.breakers.for_partner("MX-ANAM")
    assert breaker.state is BreakerState.OPEN
    # A message that expires long before the breaker's next probe (30 s) is held no longer
    # than its expiry: a client polling it never sees it queued past its expires_at.
    record = await env.submit(ttl_s=5)
    assert record.expires_at is not None
    assert breaker.seconds_until_probe() > 20
    await env.dispatcher.run_once()
    held = await env.row(record.message_id)
    assert (held.state, held.attempts) == (OutboundState.QUEUED, 0)
    assert held.next_attempt_at == record.expires_at
    env.clock.advance(record.expires_at - env.clock.now())
    assert breaker.state is BreakerState.OPEN
    await env.dispatcher.run_once()
    dead = await env.row(record.message_id)
    assert dead.state is OutboundState.DEAD
    assert (dead.last_error or "").startswith("expired at ")
    assert "after 0 attempt(s)" in (dead.last_error or "")
    assert b'"event":"dead"' in (await env.events(record.message_id))[-1]


async def cli_retry(env: Env, message_id: str, *reason: str) -> tuple[int, str, str]:
    config = str(env.config.source)
    return await run_cli("messages", "retry", "--config", config, *reason, message_id)


async def test_operator_retry_from_the_cli_sends_the_same_bytes(env: Env) -> None:
    env.stub.behaviours = ["302", "ack"]
    await env.stub.start(env.port)
    record = await env.submit(ttl_s=3 * 86_400)
    assert (await env.step(record.message_id)).state is OutboundState.DEAD
    code, out, err = await cli_retry(env, record.message_id, "--reason", "a\tb")
    assert (code, out) == (2, "")
    assert err.startswith("error: the reason has a control character or line break (U+0009)")
    assert (await env.row(record.message_id)).state is OutboundState.DEAD
    code, out, err = await cli_retry(
        env, record.message_id, "--reason", "MX-ANAM moved its endpoint back, INC-4711"
    )
    assert code == 0, err
    assert out.startswith(f"queued again: {record.message_id} (to MX-ANAM, by cli:")
    assert (await env.row(record.message_id)).state is OutboundState.QUEUED
    done = await env.step(record.message_id)
    assert (done.state, done.attempts) == (OutboundState.ACKNOWLEDGED, 1)
    assert [seen.body for seen in env.stub.seen] == [record.body, record.body]
    assert {seen.signature for seen in env.stub.seen} == {record.signature}
    retried = [e for e in await env.events(record.message_id) if b'"operator_action"' in e]
    assert len(retried) == 1
    assert b'"actor":"cli:' in retried[0]
    assert json.loads(retried[0])["reason"] == (
        "operator retry of a dead message; the operator's reason: MX-ANAM moved its endpoint"
        " back, INC-4711"
    )
    code, _, err = await cli_retry(env, record.message_id)
    assert code == 2
    assert err.strip().endswith("only dead, closed or rejected messages can be retried")


async def cli_close(env: Env, message_id: str, *reason: str) -> tuple[int, str, str]:
    config = str(env.config.source)
    return await run_cli("messages", "close", "--config", config, *reason, message_id)


async def test_an_operator_closes_a_dead_message_from_the_cli_and_a_retry_reopens_it(
    env: Env,
) -> None:
    env.stub.behaviours = ["302", "ack"]
    await env.stub.start(env.port)
    record = await env.submit(ttl_s=3 * 86_400)
    mid = record.message_id
    assert (await env.step(mid)).state is OutboundState.DEAD
    code, out, err = await cli_close(env, mid)
    assert (code, out) == (2, "")
    assert "Missing option '--reason'" in err
    for reason, refusal in (
        ("  ", "a reason is required: say why the message will not be sent again"),
        (
            "moved\tendpoint",
            "the reason has a control character or line break (U+0009) at character 6: give"
            " it as one line of text",
        ),
    ):
        code, out, err = await cli_close(env, mid, "--reason", reason)
        assert (code, out, err) == (2, "", f"error: {refusal}\n")
    missing = "01890000-0000-7000-8000-000000000000"
    code, _, err = await cli_close(env, missing, "--reason", "x")
    assert (code, err) == (2, f"error: no outbound message with message_id {missing}\n")
    assert (await env.row(mid)).state is OutboundState.DEAD

    reason = "MX-ANAM moved its endpoint; re-filed by hand as 4711"
    code, out, err = await cli_close(env, mid, "--reason", reason)
    assert (code, err) == (0, "")
    assert out.startswith(f"closed: {mid} (to MX-ANAM, by cli:")
    assert (await env.row(mid)).state is OutboundState.CLOSED
    env.clock.advance(timedelta(days=1))
    assert await env.dispatcher.run_once() == 0
    [entry] = [json.loads(e) for e in await env.events(mid) if b'"operator_action"' in e]
    assert (entry["outcome"], entry["reason"]) == (
        "close",
        f"operator closed a dead message: {reason}",
    )
    assert entry["actor"].startswith("cli:")
    code, _, err = await cli_close(env, mid, "--reason", "again")
    assert (code, err) == (
        2,
        f"error: message {mid} is closed; only a dead message can be closed\n",
    )

    code, out, err = await cli_retry(env, mid)
    assert code == 0, err
    assert out.startswith(f"queued again: {mid} (to MX-ANAM, by cli:")
    done = await env.step(mid)
    assert (done.state, done.attempts) == (OutboundState.ACKNOWLEDGED, 1)
    assert [seen.body for seen in env.stub.seen] == [record.body, record.body]


async def test_slow_partner_times_out_and_the_resend_is_byte_identical(env: Env) -> None:
    env.stub.behaviours = ["slow", "ack"]
    env.stub.slow_s = 1.5
    await env.stub.start(env.port)
    record = await env.submit()
    first = await env.step(record.message_id)
    assert first.state is OutboundState.SENT  # it may have arrived
    assert "within 0.5 s" in (first.last_error or "")
    done = await env.step(record.message_id)
    assert done.state is OutboundState.ACKNOWLEDGED
    assert len(env.stub.seen) == 2
    assert {seen.body for seen in env.stub.seen} == {record.body}
    assert {seen.signature for seen in env.stub.seen} == {record.signature}


async def test_5xx_then_429_honours_retry_after(env: Env) -> None:
    env.stub.behaviours = ["503", "nack_unavailable", "429", "ack"]
    await env.stub.start(env.port)
    record = await env.submit()
    row = await env.step(record.message_id)
    assert (row.state, row.last_error) == (
        OutboundState.SENT,
        "HTTP 503; no signed receipt in the answer",
    )
    row = await env.step(record.message_id)
    assert row.last_error == "HTTP 503, NACK UNAVAILABLE: refused by the stub"
    before = env.clock.now()
    row = await env.step(record.message_id)
    assert row.last_error == "HTTP 429; no signed receipt in the answer"
    assert (row.next_attempt_at - before).total_seconds() >= 120
    row = await env.step(record.message_id)
    assert (row.state, row.attempts) == (OutboundState.ACKNOWLEDGED, 4)
    assert (env.attempts("retry"), env.attempts("acknowledged")) == (3, 1)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("400", "HTTP 400 without a valid receipt: no signed receipt in the answer"),
        (
            "302",
            "HTTP 302 redirect to https://127.0.0.1:9/elsewhere not followed;"
            " check the partner's configured URL",
        ),
    ],
)
async def test_non_retryable_answers_are_dead_at_once(
    env: Env, behaviour: str, reason: str
) -> None:
    env.stub.behaviours = [behaviour]
    await env.stub.start(env.port)
    record = await env.submit()
    row = await env.step(record.message_id)
    assert (row.state, row.attempts, row.last_error) == (OutboundState.DEAD, 1, reason)
    assert len(env.stub.seen) == 1
    assert env.attempts("dead") == 1


@pytest.mark.parametrize("behaviour", ["200_empty", "ack_wrong_key", "ack_wrong_digest"])
async def test_invalid_receipt_is_never_an_ack(env: Env, behaviour: str) -> None:
    env.stub.behaviours = [behaviour, "ack"]
    await env.stub.start(env.port)
    record = await env.submit()
    row = await env.step(record.message_id)
    assert row.state is OutboundState.SENT
    assert row.receipt_body is None
    assert row.last_error is not None
    assert row.last_error.startswith(("HTTP 200 but", "HTTP 202 but"))
    row = await env.step(record.message_id)
    assert row.state is OutboundState.ACKNOWLEDGED


async def test_signed_nack_is_rejected_and_an_operator_may_retry(env: Env) -> None:
    env.stub.behaviours = ["nack"]
    await env.stub.start(env.port)
    record = await env.submit()
    row = await env.step(record.message_id)
    assert (row.state, row.last_error) == (
        OutboundState.REJECTED,
        "HTTP 400, NACK SCHEMA_INVALID: refused by the stub",
    )
    assert row.receipt_body is not None
    entries = await env.events(record.message_id)
    assert any(f'"event":"{EventKind.PARTNER_REJECTED.value}"'.encode() in e for e in entries)
    assert env.attempts("rejected") == 1


async def test_max_attempts_makes_it_dead(env: Env) -> None:
    env.stub.behaviours = ["503"]
    await env.stub.start(env.port)
    record = await env.submit()
    row = record
    for _ in range(4 * OUTBOX.max_attempts):
        row = await env.step(record.message_id)
        if row.state is OutboundState.DEAD:
            break
    assert (row.state, row.attempts) == (OutboundState.DEAD, OUTBOX.max_attempts)
    assert (row.last_error or "").startswith(f"gave up after {OUTBOX.max_attempts} attempts")
    # the last attempt is counted by what it made of the row: dead, not one more retry
    assert (env.attempts("retry"), env.attempts("dead")) == (OUTBOX.max_attempts - 1, 1)


class HandingTransport:
    """An asynchronous transport's contract (AMQP): takes the message, the receipt comes later."""

    name = "https"

    def __init__(self) -> None:
        self.handed: list[bytes] = []

    async def send(self, delivery: Delivery) -> PartnerReply | Handed:
        self.handed.append(delivery.body)
        return Handed()

    async def aclose(self) -> None:
        return None


def handing_dispatcher(env: Env, transport: HandingTransport) -> Dispatcher:
    """A dispatcher whose transport hands messages over (as AMQP does): receipts come later."""
    return Dispatcher(
        store=env.store,
        config=env.config,
        transports={"https": transport},
        partner_keys=load_partner_keys(env.config),
        signing_keys=load_own_signing_keys(env.config),
        clock=env.clock,
        metrics=env.metrics,
    )


async def hand_back_receipt(
    env: Env,
    dispatcher: Dispatcher,
    record: OutboundRecord,
    *,
    code: NackCode | None = None,
) -> bytes:
    """MX-ANAM's signed receipt for ``record``, arriving on the inbound side (as over AMQP)."""
    mx_key = load_signing_key(
        env.config.source.parent.parent / "pki" / "MX-ANAM" / "sign.key",
        party="MX-ANAM",
        alg="EdDSA",
    )
    signed = ReceiptSigner(party="MX-ANAM", keys=[mx_key], clock=env.clock).sign(
        recipient="US-CBP",
        ref_message_id=record.message_id,
        ref_digest=record.body_digest,
        received_at=env.clock.now(),
        status="ACK" if code is None else "NACK",
        code=code,
    )
    await dispatcher.apply_partner_receipt(
        ReceivedReceipt(
            envelope=parse_envelope(signed.body, max_bytes=65536),
            body=signed.body,
            signature=signed.signature,
            kid=mx_key.kid,
            peer="MX-ANAM",
            transport="amqp",
            received_at=env.clock.now(),
        )
    )
    return signed.body


async def test_receipt_arriving_later_on_the_inbound_side(env: Env, tmp_path: Path) -> None:
    transport = HandingTransport()
    dispatcher = env.dispatcher = handing_dispatcher(env, transport)
    record = await env.submit()
    handed = await env.step(record.message_id)
    assert (handed.state, handed.attempts) == (OutboundState.SENT, 1)
    assert env.attempts("handed") == 1
    assert handed.body is not None
    assert (
        env.metrics.registry.get_sample_value(
            "c2c_outbound_delivery_seconds_count", {"partner": "MX-ANAM"}
        )
        == 0.0
    )
    receipt = await hand_back_receipt(env, dispatcher, record)
    # recorded at once, durably: nothing is left for the dispatcher to send again
    done = await env.row(record.message_id)
    assert (done.state, done.attempts) == (OutboundState.ACKNOWLEDGED, 1)
    assert (
        env.metrics.registry.get_sample_value(
            "c2c_outbound_delivery_seconds_count", {"partner": "MX-ANAM"}
        )
        == 1.0
    )
    assert done.receipt_body == receipt
    env.clock.advance(timedelta(days=1))
    assert await dispatcher.run_once() == 0
    assert transport.handed == [record.body]
