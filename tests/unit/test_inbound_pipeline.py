"""The inbound pipeline without any transport: the AMQP-shaped requests, partners' receipts,
concurrent duplicates, fault handling, the STAGES order, and the inbox -> bus relay.

Uses the real SQLite store and the sandbox environment (gateway.devenv) in a tmp dir.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import json
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.clock import ManualClock
from gateway.config import RateLimit, load_config
from gateway.crypto.jws import raw_sign, sign_detached, signing_input
from gateway.crypto.keys import SigningKey, b64url, load_signing_key
from gateway.devenv import prepare_dev_environment
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.errors import GatewayError, NackCode, SchemaInvalid, Unavailable
from gateway.inbound import (
    STAGES,
    InboundContext,
    InboundPipeline,
    InboundRequest,
    ReceivedReceipt,
)
from gateway.inbound.ratelimit import RateLimiters, TokenBucket
from gateway.inbound.stages import Stage
from gateway.model import Envelope, Header
from gateway.outbound.submission import Submission, submit
from gateway.relay import InboxRelay
from gateway.runtime import Gateway
from gateway.store.base import AuditFilter, InboundRecord
from gateway.store.sqlite import SqliteStore
from gateway.transports.bus import MemoryBus

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
MX = "MX-ANAM"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = load_config(prepare_dev_environment(tmp_path))
    gw = Gateway(config, clock=ManualClock(NOW))
    await gw.store.open()
    try:
        yield gw
    finally:
        await gw.store.close()


def mx_key(gateway: Gateway, party: str = MX) -> SigningKey:
    return load_signing_key(
        gateway.config.source.parent / party / "sign.key", party=party, alg="EdDSA"
    )


def message(
    gateway: Gateway,
    *,
    message_type: str = "shipment.advance_data",
    payload: dict[str, object] | None = None,
    in_reply_to: str | None = None,
    sender: str = MX,
) -> tuple[str, bytes]:
    message_id = new_message_id()
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version="1.0",
        sender=sender,
        recipient="US-CBP",
        created_at=NOW,
        expires_at=NOW + dt.timedelta(days=7),
        in_reply_to=in_reply_to,
    )
    if payload is None:
        payload = gateway.registry.examples(message_type, "1.0")[0]
    return message_id, encode_envelope(header, payload)


def amqp_request(
    gateway: Gateway,
    body: bytes,
    *,
    broker_user: str | None = None,
    sign: bool = True,
    peer: str = MX,
) -> InboundRequest:
    return InboundRequest(
        body=body,
        signature=sign_detached(body, mx_key(gateway, peer)) if sign else None,
        transport="amqp",
        peer=peer,
        broker_user=broker_user,
        content_type=None,
    )


def record_claims(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The message ids of every row the relay's claims return, as they are claimed."""
    claimed: list[str] = []
    claim = gateway.store.claim_relay

    async def recording_claim(*args: Any, **kwargs: Any) -> list[InboundRecord]:
        rows = await claim(*args, **kwargs)
        claimed.extend(r.message_id for r in rows)
        return rows

    monkeypatch.setattr(gateway.store, "claim_relay", recording_claim)
    return claimed


def test_stages_run_in_the_documented_order() -> None:
    assert [stage.__name__ for stage in STAGES] == [
        "check_limits",
        "verify_signature",
        "adapt",
        "parse_and_check_freshness",
        "validate_schema",
        "authorize",
        "pair_answer",
        "check_with_service",
        "hand_over_receipts",
        "persist",
    ]


async def test_amqp_message_without_content_type_is_accepted(gateway: Gateway) -> None:
    message_id, body = message(gateway)
    result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert result.http_status == 202
    assert result.code is None
    assert result.record is not None
    assert result.record.transport == "amqp"
    assert result.record.message_id == message_id


async def test_amqp_user_id_of_another_user_is_sender_mismatch(gateway: Gateway) -> None:
    message_id, body = message(gateway)
    result = await gateway.pipeline.handle(amqp_request(gateway, body, broker_user="intruder"))
    assert result.http_status == 403
    assert result.code == NackCode.SENDER_MISMATCH
    assert result.receipt_body is not None
    rows = await gateway.store.audit_entries(AuditFilter(event="rejected"))
    assert len(rows) == 1
    entry = json.loads(rows[0].entry)
    assert "AMQP user_id 'intruder'" in entry["reason"]
    assert entry["message_id"] == message_id


async def test_unknown_peer_gets_problem_not_receipt(gateway: Gateway) -> None:
    _, body = message(gateway)
    request = InboundRequest(body=body, signature=None, transport="amqp", peer="GB-HMRC")
    result = await gateway.pipeline.handle(request)
    assert result.http_status == 403
    assert result.receipt_body is None
    assert result.problem is not None
    assert result.problem["code"] == "SENDER_MISMATCH"


async def test_partner_receipt_goes_to_hook_and_is_not_answered(gateway: Gateway) -> None:
    seen: list[str | None] = []

    async def on_receipt(receipt: ReceivedReceipt) -> None:
        seen.append(receipt.envelope.header.in_reply_to)

    gateway.set_receipt_handler(on_receipt)
    ours = new_message_id()
    payload = {
        "status": "ACK",
        "ref_message_id": ours,
        "ref_digest": body_digest(b"what we sent"),
        "received_at": "2026-11-23T07:00:01.123Z",
        "code": None,
        "detail": None,
    }
    _, body = message(gateway, message_type="receipt", payload=payload, in_reply_to=ours)
    result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert result.http_status == 202
    assert result.receipt_body is None
    assert result.problem is None
    assert seen == [ours]
    # A receipt read late (our AMQP consumer behind, the original ACK sent again for a
    # re-send) settles its message all the same: receipts are not held to the replay window.
    assert isinstance(gateway.clock, ManualClock)
    gateway.clock.advance(dt.timedelta(hours=3))
    late = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert (late.http_status, late.code) == (202, None)
    assert seen == [ours, ours]
    # A bad receipt is refused, but never with a receipt of our own (no loops).
    bad = await gateway.pipeline.handle(amqp_request(gateway, body, sign=False))
    assert bad.code == NackCode.SIGNATURE_INVALID
    assert bad.receipt_body is None
    assert bad.problem is not None


@pytest.mark.parametrize(
    "message_type",
    ["query.response", "enforcement.assistance_response", "audit.cosignature", "receipt"],
)
async def test_an_answer_that_names_nothing_it_answers_is_malformed(
    gateway: Gateway, message_type: str
) -> None:
    # PROTOCOL section 6: these types answer another message; without in_reply_to no one can
    # pair the answer with its question, so the sender is told, not silently accepted.
    message_id, body = message(gateway, message_type=message_type)
    result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert (result.http_status, result.code) == (400, NackCode.MALFORMED)
    detail = f"{message_type} answers another message: in_reply_to is required"
    if message_type == "receipt":
        assert result.receipt_body is None  # no receipt answers a receipt
        assert result.problem is not None
        assert result.problem["detail"] == detail
    else:
        assert result.receipt_body is not None
        receipt = json.loads(result.receipt_body)["payload"]
        assert (receipt["status"], receipt["code"], receipt["detail"]) == (
            "NACK",
            "MALFORMED",
            detail,
        )
    assert await gateway.store.get_inbound(MX, message_id) is None
    # The same answer naming its question is accepted.
    if message_type != "receipt":
        _, named = message(gateway, message_type=message_type, in_reply_to=new_message_id())
        accepted = await gateway.pipeline.handle(amqp_request(gateway, named))
        assert (accepted.http_status, accepted.code) == (202, None)


async def ask(gateway: Gateway, message_type: str, *, recipient: str = MX) -> tuple[str, Any]:
    """Send ``message_type``'s first example to ``recipient`` as US-CBP; its id and payload."""
    payload = gateway.registry.examples(message_type, "1.0")[0]
    sent = await submit(
        gateway.submission_services(),
        Submission(recipient=recipient, message_type=message_type, payload=payload, actor="test"),
    )
    return sent.message_id, payload


def answer_to(
    gateway: Gateway, message_type: str, request_id: str, **echo: str
) -> tuple[str, bytes]:
    payload = {**gateway.registry.examples(message_type, "1.0")[0], **echo}
    return message(gateway, message_type=message_type, payload=payload, in_reply_to=request_id)


@pytest.mark.parametrize(
    ("request_type", "answer_type", "member"),
    [
        ("query.trader_lookup", "query.response", "query_ref"),
        ("query.shipment_lookup", "query.response", "query_ref"),
        ("enforcement.assistance_request", "enforcement.assistance_response", "request_ref"),
    ],
)
async def test_an_answer_must_echo_the_reference_of_the_request_it_names(
    gateway: Gateway, request_type: str, answer_type: str, member: str
) -> None:
    # CUSTOMS-DOMAIN 10.11: a response echoes its request's reference. One that does not
    # would be stored as the answer to a question it does not answer.
    request_id, asked = await ask(gateway, request_type)
    wrong_id, wrong = answer_to(gateway, answer_type, request_id, **{member: "SOMETHING-ELSE-1"})
    refused = await gateway.pipeline.handle(amqp_request(gateway, wrong))
    assert (refused.http_status, refused.code) == (400, NackCode.SCHEMA_INVALID)
    assert refused.receipt_body is not None
    detail = json.loads(refused.receipt_body)["payload"]["detail"]
    assert detail == (
        f"schema error at /payload/{member}: does not echo the {member} of the request named"
        " in in_reply_to"
    )
    assert await gateway.store.get_inbound(MX, wrong_id) is None
    right_id, right = answer_to(gateway, answer_type, request_id, **{member: asked[member]})
    accepted = await gateway.pipeline.handle(amqp_request(gateway, right))
    assert (accepted.http_status, accepted.code) == (202, None)
    assert await gateway.store.get_inbound(MX, right_id) is not None


async def test_an_answer_to_another_kind_of_request_is_malformed(gateway: Gateway) -> None:
    request_id, asked = await ask(gateway, "query.trader_lookup")
    _, body = answer_to(
        gateway, "enforcement.assistance_response", request_id, request_ref=asked["query_ref"]
    )
    result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert (result.http_status, result.code) == (400, NackCode.MALFORMED)
    assert result.receipt_body is not None
    assert json.loads(result.receipt_body)["payload"]["detail"] == (
        "in_reply_to names our query.trader_lookup; enforcement.assistance_response answers"
        " enforcement.assistance_request"
    )


async def test_an_answer_naming_no_request_of_ours_to_the_sender_is_let_through(
    gateway: Gateway,
) -> None:
    # Nothing to compare with: a request purged by retention, sent by another system, or
    # sent to another partner (whose ids this sender is not told about).
    to_ca, _ = await ask(gateway, "query.trader_lookup", recipient="CA-CBSA")
    for request_id in (new_message_id(), to_ca):
        _, body = answer_to(gateway, "query.response", request_id, query_ref="SOMETHING-ELSE-1")
        result = await gateway.pipeline.handle(amqp_request(gateway, body))
        assert (result.http_status, result.code) == (202, None)


async def test_a_request_of_ours_that_no_longer_reads_is_not_the_partners_fault(
    gateway: Gateway,
) -> None:
    # Our stored request no longer reads (say the partner's adapter changed since we sent
    # it): the answer cannot be compared with it, and the partner is not blamed for that.
    request_id, _ = await ask(gateway, "query.trader_lookup")
    path = gateway.config.store_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE outbound_messages SET body = ? WHERE message_id = ?", (b"<native/>", request_id)
        )
    _, body = answer_to(gateway, "query.response", request_id, query_ref="SOMETHING-ELSE-1")
    with structlog.testing.capture_logs() as logs:
        result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert (result.http_status, result.code) == (202, None)
    assert [e["request"] for e in logs if e["event"] == "answer_request_unreadable"] == [request_id]


async def test_a_kid_of_another_party_on_the_senders_signature_is_unknown_key(
    gateway: Gateway,
) -> None:
    # MX-ANAM signs with its own key but names CA-CBSA's kid (a copied sign.kid): the kid is
    # not configured for the sender, PROTOCOL's UNKNOWN_KEY, not a bad signature.
    _, body = message(gateway)
    ca_kid = mx_key(gateway, "CA-CBSA").kid
    protected = b64url(json.dumps({"alg": "EdDSA", "kid": ca_kid}).encode())
    signature = raw_sign(mx_key(gateway), signing_input(protected, body))
    request = dataclasses.replace(
        amqp_request(gateway, body), signature=f"{protected}..{b64url(signature)}"
    )
    result = await gateway.pipeline.handle(request)
    assert (result.http_status, result.code) == (401, NackCode.UNKNOWN_KEY)


async def test_concurrent_copies_store_once_and_share_the_receipt(gateway: Gateway) -> None:
    message_id, body = message(gateway)
    results = await asyncio.gather(
        *(gateway.pipeline.handle(amqp_request(gateway, body)) for _ in range(8))
    )
    assert sorted(r.http_status for r in results) == [200] * 7 + [202]
    assert len({r.receipt_body for r in results}) == 1
    pending = await gateway.store.pending_relay(100)
    assert [r.message_id for r in pending] == [message_id]


@pytest.mark.parametrize(
    ("expires_in", "later"),
    [
        (dt.timedelta(days=7), dt.timedelta(minutes=16)),  # past the 15-minute replay window
        (dt.timedelta(minutes=5), dt.timedelta(minutes=6)),  # past its expires_at
    ],
)
async def test_an_exact_re_send_after_its_freshness_gets_the_original_receipt(
    gateway: Gateway, expires_in: dt.timedelta, later: dt.timedelta
) -> None:
    """PROTOCOL.md section 4: an exact re-send of an accepted message is answered 200 with the
    original ACK, however late (a lost answer, an AMQP redelivery after a crash). The replay
    window still refuses what was never accepted, and other bytes under the same id."""
    header = Header(
        message_id=new_message_id(),
        message_type="shipment.advance_data",
        schema_version="1.0",
        sender=MX,
        recipient="US-CBP",
        created_at=NOW,
        expires_at=NOW + expires_in,
    )
    payload = gateway.registry.examples("shipment.advance_data", "1.0")[0]
    body = encode_envelope(header, payload)
    first = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert first.http_status == 202
    assert isinstance(gateway.clock, ManualClock)
    gateway.clock.advance(later)

    again = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert (again.http_status, again.code) == (200, None)
    assert again.receipt_body == first.receipt_body
    assert again.receipt_signature == first.receipt_signature
    duplicates = await gateway.store.audit_entries(AuditFilter(event="duplicate"))
    assert [json.loads(r.entry)["message_id"] for r in duplicates] == [header.message_id]

    other_bytes = encode_envelope(header, {**payload, "declared_value": {"amount": 1}})
    conflicting = await gateway.pipeline.handle(amqp_request(gateway, other_bytes))
    assert conflicting.code is NackCode.STALE
    never_accepted = encode_envelope(
        dataclasses.replace(header, message_id=new_message_id()), payload
    )
    refused = await gateway.pipeline.handle(amqp_request(gateway, never_accepted))
    assert refused.code is NackCode.STALE
    # a copy sent by another broker user is not answered from the store
    impostor = await gateway.pipeline.handle(
        amqp_request(gateway, body, broker_user="someone-else")
    )
    assert impostor.code is NackCode.STALE


async def test_an_inbound_check_refuses_before_the_commit_but_not_an_exact_re_send(
    gateway: Gateway,
) -> None:
    """A service's inbound check (witnessing's) NACKs what it refuses, with its code and
    detail, stores nothing and audits the exact reason; an exact re-send of a message accepted
    before the check changed its mind still gets the original receipt."""
    verdict: list[GatewayError] = []
    seen: list[tuple[str, str]] = []

    async def check(sender: str, envelope: Envelope) -> None:
        seen.append((sender, envelope.header.message_id))
        if verdict:
            raise verdict[0]

    gateway.add_inbound_check(["shipment.advance_data"], check)
    first_id, first_body = message(gateway)
    first = await gateway.pipeline.handle(amqp_request(gateway, first_body))
    assert first.http_status == 202
    assert seen == [(MX, first_id)]

    verdict.append(SchemaInvalid("the exact reason", pointer="/x", detail="what is wrong at x"))
    again = await gateway.pipeline.handle(amqp_request(gateway, first_body))
    assert (again.http_status, again.receipt_body) == (200, first.receipt_body)

    refused_id, refused_body = message(gateway)
    refused = await gateway.pipeline.handle(amqp_request(gateway, refused_body))
    assert (refused.http_status, refused.code) == (400, NackCode.SCHEMA_INVALID)
    assert refused.receipt_body is not None
    receipt = json.loads(refused.receipt_body)["payload"]
    assert (receipt["status"], receipt["detail"]) == ("NACK", "what is wrong at x")
    assert await gateway.store.get_inbound(MX, refused_id) is None
    (entry,) = await gateway.store.audit_entries(AuditFilter(message_id=refused_id))
    assert json.loads(entry.entry)["reason"] == "the exact reason"
    # a type without a check is not held up
    other_id, other_body = message(gateway, message_type="shipment.manifest")
    assert (await gateway.pipeline.handle(amqp_request(gateway, other_body))).http_status == 202
    assert (MX, other_id) not in seen
    with pytest.raises(RuntimeError, match="already has an inbound check"):
        gateway.add_inbound_check(["shipment.advance_data"], check)


async def test_a_rejection_log_line_names_its_audit_entry(gateway: Gateway) -> None:
    """sre finding L3: a refusal that names no message id (an unparseable body) is found in
    the audit log from its log line: the line carries the entry's seq and body digest."""
    body = b"not json at all"
    with structlog.testing.capture_logs() as logs:
        result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert result.code is NackCode.MALFORMED
    (line,) = [entry for entry in logs if entry["event"] == "inbound_rejected"]
    assert line["message_id"] is None
    entry = await gateway.store.audit_entry(line["audit_seq"])
    assert entry is not None
    audited = json.loads(entry.entry)
    assert audited["event"] == "rejected"
    assert audited["body_digest"] == line["body_digest"] == body_digest(body)


async def test_an_upper_case_message_id_is_one_message_in_lower_case(gateway: Gateway) -> None:
    message_id, body = message(gateway)
    upper = body.replace(message_id.encode(), message_id.upper().encode())
    first = await gateway.pipeline.handle(amqp_request(gateway, upper))
    assert first.http_status == 202
    assert first.receipt_body is not None
    assert json.loads(first.receipt_body)["payload"]["ref_message_id"] == message_id
    stored = await gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.body == upper  # the signed bytes as they came
    again = await gateway.pipeline.handle(amqp_request(gateway, upper))
    assert (again.http_status, again.receipt_body) == (200, first.receipt_body)
    # the same id in the other case with other bytes is the same message: a conflict
    lower = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert lower.code is NackCode.DUPLICATE_CONFLICT
    # a refusal of such a message, even before its envelope is read, is a signed NACK that
    # names it
    other_id, other = message(gateway)
    unsigned = other.replace(other_id.encode(), other_id.upper().encode())
    refused = await gateway.pipeline.handle(amqp_request(gateway, unsigned, sign=False))
    assert refused.code is NackCode.SIGNATURE_INVALID
    assert refused.receipt_body is not None
    assert json.loads(refused.receipt_body)["payload"]["ref_message_id"] == other_id


async def test_a_key_listed_twice_verifies_in_either_of_its_windows(gateway: Gateway) -> None:
    """The same key configured twice for a partner, with an expired window and a current
    one (a rotation back to an earlier key): a message signed now is checked against the
    entry valid at its created_at, not against whichever entry comes first."""
    (mx,) = [key for key in gateway.keyring if key.party == MX]
    others = [key for key in gateway.keyring if key.party != MX]
    expired = dataclasses.replace(mx, not_before=None, not_after=NOW - dt.timedelta(days=300))
    current = dataclasses.replace(mx, not_before=NOW - dt.timedelta(days=30), not_after=None)
    gateway.keyring.replace([*others, expired, current])
    _, body = message(gateway)
    accepted = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert accepted.http_status == 202
    gateway.keyring.replace([*others, expired])
    _, body = message(gateway)
    refused = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert refused.code is NackCode.UNKNOWN_KEY


async def test_bug_in_a_stage_is_503_and_nothing_acknowledged(gateway: Gateway) -> None:
    async def broken(ctx: InboundContext) -> None:
        raise KeyError("a bug")

    stages: list[Stage] = [*STAGES[:-1], broken]
    pipeline = InboundPipeline(gateway.pipeline.env, stages)
    message_id, body = message(gateway)
    result = await pipeline.handle(amqp_request(gateway, body))
    assert result.http_status == 503
    assert result.code == NackCode.UNAVAILABLE
    assert await gateway.store.get_inbound(MX, message_id) is None
    rows = await gateway.store.audit_entries(AuditFilter(event="rejected"))
    assert [json.loads(r.entry)["reason"] for r in rows] == [
        "internal error in the inbound pipeline: KeyError"
    ]
    # a bug is about this message: over AMQP it counts towards dead-lettering
    assert not result.outage
    # the refusal was audited, so the store answered: no need to ask it whether it is up
    assert result.audited
    # answered (HTTPS): a signed NACK
    assert result.receipt_body is not None
    assert result.receipt_signature is not None


async def test_an_unavailable_refusal_no_one_answers_is_not_signed(gateway: Gateway) -> None:
    """Over AMQP an UNAVAILABLE delivery is requeued or rejected, never answered: its NACK
    would be signed for nothing (once per attempt of a poison message)."""

    async def broken(ctx: InboundContext) -> None:
        raise KeyError("a bug")

    pipeline = InboundPipeline(gateway.pipeline.env, [*STAGES[:-1], broken])
    _, body = message(gateway)
    request = dataclasses.replace(amqp_request(gateway, body), unavailable_answered=False)
    result = await pipeline.handle(request)
    assert (result.http_status, result.code) == (503, NackCode.UNAVAILABLE)
    assert result.receipt_body is None
    assert result.receipt_signature is None
    assert result.problem is not None
    assert result.problem["code"] == "UNAVAILABLE"
    # other refusals of such a request are still signed NACKs
    stale = dataclasses.replace(request, body=body.replace(b"2026", b"2016", 1))
    refused = await gateway.pipeline.handle(stale)
    assert refused.code is not NackCode.UNAVAILABLE
    assert refused.receipt_body is not None


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (sqlite3.OperationalError("database or disk is full"), True),  # SQLITE_FULL
        (sqlite3.OperationalError("disk I/O error"), True),  # SQLITE_IOERR_WRITE
        (sqlite3.OperationalError("database is locked"), True),  # SQLITE_BUSY
        (sqlite3.OperationalError("no such column: x"), False),  # SQLITE_ERROR: a bug
    ],
)
async def test_a_store_outage_is_marked_so_transports_hold_the_message(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, error: sqlite3.Error, outage: bool
) -> None:
    """The store's writes fail: the answer is 503 either way, and ``outage`` says whether the
    cause fails every message alike (held and retried over AMQP) or is this message's own."""
    error.sqlite_errorcode = {  # type: ignore[attr-defined]
        "database or disk is full": 13,
        "disk I/O error": 778,
        "database is locked": 5,
        "no such column: x": 1,
    }[str(error)]

    def failing(conn: sqlite3.Connection) -> None:
        raise error

    store = gateway.store
    assert isinstance(store, SqliteStore)
    original = store._commit_batch
    monkeypatch.setattr(store, "_commit_batch", lambda fns: original([failing, *fns])[1:])
    message_id, body = message(gateway)
    result = await gateway.pipeline.handle(amqp_request(gateway, body))
    assert (result.http_status, result.code) == (503, NackCode.UNAVAILABLE)
    assert result.outage is outage
    assert not result.audited  # the refusal's audit entry failed too
    monkeypatch.undo()
    assert await gateway.store.get_inbound(MX, message_id) is None


def test_token_bucket_refills_at_its_rate() -> None:
    clock = ManualClock(NOW)
    bucket = TokenBucket(RateLimit(per_second=2.0, burst=2), clock)
    assert bucket.take() == 0.0
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)
    clock.advance(dt.timedelta(seconds=0.5))
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


async def test_relay_republishes_what_the_bus_did_not_confirm_and_only_that(
    gateway: Gateway,
) -> None:
    """A record the bus did not take stays pending and goes out again; the records the bus took
    behind it in the batch are marked and audited at once, never published again."""
    bus = MemoryBus()
    seen: list[str] = []
    refused: set[str] = set()

    async def consumer(record: InboundRecord) -> None:
        seen.append(record.message_id)
        if record.message_id in refused:
            raise ConnectionError("consumer crashed after taking it")

    bus.subscribe(consumer)

    clock = gateway.clock
    assert isinstance(clock, ManualClock)
    relay = InboxRelay(store=gateway.store, bus=bus, clock=clock, metrics=gateway.metrics)
    past_the_lease = dt.timedelta(seconds=11)
    messages = [message(gateway) for _ in range(3)]
    for _, body in messages:
        assert (await gateway.pipeline.handle(amqp_request(gateway, body))).http_status == 202
    first, second, third = (message_id for message_id, _ in messages)
    refused.add(first)
    assert await relay.relay_once() == 2
    # the refused record waits for its lease, then, alone in its batch, fails the round
    assert await relay.relay_once() == 0
    clock.advance(past_the_lease)
    with pytest.raises(Unavailable, match="subscriber failed"):
        await relay.relay_once()
    refused.clear()
    clock.advance(past_the_lease)
    assert await relay.relay_once() == 1
    assert await relay.relay_once() == 0
    # At least once: the first one three times, each time with its message_id; nothing lost,
    # and nothing taken published again.
    assert seen == [first, second, third, first, first]
    delivered = await gateway.store.audit_entries(AuditFilter(event="delivered"))
    assert Counter(json.loads(row.entry)["message_id"] for row in delivered) == Counter(
        {first: 1, second: 1, third: 1}
    )


async def test_running_relay_publishes_handed_records_without_claiming_them(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    all_seen = asyncio.Event()

    async def consumer(record: InboundRecord) -> None:
        seen.append(record.message_id)
        if len(seen) == 3:
            all_seen.set()

    gateway.bus.subscribe(consumer)
    claimed = record_claims(gateway, monkeypatch)
    gateway.relay.start()
    try:
        ids = [message(gateway) for _ in range(3)]
        for _, body in ids:
            assert (await gateway.pipeline.handle(amqp_request(gateway, body))).http_status == 202
        await asyncio.wait_for(all_seen.wait(), 5)
    finally:
        await gateway.relay.stop()
    assert seen == [message_id for message_id, _ in ids]
    assert claimed == []
    assert await gateway.store.pending_relay(10) == []
    delivered = await gateway.store.audit_entries(AuditFilter(event="delivered"))
    assert len(delivered) == 3


async def test_stopping_relay_releases_the_rows_it_could_not_publish(gateway: Gateway) -> None:
    tried = asyncio.Event()

    async def broken(record: InboundRecord) -> None:
        tried.set()
        raise ConnectionError("consumer down")

    gateway.bus.subscribe(broken)
    gateway.relay.start()
    ids = [message(gateway) for _ in range(2)]
    for _, body in ids:
        assert (await gateway.pipeline.handle(amqp_request(gateway, body))).http_status == 202
    await asyncio.wait_for(tried.wait(), 5)
    await gateway.relay.stop()
    # leased to the stopped relay until NOW + its lease, yet another relay may take them now
    taken = await gateway.store.claim_relay("next-relay", NOW, 10, 30)
    assert sorted(r.message_id for r in taken) == sorted(message_id for message_id, _ in ids)


async def test_a_handed_record_whose_lease_ran_out_is_delivered_once(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bus down for longer than the relay's lease: the row handed over at insert is
    leased again by the relay's own claim. Once the bus is back it goes out once, marked
    under the lease the claim holds; before, its mark under the hand-over lease matched
    nothing (``relay_lease_lost``) and the next claim published it a second time."""
    assert isinstance(gateway.clock, ManualClock)
    down = True
    tried = asyncio.Event()
    delivered: list[str] = []

    async def consumer(record: InboundRecord) -> None:
        tried.set()
        if down:
            raise ConnectionError("bus down")
        delivered.append(record.message_id)

    gateway.bus.subscribe(consumer)
    claimed = record_claims(gateway, monkeypatch)
    gateway.relay.start()
    try:
        message_id, body = message(gateway)
        assert (await gateway.pipeline.handle(amqp_request(gateway, body))).http_status == 202
        await asyncio.wait_for(tried.wait(), 5)
        assert claimed == []  # handed over, not claimed
        gateway.clock.advance(dt.timedelta(seconds=gateway.config.relay.lease_s + 1))
        async with asyncio.timeout(10):
            while message_id not in claimed:
                gateway.relay.notify()
                await asyncio.sleep(0.05)
        down = False
        async with asyncio.timeout(10):
            while await gateway.store.pending_relay(10):
                gateway.relay.notify()
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # three more poll rounds: a second publish would show here
    finally:
        await gateway.relay.stop()
    assert delivered == [message_id]
    entries = await gateway.store.audit_entries(AuditFilter(event="delivered"))
    assert [json.loads(row.entry)["message_id"] for row in entries] == [message_id]


async def test_relay_hand_over_is_bounded_in_bytes_while_the_bus_is_down(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted records wait in memory for the relay only up to a byte bound (T55): past it,
    rows are stored unleased and claimed from the database once the bus is back."""
    down = True
    tried = asyncio.Event()
    seen: set[str] = set()

    async def consumer(record: InboundRecord) -> None:
        tried.set()
        if down:
            raise ConnectionError("bus down")
        seen.add(record.message_id)

    gateway.bus.subscribe(consumer)
    messages = [message(gateway) for _ in range(30)]
    one = len(messages[0][1])
    # room for four records at most: each holds its body and its receipt
    monkeypatch.setattr(gateway.relay, "_max_handed_bytes", 5 * one)
    gateway.relay.start()
    try:
        peak = 0
        for _, body in messages:
            assert (await gateway.pipeline.handle(amqp_request(gateway, body))).http_status == 202
            peak = max(peak, gateway.relay.handed_bytes)
        await asyncio.wait_for(tried.wait(), 5)
        assert 0 < peak <= 5 * one
        assert 1 <= gateway.relay.handed_records <= 4
        assert len(await gateway.store.pending_relay(100)) == 30
        assert gateway.metrics.registry.get_sample_value("c2c_relay_handover_bytes") == (
            gateway.relay.handed_bytes
        )
        down = False
        gateway.relay.notify()
        async with asyncio.timeout(15):
            while len(seen) < 30:
                await asyncio.sleep(0.05)
                gateway.relay.notify()
    finally:
        await gateway.relay.stop()
    assert seen == {message_id for message_id, _ in messages}
    assert gateway.relay.handed_bytes == 0
    assert await gateway.store.pending_relay(100) == []


async def test_a_partner_over_its_rate_is_answered_one_refusal_at_a_time(
    gateway: Gateway,
) -> None:
    """T40: refusals of a flooding partner go one at a time, at most one per 1/rate seconds,
    so its many connections cannot take every other partner's turn; another partner's
    message is not held behind them."""
    rate = gateway.config.partners[MX].rate.per_second  # 200/s in the sandbox
    limits = RateLimiters({MX: RateLimit(per_second=rate, burst=1)}, gateway.clock)
    pipeline = InboundPipeline(dataclasses.replace(gateway.pipeline.env, limiters=limits))
    loop = asyncio.get_running_loop()
    appending = 0
    refusals: list[tuple[float, int]] = []
    append_audit = gateway.store.append_audit

    async def counted(events: Any) -> Any:
        nonlocal appending
        appending += 1
        if any(e.outcome == NackCode.RATE_LIMITED.value for e in events):
            refusals.append((loop.time(), appending))
        try:
            return await append_audit(events)
        finally:
            appending -= 1

    gateway.store.append_audit = counted  # type: ignore[method-assign]
    _, first = message(gateway)
    assert (await pipeline.handle(amqp_request(gateway, first))).http_status == 202
    flood = [
        asyncio.create_task(pipeline.handle(amqp_request(gateway, message(gateway)[1])))
        for _ in range(5)
    ]
    await asyncio.sleep(0)
    _, ca_body = message(gateway, sender="CA-CBSA")
    other = await pipeline.handle(amqp_request(gateway, ca_body, peer="CA-CBSA"))
    assert other.http_status == 202
    assert not all(task.done() for task in flood)  # not held behind the flooder's refusals
    results = await asyncio.gather(*flood)
    assert [r.code for r in results] == [NackCode.RATE_LIMITED] * 5
    assert [r.receipt_body is not None for r in results] == [True] * 5
    assert [concurrent for _, concurrent in refusals] == [1] * 5
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(refusals)]
    assert min(gaps) >= 0.9 / rate, gaps  # 1/rate apart (the ManualClock refills nothing)
