"""The shared Store suite: every test runs on SQLite and on the local PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.merkle import frontier, root_from_nodes
from gateway.clock import ManualClock
from gateway.errors import DuplicateConflict, IdempotencyKeyReused
from gateway.model import Direction, Priority
from gateway.store import Store, open_store
from gateway.store.base import (
    AttemptUpdate,
    AuditFilter,
    InboundRecord,
    InvalidTransition,
    LeaseLost,
    MessageFilter,
    MessageNotFound,
    OutboundRecord,
    OutboundState,
    RelayLease,
    Resigned,
)

T0 = datetime.fromisoformat("2026-11-24T12:00:00+00:00")


def digest(body: bytes) -> str:
    return "sha-256:" + hashlib.sha256(body).hexdigest()


def inbound(
    message_id: str,
    *,
    sender: str = "MX-SAT",
    body: bytes = b'{"payload": 1}',
    at: datetime = T0,
    in_reply_to: str | None = None,
    correlation_id: str | None = None,
    document_ref: str | None = None,
    created_at: datetime | None = None,
    message_function: str | None = None,
) -> InboundRecord:
    return InboundRecord(
        document_ref=document_ref,
        created_at=created_at,
        message_function=message_function,
        sender=sender,
        message_id=message_id,
        recipient="US-CBP",
        message_type="shipment.advance_data",
        schema_version="1.0",
        correlation_id=correlation_id,
        in_reply_to=in_reply_to,
        body=body,
        body_digest=digest(body),
        signature="eyJhbGciOiJFZERTQSJ9..c2ln",
        kid="kid-1",
        transport="https",
        received_at=at,
        receipt_body=b'{"receipt": "' + message_id.encode() + b'"}',
        receipt_signature="eyJhbGciOiJFZERTQSJ9..cmVj",
    )


def outbound(
    message_id: str,
    *,
    priority: Priority = Priority.ROUTINE,
    at: datetime = T0,
    expires_at: datetime | None = None,
    recipient: str = "MX-SAT",
) -> OutboundRecord:
    body = b'{"out": "' + message_id.encode() + b'"}'
    return OutboundRecord(
        message_id=message_id,
        recipient=recipient,
        message_type="shipment.advance_data",
        schema_version="1.0",
        correlation_id=None,
        in_reply_to=None,
        priority=priority,
        body=body,
        body_digest=digest(body),
        signature="eyJhbGciOiJFZERTQSJ9..b3V0",
        kid="kid-1",
        transport="https",
        created_at=at,
        expires_at=expires_at,
        next_attempt_at=at,
        updated_at=at,
        submitted_by="svc-test",
    )


def event(kind: EventKind, message_id: str | None = None, **extra: str) -> AuditEvent:
    return AuditEvent(event=kind, at=T0, message_id=message_id, **extra)


async def all_seqs(store: Store) -> list[int]:
    rows = await store.audit_entries(AuditFilter(), limit=100_000)
    return [r.seq for r in rows]


def naive_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH, straight from the definition."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    left, right = naive_root(leaves[:k]), naive_root(leaves[k:])
    return hashlib.sha256(b"\x01" + left + right).digest()


# inbox


async def test_document_versions_sort_by_created_at_then_arrival(store: Store) -> None:
    """T47: v2 stored before v1; v3 made at v2's instant and stored after it; the versions come
    back v1, v2, v3 and each record's document_version sorts the same way."""

    def version(mid: str, seconds: int, function: str, ref: str = "HAWB-1") -> InboundRecord:
        return inbound(
            mid,
            body=mid.encode(),
            document_ref=ref,
            created_at=T0 + timedelta(seconds=seconds),
            message_function=function,
        )

    v2 = version("00000000-0000-4000-8000-0000000000d2", 10, "4")
    v1 = version("00000000-0000-4000-8000-0000000000d1", 0, "9")
    v3 = version("00000000-0000-4000-8000-0000000000d3", 10, "1")
    other = version("00000000-0000-4000-8000-0000000000e1", 5, "9", ref="HAWB-2")
    plain = inbound("00000000-0000-4000-8000-0000000000f1", body=b"plain")
    assert (await store.store_inbound(v2, [])).status == "stored"
    # stored together (one batch where the backend batches)
    outcomes = await asyncio.gather(
        *(store.store_inbound(record, []) for record in (v1, other, plain))
    )
    assert [o.status for o in outcomes] == ["stored"] * 3
    assert (await store.store_inbound(v3, [])).status == "stored"

    versions = await store.document_versions("MX-SAT", "shipment.advance_data", "HAWB-1")
    assert [v.message_id for v in versions] == [v1.message_id, v2.message_id, v3.message_id]
    assert [v.message_function for v in versions] == ["9", "4", "1"]
    later = T0 + timedelta(seconds=10)
    assert [v.created_at for v in versions] == [T0, later, later]
    newest = await store.document_versions("MX-SAT", "shipment.advance_data", "HAWB-1", limit=2)
    assert [v.message_id for v in newest] == [v2.message_id, v3.message_id]
    assert await store.document_versions("MX-SAT", "shipment.manifest", "HAWB-1") == []
    assert await store.document_versions("CA-CBSA", "shipment.advance_data", "HAWB-1") == []

    got = {r.message_id: r for r in await store.pending_relay(10)}
    claimed = {r.message_id: r for r in await store.claim_relay("relay-a", T0, 10, 30.0)}
    for records in (got, claimed):
        assert records[v1.message_id].document_ref == "HAWB-1"
        assert records[v1.message_id].created_at == T0
        assert records[v1.message_id].message_function == "9"
        ordered = sorted(
            (records[r.message_id] for r in (v3, v1, v2)),
            key=lambda r: r.document_version or "",
        )
        assert [r.message_id for r in ordered] == [v1.message_id, v2.message_id, v3.message_id]
        assert records[plain.message_id].document_ref is None
        assert records[plain.message_id].document_version is None


async def test_inbound_stored_then_duplicate_returns_original_receipt(store: Store) -> None:
    first = await store.store_inbound(inbound("m-1"), [event(EventKind.ACCEPTED, "m-1")])
    assert first.status == "stored"
    assert first.record.seq is not None
    later = replace(inbound("m-1"), receipt_body=b"another receipt", received_at=T0 + timedelta(1))
    again = await store.store_inbound(later, [event(EventKind.ACCEPTED, "m-1")])
    assert again.status == "duplicate"
    assert again.record.receipt_body == b'{"receipt": "m-1"}'
    assert again.record.received_at == T0
    assert await store.audit_size() == 1


async def test_inbound_same_id_other_body_is_conflict_and_leaves_original(store: Store) -> None:
    await store.store_inbound(inbound("m-1"), [event(EventKind.ACCEPTED, "m-1")])
    outcome = await store.store_inbound(
        inbound("m-1", body=b'{"payload": 2}'), [event(EventKind.ACCEPTED, "m-1")]
    )
    assert outcome.status == "conflict"
    assert outcome.record.body == b'{"payload": 1}'
    stored = await store.get_inbound("MX-SAT", "m-1")
    assert stored is not None
    assert stored.body == b'{"payload": 1}'
    assert await store.audit_size() == 1


async def test_inbound_dedupe_is_scoped_by_sender(store: Store) -> None:
    a = await store.store_inbound(inbound("123", sender="MX-SAT"), [])
    b = await store.store_inbound(inbound("123", sender="CA-CBSA"), [])
    assert (a.status, b.status) == ("stored", "stored")


async def test_fifty_concurrent_identical_inserts_store_one_row(store: Store) -> None:
    outcomes = await asyncio.gather(
        *(
            store.store_inbound(inbound("race"), [event(EventKind.ACCEPTED, "race")])
            for _ in range(50)
        )
    )
    statuses = sorted(o.status for o in outcomes)
    assert statuses == ["duplicate"] * 49 + ["stored"]
    assert await store.audit_size() == 1
    assert len(await store.pending_relay(100)) == 1


async def test_concurrent_same_key_other_bodies_store_one_and_conflict_the_rest(
    store: Store,
) -> None:
    bodies = [b'{"payload": %d}' % (i % 3) for i in range(30)]
    outcomes = await asyncio.gather(
        *(
            store.store_inbound(inbound("same", body=body), [event(EventKind.ACCEPTED, "same")])
            for body in bodies
        )
    )
    stored = [o for o in outcomes if o.status == "stored"]
    assert len(stored) == 1
    winner = stored[0].record.body_digest
    for outcome, body in zip(outcomes, bodies, strict=True):
        assert outcome.record == stored[0].record
        if outcome.status != "stored":
            expected = "duplicate" if digest(body) == winner else "conflict"
            assert outcome.status == expected
    assert await store.audit_size() == 1


async def test_many_concurrent_inbound_each_visible_when_returned(store: Store) -> None:
    async def one(i: int) -> None:
        outcome = await store.store_inbound(
            inbound(f"gc-{i}"), [event(EventKind.ACCEPTED, f"gc-{i}")]
        )
        assert outcome.status == "stored"
        # read back on another connection: the row was committed before the call returned
        assert await store.get_inbound("MX-SAT", f"gc-{i}") is not None

    await asyncio.gather(*(one(i) for i in range(200)))
    assert await store.audit_size() == 200
    assert await all_seqs(store) == list(range(200))


async def test_relay_pending_oldest_first_and_marked(store: Store) -> None:
    for i in range(5):
        await store.store_inbound(inbound(f"r-{i}"), [])
    pending = await store.pending_relay(3)
    assert [r.message_id for r in pending] == ["r-0", "r-1", "r-2"]
    await store.mark_relayed([r.key for r in pending], [event(EventKind.DELIVERED, "r-0")])
    rest = await store.pending_relay(10)
    assert [r.message_id for r in rest] == ["r-3", "r-4"]
    relayed = await store.get_inbound("MX-SAT", "r-0")
    assert relayed is not None
    assert relayed.relayed
    assert await store.audit_size() == 1


async def test_two_concurrent_relay_claimers_never_share_a_pending_row(
    store: Store, store_url: str, store_clock: ManualClock
) -> None:
    for i in range(120):
        await store.store_inbound(inbound(f"p-{i:03d}"), [])
    other = open_store(store_url, clock=store_clock)
    await other.open()
    try:
        claims: dict[str, list[str]] = {"a": [], "b": []}

        async def drain(name: str, s: Store) -> None:
            while True:
                got = await s.claim_relay(name, T0, 7, 60)
                if not got:
                    return
                # the relay marks only after the bus confirmed: let the other claim meanwhile
                await asyncio.sleep(0)
                claims[name].extend(r.message_id for r in got)
                await s.mark_relayed(
                    [r.key for r in got],
                    [event(EventKind.DELIVERED, r.message_id, sender=r.sender) for r in got],
                    owner=name,
                )

        await asyncio.gather(drain("a", store), drain("b", other))
    finally:
        await other.close()
    everything = claims["a"] + claims["b"]
    assert len(everything) == len(set(everything)) == 120
    assert await store.pending_relay(200) == []
    assert await store.audit_size() == 120


async def test_relay_claim_oldest_first_and_own_rows_after_their_lease(store: Store) -> None:
    for i in range(5):
        await store.store_inbound(inbound(f"o-{i}"), [])
    first = await store.claim_relay("a", T0, 3, 30)
    assert [r.message_id for r in first] == ["o-0", "o-1", "o-2"]
    assert [r.message_id for r in await store.claim_relay("b", T0, 10, 30)] == ["o-3", "o-4"]
    # a leased row waits for its lease, whoever holds it: rows the bus refused (unroutable)
    # do not come back at every round ahead of the rows behind them
    assert await store.claim_relay("a", T0 + timedelta(seconds=1), 10, 30) == []
    # past the leases (b's too), oldest first
    again = await store.claim_relay("a", T0 + timedelta(seconds=31), 10, 30)
    assert [r.message_id for r in again] == [f"o-{i}" for i in range(5)]


async def test_row_stored_under_a_relay_lease_needs_no_claim(store: Store) -> None:
    lease = RelayLease(owner="hand", until=T0 + timedelta(seconds=30))
    outcome = await store.store_inbound(inbound("h-0"), [], relay_lease=lease)
    assert outcome.status == "stored"
    await store.store_inbound(inbound("h-1"), [])
    # another relay's claim skips the leased row until the lease ends
    assert [r.message_id for r in await store.claim_relay("b", T0, 10, 30)] == ["h-1"]
    assert await store.claim_relay("c", T0 + timedelta(seconds=29), 10, 30) == []
    # the holder marks it without claiming it; a mark by someone else is refused
    assert await store.mark_relayed([outcome.record.key], owner="b") == []
    assert await store.mark_relayed([outcome.record.key], owner="hand") == [outcome.record.key]
    assert [r.message_id for r in await store.pending_relay(10)] == ["h-1"]


async def test_a_duplicate_keeps_the_original_rows_lease(store: Store) -> None:
    lease = RelayLease(owner="hand", until=T0 + timedelta(seconds=30))
    await store.store_inbound(inbound("d-0"), [])
    again = await store.store_inbound(inbound("d-0"), [], relay_lease=lease)
    assert again.status == "duplicate"
    # the re-send did not lease the original row: any relay may claim it
    assert [r.message_id for r in await store.claim_relay("b", T0, 10, 30)] == ["d-0"]


async def test_release_relay_frees_a_stopped_relays_rows_at_once(store: Store) -> None:
    lease = RelayLease(owner="hand", until=T0 + timedelta(seconds=30))
    for i in range(3):
        await store.store_inbound(inbound(f"s-{i}"), [], relay_lease=lease)
    done = await store.mark_relayed([("MX-SAT", "s-0")], owner="hand")
    assert done == [("MX-SAT", "s-0")]
    assert await store.claim_relay("next", T0, 10, 30) == []
    assert await store.release_relay("hand") == 2
    assert await store.release_relay("hand") == 0
    taken = await store.claim_relay("next", T0, 10, 30)
    assert [r.message_id for r in taken] == ["s-1", "s-2"]


async def test_relay_lease_expiry_hands_rows_over(store: Store) -> None:
    for i in range(4):
        await store.store_inbound(inbound(f"e-{i}"), [])
    crashed = await store.claim_relay("dead", T0, 10, 30)
    assert len(crashed) == 4
    assert await store.claim_relay("live", T0 + timedelta(seconds=29), 10, 30) == []
    taken = await store.claim_relay("live", T0 + timedelta(seconds=30), 10, 30)
    assert [r.message_id for r in taken] == [f"e-{i}" for i in range(4)]
    marked = await store.mark_relayed(
        [r.key for r in taken],
        [event(EventKind.DELIVERED, r.message_id, sender=r.sender) for r in taken],
        owner="live",
    )
    assert sorted(marked) == sorted(r.key for r in taken)
    assert await store.pending_relay(10) == []
    assert await store.audit_size() == 4


async def test_relay_mark_by_non_holder_does_not_double_audit(store: Store) -> None:
    for i in range(3):
        await store.store_inbound(inbound(f"n-{i}"), [])
    await store.claim_relay("old", T0, 10, 30)
    rows = await store.claim_relay("new", T0 + timedelta(seconds=31), 10, 30)
    keys = [r.key for r in rows]

    def delivered() -> list[AuditEvent]:
        return [event(EventKind.DELIVERED, r.message_id, sender=r.sender) for r in rows]

    # the relay whose lease ran out published too (at least once) but must not mark or audit
    assert await store.mark_relayed(keys, delivered(), owner="old") == []
    assert await store.audit_size() == 0
    assert len(await store.pending_relay(10)) == 3
    assert sorted(await store.mark_relayed(keys, delivered(), owner="new")) == sorted(keys)
    assert await store.audit_size() == 3
    # a second mark, by the holder or without an owner, is a no-op: no second `delivered`
    assert await store.mark_relayed(keys, delivered(), owner="new") == []
    assert await store.mark_relayed(keys, delivered()) == []
    assert await store.audit_size() == 3
    record = await store.get_inbound("MX-SAT", "n-0")
    assert record is not None
    assert record.relayed


async def test_relay_mark_appends_events_of_marked_rows_only(store: Store) -> None:
    await store.store_inbound(inbound("m-held"), [])
    await store.store_inbound(inbound("m-other"), [])
    await store.claim_relay("a", T0, 1, 30)
    await store.claim_relay("b", T0, 1, 30)
    marked = await store.mark_relayed(
        [("MX-SAT", "m-held"), ("MX-SAT", "m-other")],
        [
            event(EventKind.DELIVERED, "m-held", sender="MX-SAT"),
            event(EventKind.DELIVERED, "m-other", sender="MX-SAT"),
        ],
        owner="a",
    )
    assert marked == [("MX-SAT", "m-held")]
    rows = await store.audit_entries(AuditFilter(event="delivered"))
    assert [json.loads(r.entry)["message_id"] for r in rows] == ["m-held"]


async def test_relay_mark_keeps_events_of_keys_it_was_not_asked_to_mark(store: Store) -> None:
    await store.store_inbound(inbound("k-0"), [])
    other = event(EventKind.REJECTED, "elsewhere", sender="MX-SAT")
    assert await store.mark_relayed([], [other]) == []
    assert await store.audit_size() == 1
    marked = await store.mark_relayed(
        [("MX-SAT", "k-0"), ("MX-SAT", "k-missing")],
        [
            event(EventKind.DELIVERED, "k-0", sender="MX-SAT"),
            event(EventKind.DELIVERED, "k-missing", sender="MX-SAT"),
            other,
        ],
    )
    assert marked == [("MX-SAT", "k-0")]
    rows = await store.audit_entries(AuditFilter(), limit=10)
    assert [(json.loads(r.entry)["event"], json.loads(r.entry)["message_id"]) for r in rows] == [
        ("rejected", "elsewhere"),
        ("delivered", "k-0"),
        ("rejected", "elsewhere"),
    ]


async def test_find_inbound_reply(store: Store) -> None:
    """Only the asked party's reply, of the type asked for, earliest first."""
    assert await store.find_inbound_reply("q-1", sender="MX-SAT") is None
    await store.store_inbound(inbound("other-1", sender="CA-CBSA", in_reply_to="q-1"), [])
    assert await store.find_inbound_reply("q-1", sender="MX-SAT") is None
    status = replace(inbound("status-1", in_reply_to="q-1"), message_type="shipment.status")
    await store.store_inbound(status, [])
    await store.store_inbound(inbound("resp-1", in_reply_to="q-1"), [])
    first = await store.find_inbound_reply("q-1", sender="MX-SAT")
    assert first is not None
    assert first.message_id == "status-1"
    typed = await store.find_inbound_reply(
        "q-1", sender="MX-SAT", message_type="shipment.advance_data"
    )
    assert typed is not None
    assert typed.message_id == "resp-1"
    theirs = await store.find_inbound_reply("q-1", sender="CA-CBSA")
    assert theirs is not None
    assert theirs.message_id == "other-1"


# idempotency keys


def keyed(
    message_id: str, *, key: str = "k-1", request: str = "req-a", actor: str = "api:alice"
) -> OutboundRecord:
    return replace(
        outbound(message_id),
        submitted_by=actor,
        idempotency_key=key,
        request_digest=digest(request.encode()),
    )


async def submitted_ids(store: Store) -> list[str | None]:
    rows = await store.audit_entries(AuditFilter(event=EventKind.SUBMITTED.value), limit=100)
    return [json.loads(r.entry)["message_id"] for r in rows]


async def test_a_repeated_idempotency_key_gets_the_first_row_back(store: Store) -> None:
    first = await store.enqueue_outbound(keyed("o-1"), [event(EventKind.SUBMITTED, "o-1")])
    assert first.message_id == "o-1"
    again = await store.enqueue_outbound(keyed("o-2"), [event(EventKind.SUBMITTED, "o-2")])
    assert again.message_id == "o-1"
    assert again.idempotency_key == "k-1"
    assert await store.get_outbound("o-2") is None
    assert await submitted_ids(store) == ["o-1"]
    found = await store.find_outbound_by_key("api:alice", "k-1")
    assert found is not None
    assert found.message_id == "o-1"
    assert found.request_digest == digest(b"req-a")
    assert await store.find_outbound_by_key("api:bob", "k-1") is None
    assert await store.find_outbound_by_key("api:alice", "k-2") is None


async def test_an_idempotency_key_reused_for_another_request_writes_nothing(store: Store) -> None:
    await store.enqueue_outbound(keyed("o-1"), [event(EventKind.SUBMITTED, "o-1")])
    results = await asyncio.gather(
        store.enqueue_outbound(keyed("o-2", request="req-b"), [event(EventKind.SUBMITTED, "o-2")]),
        store.enqueue_outbound(outbound("o-3"), [event(EventKind.SUBMITTED, "o-3")]),
        return_exceptions=True,
    )
    refused = results[0]
    assert isinstance(refused, IdempotencyKeyReused)
    assert "'k-1' of api:alice was used for message o-1" in refused.reason
    assert refused.http_status == 422
    assert isinstance(results[1], OutboundRecord)
    assert await store.get_outbound("o-2") is None
    assert sorted(await submitted_ids(store)) == ["o-1", "o-3"]


async def test_idempotency_keys_are_per_submitter(store: Store) -> None:
    await store.enqueue_outbound(keyed("o-1", actor="api:alice"), [])
    other = await store.enqueue_outbound(keyed("o-2", actor="amqp:bob", request="req-b"), [])
    assert other.message_id == "o-2"
    unkeyed = [replace(outbound(f"u-{i}"), idempotency_key=None) for i in range(2)]
    for record in unkeyed:
        await store.enqueue_outbound(record, [])
    assert sum((await store.outbox_depth()).values()) == 4


async def test_twin_submissions_from_two_store_instances_store_one_row(
    store: Store, store_url: str, store_clock: ManualClock
) -> None:
    # Two replicas (two connections, two writers) race with the same key: one row, one event.
    other = open_store(store_url, clock=store_clock)
    await other.open()
    try:
        results = await asyncio.gather(
            *(
                instance.enqueue_outbound(keyed(f"o-{i}"), [event(EventKind.SUBMITTED, f"o-{i}")])
                for i, instance in enumerate([store, other] * 4)
            )
        )
    finally:
        await other.close()
    winners = {record.message_id for record in results}
    assert len(winners) == 1
    assert sum((await store.outbox_depth()).values()) == 1
    assert await submitted_ids(store) == sorted(winners)


# shared rate limits


async def test_rate_tokens_are_granted_up_to_the_burst_then_refill(
    store: Store, store_url: str
) -> None:
    first = await store.take_rate_tokens("MX-SAT", 3, per_second=0.001, burst=5)
    if store_url.startswith("sqlite"):
        assert first is None  # one process: its own buckets are exact
        return
    assert first == 3
    assert await store.take_rate_tokens("MX-SAT", 3, per_second=0.001, burst=5) == 2
    assert await store.take_rate_tokens("MX-SAT", 1, per_second=0.001, burst=5) == 0
    # another partner has its own bucket
    assert await store.take_rate_tokens("CA-CBSA", 5, per_second=0.001, burst=5) == 5
    # refilled at its rate (the database's clock)
    assert await store.take_rate_tokens("GB-HMRC", 10, per_second=50.0, burst=10) == 10
    await asyncio.sleep(0.2)
    refill = await store.take_rate_tokens("GB-HMRC", 10, per_second=50.0, burst=10)
    assert refill is not None
    assert 9 <= refill <= 10


# audit log


async def test_failed_unit_appends_no_audit_entry(store: Store) -> None:
    await store.enqueue_outbound(outbound("o-1"), [event(EventKind.SUBMITTED, "o-1")])
    results = await asyncio.gather(
        store.enqueue_outbound(outbound("o-1"), [event(EventKind.SUBMITTED, "dup")]),
        store.store_inbound(inbound("ok-1"), [event(EventKind.ACCEPTED, "ok-1")]),
        store.store_inbound(inbound("ok-2"), [event(EventKind.ACCEPTED, "ok-2")]),
        return_exceptions=True,
    )
    assert isinstance(results[0], DuplicateConflict)
    assert "o-1" in results[0].reason
    rows = await store.audit_entries(AuditFilter())
    assert [r.seq for r in rows] == [0, 1, 2]
    assert all(b'"dup"' not in r.entry for r in rows)


async def test_concurrent_appends_have_gap_free_seqs(store: Store) -> None:
    batches = [[event(EventKind.QUERY, f"a-{i}-{j}") for j in range(1 + i % 3)] for i in range(40)]
    results = await asyncio.gather(*(store.append_audit(b) for b in batches))
    seqs = sorted(s for r in results for s in r)
    total = sum(len(b) for b in batches)
    assert seqs == list(range(total))
    for got, batch in zip(results, batches, strict=True):
        assert got == list(range(got[0], got[0] + len(batch)))
    assert await store.audit_size() == total
    assert await all_seqs(store) == list(range(total))


async def test_node_hashes_match_naive_root_for_sizes_1_to_70(store: Store) -> None:
    sizes = [1, 2, 3, 7, 8, 13, 30, 31, 32, 33, 50, 64, 65, 70]
    appended = 0
    for step, target in enumerate(sizes):
        count = target - appended
        await store.append_audit(
            [event(EventKind.QUERY, f"n-{appended + i}", outcome=str(step)) for i in range(count)]
        )
        appended = target
    leaves = await store.audit_leaf_hashes(0, 70)
    rows = await store.audit_entries(AuditFilter(), limit=70)
    assert leaves == [hashlib.sha256(b"\x00" + r.entry).digest() for r in rows]
    for size in range(1, 71):
        keys = frontier(size)
        nodes = await store.audit_node_hashes(keys)
        assert set(nodes) == set(keys)
        assert root_from_nodes(size, nodes) == naive_root(leaves[:size]), size
    # an incomplete subtree is never stored
    assert await store.audit_node_hashes([(3, 8), (1, 35)]) == {}


async def test_audit_filters(store: Store) -> None:
    await store.append_audit(
        [
            AuditEvent(event=EventKind.ACCEPTED, at=T0, message_id="x", sender="MX-SAT"),
            AuditEvent(
                event=EventKind.REJECTED,
                at=T0 + timedelta(hours=1),
                message_id="y",
                sender="CA-CBSA",
                outcome="SCHEMA_INVALID",
                message_type="t.a",
            ),
            AuditEvent(
                event=EventKind.SENT,
                at=T0 + timedelta(hours=2),
                message_id="z",
                recipient="MX-SAT",
                correlation_id="c-1",
            ),
        ]
    )

    async def seqs(f: AuditFilter, after: int = -1) -> list[int]:
        return [r.seq for r in await store.audit_entries(f, after_seq=after)]

    assert await seqs(AuditFilter(partner="MX-SAT")) == [0, 2]
    assert await seqs(AuditFilter(message_id="y")) == [1]
    assert await seqs(AuditFilter(outcome="SCHEMA_INVALID", message_type="t.a")) == [1]
    assert await seqs(AuditFilter(event="sent", correlation_id="c-1")) == [2]
    assert await seqs(AuditFilter(since=T0 + timedelta(minutes=30))) == [1, 2]
    assert await seqs(AuditFilter(until=T0 + timedelta(minutes=30))) == [0]
    assert await seqs(AuditFilter(), after=0) == [1, 2]
    entry = await store.audit_entry(1)
    assert entry is not None
    assert b'"SCHEMA_INVALID"' in entry.entry
    assert await store.audit_entry(3) is None


async def test_checkpoints_cosignatures_witness_state(store: Store) -> None:
    assert await store.latest_checkpoint() is None
    root = b"\x01" * 32
    await store.save_checkpoint(3, root, "note-3", T0, [event(EventKind.QUERY)])
    await store.save_checkpoint(5, b"\x02" * 32, "note-5", T0 + timedelta(1))
    latest = await store.latest_checkpoint()
    assert latest is not None
    assert (latest.size, latest.note) == (5, "note-5")
    at3 = await store.checkpoint_for_size(3)
    assert at3 is not None
    assert at3.root_hash == root
    assert at3.created_at == T0
    assert await store.audit_size() == 1
    await store.save_cosignature("MX-SAT", 3, root, "cosig", T0)
    await store.save_cosignature("CA-CBSA", 5, b"\x02" * 32, "cosig5", T0)
    assert [c.partner for c in await store.cosignatures()] == ["MX-SAT", "CA-CBSA"]
    assert [c.note for c in await store.cosignatures(size=5)] == ["cosig5"]
    await store.save_cosignature("MX-SAT", 7, b"\x03" * 32, "cosig7", T0)
    latest = [(c.partner, c.size, c.note) for c in await store.latest_cosignatures(6)]
    assert latest == [("CA-CBSA", 5, "cosig5"), ("MX-SAT", 3, "cosig")]
    assert [(c.partner, c.size) for c in await store.latest_cosignatures(7)] == [
        ("CA-CBSA", 5),
        ("MX-SAT", 7),
    ]
    assert await store.latest_cosignatures(2) == []
    assert await store.get_witnessed("mx.example/log") is None
    await store.set_witnessed("mx.example/log", 10, b"\x03" * 32, "their note")
    await store.set_witnessed("mx.example/log", 12, b"\x04" * 32, "newer note")
    assert await store.get_witnessed("mx.example/log") == (12, b"\x04" * 32, "newer note")


# outbox


async def test_outbox_claim_leaves_out_recipients_and_gives_back_leases(store: Store) -> None:
    await store.enqueue_outbound(outbound("mx-0"), [])
    await store.enqueue_outbound(outbound("ca-0", recipient="CA-CBSA"), [])
    await store.enqueue_outbound(outbound("mx-1", at=T0 + timedelta(seconds=1)), [])
    now = T0 + timedelta(seconds=2)
    claimed = await store.claim_outbound("w1", now, 10, 30, exclude={"MX-SAT"})
    assert [r.message_id for r in claimed] == ["ca-0"]
    claimed = await store.claim_outbound("w1", now, 10, 30)
    assert [r.message_id for r in claimed] == ["mx-0", "mx-1"]
    # given back: due again at once, for any worker; another worker's lease is not touched
    await store.release_outbound("w2", ["mx-0"])
    assert await store.claim_outbound("w2", now, 10, 30) == []
    await store.release_outbound("w1", ["mx-1"])
    again = await store.claim_outbound("w2", now, 10, 30)
    assert [r.message_id for r in again] == ["mx-1"]
    row = await store.get_outbound("mx-1")
    assert row is not None
    assert (row.state, row.attempts, row.next_attempt_at) == (
        OutboundState.QUEUED,
        0,
        T0 + timedelta(seconds=1),
    )


async def test_outbox_claim_urgent_first_and_lease(store: Store) -> None:
    await store.enqueue_outbound(outbound("routine"), [event(EventKind.SUBMITTED, "routine")])
    await store.enqueue_outbound(
        outbound("urgent", priority=Priority.URGENT, at=T0 + timedelta(seconds=1)), []
    )
    await store.enqueue_outbound(outbound("later", at=T0 + timedelta(hours=1)), [])
    claimed = await store.claim_outbound("w1", T0 + timedelta(seconds=2), 10, 30)
    assert [r.message_id for r in claimed] == ["urgent", "routine"]
    # leased: another worker gets nothing until the lease ends
    assert await store.claim_outbound("w2", T0 + timedelta(seconds=3), 10, 30) == []
    taken = await store.claim_outbound("w2", T0 + timedelta(seconds=40), 10, 30)
    assert [r.message_id for r in taken] == ["urgent", "routine"]
    update = AttemptUpdate(state=OutboundState.SENT, attempts=1, next_attempt_at=T0)
    with pytest.raises(LeaseLost):
        await store.finish_attempt("urgent", "w1", update, [event(EventKind.SENT, "urgent")])
    assert await store.audit_size() == 1


async def test_outbox_finish_and_retry(store: Store, store_clock: ManualClock) -> None:
    await store.enqueue_outbound(outbound("o-1"), [])
    (_claimed,) = await store.claim_outbound("w1", T0, 10, 30)
    failed = await store.finish_attempt(
        "o-1",
        "w1",
        AttemptUpdate(
            state=OutboundState.SENT,
            attempts=1,
            next_attempt_at=T0 + timedelta(seconds=4),
            last_error="HTTP 503",
        ),
        [event(EventKind.ATTEMPT_FAILED, "o-1")],
    )
    assert (failed.state, failed.attempts, failed.last_error) == (OutboundState.SENT, 1, "HTTP 503")
    assert await store.claim_outbound("w1", T0 + timedelta(seconds=3), 10, 30) == []
    assert len(await store.claim_outbound("w1", T0 + timedelta(seconds=4), 10, 30)) == 1
    dead = await store.finish_attempt(
        "o-1",
        "w1",
        AttemptUpdate(state=OutboundState.DEAD, attempts=2, next_attempt_at=T0, last_error="x"),
        [event(EventKind.DEAD, "o-1")],
    )
    assert dead.state is OutboundState.DEAD
    assert await store.claim_outbound("w1", T0 + timedelta(days=1), 10, 30) == []
    depth = await store.outbox_depth()
    assert depth[OutboundState.DEAD] == 1
    assert depth[OutboundState.QUEUED] == 0
    later = T0 + timedelta(hours=2)
    retried = await store.retry_outbound(
        "o-1", now=later, actor="cli:ops", events=[event(EventKind.OPERATOR_ACTION, "o-1")]
    )
    assert (retried.state, retried.attempts, retried.next_attempt_at) == (
        OutboundState.QUEUED,
        0,
        later,
    )
    with pytest.raises(InvalidTransition):
        await store.retry_outbound("o-1", now=later, actor="cli:ops", events=[])
    with pytest.raises(MessageNotFound):
        await store.retry_outbound("nope", now=later, actor="cli:ops", events=[])
    (_again,) = await store.claim_outbound("w2", later, 10, 30)
    acked = await store.finish_attempt(
        "o-1",
        "w2",
        AttemptUpdate(
            state=OutboundState.ACKNOWLEDGED,
            attempts=1,
            next_attempt_at=later,
            receipt_body=b"receipt",
            receipt_signature="sig",
        ),
        [event(EventKind.ACKNOWLEDGED, "o-1")],
    )
    assert (acked.receipt_body, acked.receipt_signature) == (b"receipt", "sig")
    stored = await store.get_outbound("o-1")
    assert stored == acked
    assert stored.updated_at == store_clock.now()
    assert await store.audit_size() == 4


async def test_an_attempt_can_replace_the_signed_bytes(store: Store) -> None:
    """A message signed again (its partner refused the old bytes as STALE) is sent as the new
    bytes from then on; an attempt without new bytes keeps what is stored."""
    original = outbound("o-1")
    await store.enqueue_outbound(original, [])
    (_claimed,) = await store.claim_outbound("w1", T0, 10, 30)
    body = b'{"out": "o-1", "again": true}'
    resigned = Resigned(body=body, body_digest=digest(body), signature="e30..bmV3", kid="kid-2")
    queued = await store.finish_attempt(
        "o-1",
        "w1",
        AttemptUpdate(
            state=OutboundState.QUEUED, attempts=1, next_attempt_at=T0, resigned=resigned
        ),
        [event(EventKind.RESIGNED, "o-1")],
    )
    assert (queued.body, queued.body_digest, queued.signature, queued.kid) == (
        body,
        digest(body),
        "e30..bmV3",
        "kid-2",
    )
    (claimed,) = await store.claim_outbound("w1", T0, 10, 30)
    assert (claimed.body, claimed.signature) == (body, "e30..bmV3")
    kept = await store.finish_attempt(
        "o-1",
        "w1",
        AttemptUpdate(state=OutboundState.SENT, attempts=2, next_attempt_at=T0),
        [],
    )
    assert (kept.body, kept.body_digest, kept.kid) == (body, digest(body), "kid-2")
    assert await store.get_outbound("o-1") == kept


async def test_record_receipt_without_a_lease_only_while_active(store: Store) -> None:
    await store.enqueue_outbound(outbound("o-1"), [])
    (_claimed,) = await store.claim_outbound("w1", T0, 10, 30)
    acked = AttemptUpdate(
        state=OutboundState.ACKNOWLEDGED,
        attempts=1,
        next_attempt_at=T0,
        receipt_body=b"late receipt",
        receipt_signature="sig",
    )
    done = await store.record_receipt("o-1", acked, [event(EventKind.ACKNOWLEDGED, "o-1")])
    assert (done.state, done.receipt_body) == (OutboundState.ACKNOWLEDGED, b"late receipt")
    # the worker still sending it lost its lease: its result yields to the receipt
    with pytest.raises(LeaseLost):
        await store.finish_attempt(
            "o-1",
            "w1",
            AttemptUpdate(state=OutboundState.SENT, attempts=1, next_attempt_at=T0),
            [event(EventKind.ATTEMPT_FAILED, "o-1")],
        )
    with pytest.raises(InvalidTransition, match="acknowledged; cannot record a receipt"):
        await store.record_receipt("o-1", acked, [event(EventKind.ACKNOWLEDGED, "again")])
    with pytest.raises(MessageNotFound):
        await store.record_receipt("nope", acked, [])
    assert await store.get_outbound("o-1") == done
    assert await store.audit_size() == 1


async def outbound_in(store: Store, message_id: str, state: OutboundState) -> OutboundRecord:
    """A row brought to ``state`` as the gateway brings it: queued by its submission, then
    one attempt's result (``closed``: a dead row closed). Rows left queued are claimed by the
    next call: make them last."""
    record = await store.enqueue_outbound(outbound(message_id), [])
    if state is OutboundState.QUEUED:
        return record
    claimed = await store.claim_outbound("w1", T0, 10, 30)
    assert [r.message_id for r in claimed] == [message_id]
    ended = OutboundState.DEAD if state is OutboundState.CLOSED else state
    update = AttemptUpdate(
        state=ended, attempts=1, next_attempt_at=T0 + timedelta(hours=1), last_error="HTTP 400"
    )
    record = await store.finish_attempt(message_id, "w1", update, [])
    if state is OutboundState.CLOSED:
        record = await store.close_outbound(message_id, now=T0, events=[])
    return record


def closing(message_id: str, why: str = "body purged by retention") -> AuditEvent:
    return event(
        EventKind.OPERATOR_ACTION,
        message_id,
        outcome="close",
        actor="cli:ops",
        reason=f"operator closed a dead message: {why}",
    )


async def test_close_ends_a_dead_message_with_its_audit_entry(store: Store) -> None:
    dead = await outbound_in(store, "o-1", OutboundState.DEAD)
    later = T0 + timedelta(hours=2)
    closed = await store.close_outbound("o-1", now=later, events=[closing("o-1")])
    # only its state and time change: why it died and what it was stay readable
    assert closed == replace(dead, state=OutboundState.CLOSED, updated_at=later)
    assert await store.get_outbound("o-1") == closed
    assert await store.claim_outbound("w1", T0 + timedelta(days=1), 10, 30) == []
    (row,) = await store.audit_entries(AuditFilter(message_id="o-1"))
    assert json.loads(row.entry) == {
        "event": "operator_action",
        "at": "2026-11-24T12:00:00.000Z",
        "message_id": "o-1",
        "outcome": "close",
        "actor": "cli:ops",
        "reason": "operator closed a dead message: body purged by retention",
    }


@pytest.mark.parametrize(
    "state",
    [
        OutboundState.SENT,
        OutboundState.ACKNOWLEDGED,
        OutboundState.REJECTED,
        OutboundState.CLOSED,
        OutboundState.QUEUED,
    ],
)
async def test_only_a_dead_message_is_closed(store: Store, state: OutboundState) -> None:
    """A rejected message is final already and alerts nothing; the others are at work, or
    closed: refused, with nothing written (no entry, the row as it was)."""
    before = await outbound_in(store, "o-1", state)
    size = await store.audit_size()
    with pytest.raises(InvalidTransition, match=f"'o-1' is {state.value}; cannot close"):
        await store.close_outbound("o-1", now=T0 + timedelta(hours=2), events=[closing("o-1")])
    assert await store.get_outbound("o-1") == before
    assert await store.audit_size() == size
    with pytest.raises(MessageNotFound):
        await store.close_outbound("nope", now=T0, events=[closing("nope")])
    assert await store.audit_size() == size


async def test_two_closes_of_one_message_close_it_once(
    store: Store, store_url: str, store_clock: ManualClock
) -> None:
    """Two operators (two replicas) close the same dead message at once: one close and one
    entry; the other is told it is closed."""
    await outbound_in(store, "o-1", OutboundState.DEAD)
    other = open_store(store_url, clock=store_clock)
    await other.open()
    try:
        results = await asyncio.gather(
            store.close_outbound("o-1", now=T0, events=[closing("o-1", "first")]),
            other.close_outbound("o-1", now=T0, events=[closing("o-1", "second")]),
            return_exceptions=True,
        )
    finally:
        await other.close()
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1
    assert isinstance(refused[0], InvalidTransition)
    assert refused[0].state == "closed"
    assert len(await store.audit_entries(AuditFilter(message_id="o-1"))) == 1


async def test_closed_is_counted_apart_from_dead(store: Store) -> None:
    await outbound_in(store, "dead-1", OutboundState.DEAD)
    await outbound_in(store, "dead-2", OutboundState.DEAD)
    await outbound_in(store, "closed", OutboundState.CLOSED)
    depth = await store.outbox_depth()
    assert (depth[OutboundState.DEAD], depth[OutboundState.CLOSED]) == (2, 1)
    await store.close_outbound("dead-1", now=T0, events=[closing("dead-1")])
    depth = await store.outbox_depth()
    assert (depth[OutboundState.DEAD], depth[OutboundState.CLOSED]) == (1, 2)
    listed = await store.list_messages(MessageFilter(state="closed"))
    assert sorted(m.message_id for m in listed.items) == ["closed", "dead-1"]
    assert {m.state for m in listed.items} == {"closed"}


async def test_a_retry_reopens_a_closed_message(store: Store) -> None:
    """A close made by mistake is undone by a retry: queued again, attempts reset."""
    await outbound_in(store, "o-1", OutboundState.CLOSED)
    later = T0 + timedelta(hours=2)
    retried = await store.retry_outbound(
        "o-1", now=later, actor="cli:ops", events=[event(EventKind.OPERATOR_ACTION, "o-1")]
    )
    assert (retried.state, retried.attempts, retried.next_attempt_at) == (
        OutboundState.QUEUED,
        0,
        later,
    )
    (claimed,) = await store.claim_outbound("w1", later, 10, 30)
    assert claimed.message_id == "o-1"
    assert (await store.outbox_depth())[OutboundState.CLOSED] == 0


async def test_a_late_receipt_settles_a_closed_message_only_with_dead_too(store: Store) -> None:
    """The partner's receipt outweighs an operator's close, as it does a dead message's end;
    without ``dead_too`` (an answer for later, not final) the message stays closed."""
    closed = await outbound_in(store, "o-1", OutboundState.CLOSED)
    acked = AttemptUpdate(
        state=OutboundState.ACKNOWLEDGED,
        attempts=1,
        next_attempt_at=T0,
        receipt_body=b"late receipt",
        receipt_signature="sig",
    )
    with pytest.raises(InvalidTransition, match="closed; cannot record a receipt"):
        await store.record_receipt("o-1", acked, [event(EventKind.ACKNOWLEDGED, "o-1")])
    assert await store.get_outbound("o-1") == closed
    assert await store.audit_size() == 0
    done = await store.record_receipt(
        "o-1", acked, [event(EventKind.ACKNOWLEDGED, "o-1")], dead_too=True
    )
    assert (done.state, done.receipt_body) == (OutboundState.ACKNOWLEDGED, b"late receipt")
    assert await store.audit_size() == 1


async def test_purge_takes_the_body_of_a_closed_message(store: Store) -> None:
    """Closed is finished: retention takes its body as it takes a dead one's."""
    await outbound_in(store, "closed", OutboundState.CLOSED)
    await outbound_in(store, "sent", OutboundState.SENT)
    assert await store.purge_bodies(T0 + timedelta(days=30)) == 1
    closed, sent = await store.get_outbound("closed"), await store.get_outbound("sent")
    assert closed is not None
    assert sent is not None
    assert (closed.body, closed.body_digest) == (None, digest(b'{"out": "closed"}'))
    assert sent.body is not None


async def test_outbox_backlog_counts_what_is_at_work_per_recipient(store: Store) -> None:
    """What /metrics shows as c2c_outbound_pending and its oldest age: queued and sent rows
    only, per recipient, with the creation time of the oldest."""
    assert await store.outbox_backlog() == {}
    rows = [
        outbound("mx-1", at=T0 + timedelta(minutes=5)),
        outbound("mx-2", at=T0 + timedelta(minutes=1)),
        outbound("mx-3", at=T0),  # acknowledged below: not at work
        outbound("ca-1", at=T0 + timedelta(minutes=9), recipient="CA-CBSA"),
        outbound("gb-1", at=T0 - timedelta(hours=1), recipient="GB-HMRC"),  # dead below
    ]
    for record in rows:
        await store.enqueue_outbound(record, [event(EventKind.SUBMITTED, record.message_id)])
    claimed = {r.message_id for r in await store.claim_outbound("w1", T0, 10, 30)}
    assert claimed == {"mx-3", "gb-1"}  # the others are not due yet
    await store.finish_attempt(
        "mx-3",
        "w1",
        AttemptUpdate(state=OutboundState.ACKNOWLEDGED, attempts=1, next_attempt_at=T0),
        [event(EventKind.ACKNOWLEDGED, "mx-3")],
    )
    await store.finish_attempt(
        "gb-1",
        "w1",
        AttemptUpdate(state=OutboundState.DEAD, attempts=1, next_attempt_at=T0, last_error="x"),
        [event(EventKind.DEAD, "gb-1")],
    )
    (sent,) = await store.claim_outbound("w1", T0 + timedelta(minutes=1), 10, 30)
    await store.finish_attempt(
        sent.message_id,
        "w1",
        AttemptUpdate(
            state=OutboundState.SENT, attempts=1, next_attempt_at=T0 + timedelta(hours=1)
        ),
        [event(EventKind.ATTEMPT_FAILED, sent.message_id)],
    )
    backlog = await store.outbox_backlog()
    assert {p: (b.pending, b.oldest_created_at) for p, b in backlog.items()} == {
        "MX-SAT": (2, T0 + timedelta(minutes=1)),
        "CA-CBSA": (1, T0 + timedelta(minutes=9)),
    }


async def test_outbox_duplicate_message_id_is_refused(store: Store) -> None:
    await store.enqueue_outbound(outbound("o-1"), [])
    with pytest.raises(DuplicateConflict, match="o-1"):
        await store.enqueue_outbound(outbound("o-1"), [event(EventKind.SUBMITTED, "o-1")])
    assert await store.audit_size() == 0


async def test_expired_rows_are_claimed_so_the_dispatcher_can_end_them(store: Store) -> None:
    await store.enqueue_outbound(outbound("exp", expires_at=T0 + timedelta(minutes=5)), [])
    (record,) = await store.claim_outbound("w1", T0 + timedelta(minutes=10), 10, 30)
    assert record.expires_at is not None
    assert record.expires_at < T0 + timedelta(minutes=10)
    dead = await store.finish_attempt(
        "exp",
        "w1",
        AttemptUpdate(
            state=OutboundState.DEAD, attempts=0, next_attempt_at=T0, last_error="expired"
        ),
        [],
    )
    assert dead.state is OutboundState.DEAD


async def test_two_concurrent_claimers_never_share_a_row(
    store: Store, store_url: str, store_clock: ManualClock
) -> None:
    for i in range(120):
        await store.enqueue_outbound(outbound(f"c-{i:03d}"), [])
    other = open_store(store_url, clock=store_clock)
    await other.open()
    try:
        claims: dict[str, list[str]] = {"a": [], "b": []}

        async def drain(name: str, s: Store) -> None:
            while True:
                got = await s.claim_outbound(name, T0, 7, 60)
                if not got:
                    return
                claims[name].extend(r.message_id for r in got)

        await asyncio.gather(drain("a", store), drain("b", other))
    finally:
        await other.close()
    everything = claims["a"] + claims["b"]
    assert len(everything) == len(set(everything)) == 120


# listing and retention


async def test_list_messages_filters_and_pages(store: Store) -> None:
    for i in range(5):
        await store.store_inbound(inbound(f"in-{i}", at=T0 + timedelta(minutes=i)), [])
    for i in range(4):
        await store.enqueue_outbound(
            outbound(f"out-{i}", at=T0 + timedelta(minutes=i, seconds=30), recipient="CA-CBSA"), []
        )
    seen: list[str] = []
    after = None
    while True:
        page = await store.list_messages(MessageFilter(), limit=4, after=after)
        seen.extend(m.message_id for m in page.items)
        if page.next_cursor is None:
            break
        after = page.next_cursor
    expected = [f"in-{i}" for i in range(5)] + [f"out-{i}" for i in range(4)]
    expected.sort(key=lambda m: (int(m[-1]), m.startswith("out")), reverse=True)
    assert seen == expected
    only_out = await store.list_messages(MessageFilter(direction=Direction.OUTBOUND))
    assert {m.partner for m in only_out.items} == {"CA-CBSA"}
    queued = await store.list_messages(MessageFilter(state="queued", partner="CA-CBSA"))
    assert len(queued.items) == 4
    received = await store.list_messages(
        MessageFilter(state="received", since=T0 + timedelta(minutes=3))
    )
    assert [m.message_id for m in received.items] == ["in-4", "in-3"]
    assert (await store.list_messages(MessageFilter(state="bogus"))).items == []


async def test_purge_bodies_keeps_digests_and_metadata(store: Store) -> None:
    await store.store_inbound(inbound("old"), [event(EventKind.ACCEPTED, "old")])
    await store.store_inbound(inbound("unrelayed"), [])
    await store.store_inbound(inbound("new", at=T0 + timedelta(days=40)), [])
    await store.mark_relayed([("MX-SAT", "old"), ("MX-SAT", "new")])
    await store.enqueue_outbound(outbound("done"), [])
    await store.enqueue_outbound(outbound("active", at=T0 + timedelta(seconds=1)), [])
    assert len(await store.claim_outbound("w", T0, 10, 30)) == 1
    await store.finish_attempt(
        "done",
        "w",
        AttemptUpdate(state=OutboundState.ACKNOWLEDGED, attempts=1, next_attempt_at=T0),
        [],
    )
    purged = await store.purge_bodies(T0 + timedelta(days=30))
    assert purged == 2
    old = await store.get_inbound("MX-SAT", "old")
    assert old is not None
    assert old.body is None
    assert old.body_digest == digest(b'{"payload": 1}')
    assert old.receipt_body == b'{"receipt": "old"}'
    for key in (("MX-SAT", "unrelayed"), ("MX-SAT", "new")):
        kept = await store.get_inbound(*key)
        assert kept is not None
        assert kept.body is not None
    done = await store.get_outbound("done")
    active = await store.get_outbound("active")
    assert done is not None
    assert done.body is None
    assert active is not None
    assert active.body is not None
    assert await store.audit_size() == 1
    assert await store.purge_bodies(T0 + timedelta(days=30)) == 0


async def test_reopen_applies_no_migration_twice(store: Store, store_url: str) -> None:
    await store.store_inbound(inbound("keep"), [event(EventKind.ACCEPTED, "keep")])
    clock = ManualClock(T0)
    first, second = open_store(store_url, clock=clock), open_store(store_url, clock=clock)
    await asyncio.gather(first.open(), second.open())
    try:
        assert await first.get_inbound("MX-SAT", "keep") is not None
        assert await second.audit_size() == 1
    finally:
        await first.close()
        await second.close()


async def test_a_clock_step_back_moves_back_what_the_clock_before_it_scheduled(
    store: Store, store_clock: ManualClock
) -> None:
    """T71: rows written while the clock was an hour ahead, then the clock is set right."""
    step, second = timedelta(hours=1), timedelta(seconds=1)
    store_clock.step(step)
    ahead = store_clock.now()
    # a retry due 4 s later by the clock ahead
    await store.enqueue_outbound(outbound("retry", at=ahead), [])
    await store.claim_outbound("w1", ahead, 10, 30)
    update = AttemptUpdate(state=OutboundState.SENT, attempts=1, next_attempt_at=ahead + 4 * second)
    await store.finish_attempt("retry", "w1", update, [])
    # a worker that died holding a row, and a relay that died holding one
    await store.enqueue_outbound(outbound("held", at=ahead), [])
    assert [r.message_id for r in await store.claim_outbound("w-dead", ahead, 10, 30)] == ["held"]
    await store.store_inbound(
        inbound("in-1"), [], relay_lease=RelayLease(owner="relay-dead", until=ahead + 10 * second)
    )
    store_clock.step(-step)
    now = store_clock.now()
    # written after the step: a new message and a relay lease
    await store.enqueue_outbound(outbound("fresh", at=now), [])
    await store.store_inbound(
        inbound("in-2"), [], relay_lease=RelayLease(owner="relay-b", until=now + 10 * second)
    )
    assert [r.message_id for r in await store.claim_outbound("w2", now, 10, 60)] == ["fresh"]

    assert await store.move_back_schedules(now, step) == (2, 2)

    # each as due as it was before the step, by the clock set right; "fresh" untouched
    assert [r.message_id for r in await store.claim_outbound("w3", now + 4 * second, 10, 30)] == [
        "retry"
    ]
    assert [r.message_id for r in await store.claim_outbound("w4", now + 31 * second, 10, 30)] == [
        "held"
    ]
    relay = await store.claim_relay("relay-c", now + 11 * second, 10, 30)
    assert [r.message_id for r in relay] == ["in-1", "in-2"]


async def test_a_relay_claim_stops_at_its_byte_budget(store: Store) -> None:
    """A backlog of large messages is read a bounded amount at a time; a body larger than the
    budget still comes, alone."""
    sizes = [1000, 1000, 1000, 5000, 1000]
    for n, size in enumerate(sizes):
        await store.store_inbound(inbound(f"b-{n}", body=b"x" * size), [])
    first = await store.claim_relay("r", T0, 10, 30, max_bytes=2500)
    assert [r.message_id for r in first] == ["b-0", "b-1"]
    # the rows past the budget were not leased: another relay takes them
    second = await store.claim_relay("s", T0, 10, 30, max_bytes=2500)
    assert [r.message_id for r in second] == ["b-2"]
    alone = await store.claim_relay("t", T0, 10, 30, max_bytes=2500)
    assert [(r.message_id, len(r.body or b"")) for r in alone] == [("b-3", 5000)]
    assert [r.message_id for r in await store.claim_relay("u", T0, 10, 30)] == ["b-4"]


# outcomes of outbound messages (c2c.outcomes): written with each final state


async def test_each_final_state_writes_its_outcome_in_its_transaction(
    store: Store, store_clock: ManualClock
) -> None:
    """acknowledged, rejected, dead (by an attempt) and closed (by an operator) each leave one
    outcome to publish, its body the message as it stood then; states still at work none."""
    receipt = b'{"header": {}, "payload": {"status": "NACK", "code": "SCHEMA_INVALID"}}'
    await store.enqueue_outbound(replace(outbound("o-ack"), correlation_id="c-1"), [])
    for message_id in ("o-rej", "o-dead", "o-sent"):
        await store.enqueue_outbound(outbound(message_id), [])
    await store.claim_outbound("w1", T0, 10, 30)
    updates = {
        "o-ack": AttemptUpdate(
            state=OutboundState.ACKNOWLEDGED,
            attempts=1,
            next_attempt_at=T0,
            receipt_body=b'{"header": {}, "payload": {"status": "ACK"}}',
            receipt_signature="sig",
        ),
        "o-rej": AttemptUpdate(
            state=OutboundState.REJECTED,
            attempts=2,
            next_attempt_at=T0,
            last_error="NACK SCHEMA_INVALID",
            receipt_body=receipt,
            receipt_signature="sig",
        ),
        "o-dead": AttemptUpdate(
            state=OutboundState.DEAD, attempts=3, next_attempt_at=T0, last_error="gave up"
        ),
        "o-sent": AttemptUpdate(state=OutboundState.SENT, attempts=1, next_attempt_at=T0),
    }
    for message_id, update in updates.items():
        await store.finish_attempt(message_id, "w1", update, [])
    await store.close_outbound("o-dead", now=T0 + timedelta(hours=1), events=[])
    claimed = await store.claim_outcomes("r1", T0, 10, 30)
    assert [(o.message_id, o.state, o.n, o.outcome_id) for o in claimed] == [
        ("o-ack", OutboundState.ACKNOWLEDGED, 1, "o-ack/acknowledged/1"),
        ("o-rej", OutboundState.REJECTED, 1, "o-rej/rejected/1"),
        ("o-dead", OutboundState.DEAD, 1, "o-dead/dead/1"),
        ("o-dead", OutboundState.CLOSED, 2, "o-dead/closed/2"),
    ]
    assert all(o.recipient == "MX-SAT" for o in claimed)
    assert all(o.message_type == "shipment.advance_data" for o in claimed)
    bodies = [json.loads(o.body) for o in claimed]
    assert bodies[0] == {
        "outcome_id": "o-ack/acknowledged/1",
        "message_id": "o-ack",
        "recipient": "MX-SAT",
        "message_type": "shipment.advance_data",
        "state": "acknowledged",
        "attempts": 1,
        "last_error": None,
        "correlation_id": "c-1",
        "in_reply_to": None,
        "submitted_by": "svc-test",
        "idempotency_key": None,
        "created_at": "2026-11-24T12:00:00.000Z",
        "updated_at": "2026-11-24T12:00:00.000Z",
        "receipt": {"status": "ACK", "code": None},
    }
    assert bodies[1]["receipt"] == {"status": "NACK", "code": "SCHEMA_INVALID"}
    assert (bodies[1]["attempts"], bodies[1]["last_error"]) == (2, "NACK SCHEMA_INVALID")
    assert (bodies[2]["state"], bodies[2]["receipt"], bodies[2]["last_error"]) == (
        "dead",
        None,
        "gave up",
    )
    assert (bodies[3]["state"], bodies[3]["updated_at"]) == ("closed", "2026-11-24T13:00:00.000Z")


async def test_a_refused_final_write_leaves_no_outcome(store: Store) -> None:
    """The outcome is part of the final state's transaction: a write refused (a lost lease)
    leaves none."""
    await store.enqueue_outbound(outbound("o-1"), [])
    await store.claim_outbound("w1", T0, 10, 30)
    dead = AttemptUpdate(state=OutboundState.DEAD, attempts=1, next_attempt_at=T0)
    with pytest.raises(LeaseLost):
        await store.finish_attempt("o-1", "w2", dead, [])
    assert await store.claim_outcomes("r1", T0, 10, 30) == []


async def test_outcomes_are_claimed_with_a_lease_and_forgotten_once_published(
    store: Store,
) -> None:
    for message_id in ("o-1", "o-2", "o-3"):
        await outbound_in(store, message_id, OutboundState.DEAD)
    first = await store.claim_outcomes("r1", T0, 2, 30)
    assert [o.message_id for o in first] == ["o-1", "o-2"]
    # leased: another relay, and r1 itself, get only what is left
    ten = T0 + timedelta(seconds=10)
    assert [o.message_id for o in await store.claim_outcomes("r2", ten, 10, 30)] == ["o-3"]
    assert await store.claim_outcomes("r1", T0 + timedelta(seconds=29), 10, 30) == []
    # r1 published o-1 only; o-2's lease runs out and another relay takes it
    assert await store.mark_outcomes_published([first[0].seq]) == 1
    later = T0 + timedelta(seconds=31)
    again = await store.claim_outcomes("r2", later, 10, 30)
    assert [(o.message_id, o.seq, o.body) for o in again] == [
        (o.message_id, o.seq, o.body) for o in first[1:]
    ]
    # published twice (r1's late confirm, then r2's): forgotten once
    assert await store.mark_outcomes_published([first[1].seq]) == 1
    assert await store.mark_outcomes_published([first[1].seq]) == 0
    # r2 stops: its lease on o-3 ends at once
    assert await store.release_outcomes("r2") == 1
    (last,) = await store.claim_outcomes("r3", later, 10, 30)
    assert last.message_id == "o-3"
    assert await store.mark_outcomes_published([last.seq]) == 1
    assert await store.claim_outcomes("r3", T0 + timedelta(days=1), 10, 30) == []


async def test_a_retried_message_has_its_next_final_state_published_again(store: Store) -> None:
    """An operator's retry re-queues a final message: its next end is a new outcome, numbered
    after the first, whether or not the first was published yet; a late receipt settling a
    dead message is one too."""
    await outbound_in(store, "o-1", OutboundState.REJECTED)
    (first,) = await store.claim_outcomes("r1", T0, 10, 30)
    assert await store.mark_outcomes_published([first.seq]) == 1
    later = T0 + timedelta(hours=1)
    await store.retry_outbound("o-1", now=later, actor="cli:ops", events=[])
    assert await store.claim_outcomes("r1", later, 10, 30) == []
    await store.claim_outbound("w1", later, 10, 30)
    dead = AttemptUpdate(state=OutboundState.DEAD, attempts=1, next_attempt_at=later)
    await store.finish_attempt("o-1", "w1", dead, [])
    ack = AttemptUpdate(
        state=OutboundState.ACKNOWLEDGED,
        attempts=1,
        next_attempt_at=later,
        receipt_body=b"not the canonical envelope",
        receipt_signature="sig",
    )
    await store.record_receipt("o-1", ack, [], dead_too=True)
    claimed = await store.claim_outcomes("r1", later, 10, 30)
    assert [o.outcome_id for o in claimed] == ["o-1/dead/2", "o-1/acknowledged/3"]
    assert json.loads(claimed[1].body)["receipt"] is None
