"""Auditor API over real TLS: entries, checkpoint + cosignatures, proofs, export, store check."""

from __future__ import annotations

import base64
import re
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from outbound_env import Running, auth, client_ssl, example, post_as_partner, token

from gateway.api.audit import AUDIT_LOG
from gateway.audit import merkle
from gateway.audit.bundle import verify_bundle
from gateway.audit.checkpoint import cosign, verify_cosignature
from gateway.audit.events import AuditEvent, EventKind
from gateway.cli.main import cli
from gateway.crypto.notes import NoteSigner, load_note_verifier, note_signer
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.store.base import Checkpoint

AUDITOR = ("audit:read",)


async def call(
    running: Running, method: str, path: str, *, scopes: tuple[str, ...] = AUDITOR, **kw: Any
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            running.api_url + path,
            headers=auth(token(running.config, scopes)),
            ssl=client_ssl(running.config),
            **kw,
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def get(running: Running, path: str, **kw: Any) -> tuple[int, Any]:
    status, _, body = await call(running, "GET", path, **kw)
    return status, orjson.loads(body)


async def submit(running: Running, correlation_id: str | None = None) -> str:
    document: dict[str, Any] = {
        "recipient": "MX-ANAM",
        "message_type": "shipment.status",
        "payload": example(running.gateway, "shipment.status"),
    }
    if correlation_id is not None:
        document["correlation_id"] = correlation_id
    status, _, body = await call(
        running, "POST", "/api/v1/messages", scopes=("c2c:send",), json=document
    )
    assert status == 202, body
    message_id: str = orjson.loads(body)["message_id"]
    return message_id


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def partner_audit_key(partner: str) -> NoteSigner:
    """A partner gateway's audit key, as it cosigns our checkpoints (cosignature/v1)."""
    return note_signer(
        f"dev.c2c-gateway.invalid/{partner}", Ed25519PrivateKey.generate(), cosignature=True
    )


async def cosigned_by(
    running: Running, partner: str, key: NoteSigner, checkpoint: Checkpoint
) -> str:
    """``partner``'s cosignature of ``checkpoint``, taken by the gateway as witnessing does."""
    note = cosign(checkpoint.note, key, timestamp=1_800_000_000)
    await running.api.app[AUDIT_LOG].accept_cosignature(partner, note, key.verifier)
    return note


async def test_entries_are_filtered_and_keyset_paged(us: Running) -> None:
    ids = [await submit(us) for _ in range(3)]
    status, page = await get(us, f"/api/v1/audit/entries?message_id={ids[1]}&event=submitted")
    assert status == 200
    assert [item["entry"]["message_id"] for item in page["items"]] == [ids[1]]
    assert page["next_after"] is None
    status, page = await get(us, f"/api/v1/audit/entries?message_id={ids[1]}")
    assert {item["entry"]["message_id"] for item in page["items"]} == {ids[1]}
    seen: list[int] = []
    after = ""
    while True:
        status, page = await get(us, f"/api/v1/audit/entries?event=submitted&limit=2{after}")
        assert status == 200
        seen += [item["seq"] for item in page["items"]]
        for item in page["items"]:
            row = await us.gateway.store.audit_entry(item["seq"])
            assert row is not None
            assert unb64(item["leaf_hash"]) == merkle.leaf_hash(row.entry)
        if page["next_after"] is None:
            break
        after = f"&after={page['next_after']}"
    assert seen == sorted(seen)
    assert len(seen) == 3
    status, page = await get(us, "/api/v1/audit/entries?partner=MX-ANAM&type=shipment.status")
    assert {item["entry"]["message_id"] for item in page["items"]} == set(ids)
    status, page = await get(us, "/api/v1/audit/entries?outcome=queued&since=2000-01-01T00:00:00Z")
    assert status == 200
    status, page = await get(us, "/api/v1/audit/entries?until=2000-01-01T00:00:00Z")
    assert page["items"] == []


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("after=-3", "after must be an integer from 0 to"),
        ("message_id=xyz", "message_id must be a lowercase UUID"),
        ("partner=mexico", "partner must be a party id"),
        ("event=exploded", "event must be one of"),
        ("since=yesterday", "since must be an RFC 3339 UTC timestamp"),
        ("colour=blue", "unknown query parameter(s): colour"),
    ],
)
async def test_bad_entry_filters_are_400(us: Running, query: str, detail: str) -> None:
    status, body = await get(us, f"/api/v1/audit/entries?{query}")
    assert status == 400
    assert detail in body["detail"]


async def test_sub_millisecond_bounds_are_rounded_up_to_the_entries_milliseconds(
    us: Running,
) -> None:
    """auditor finding F7, on the API: entries carry milliseconds, so a bound between two
    milliseconds keeps "at or after since" and "before until" true for the time an entry
    shows (it used to be truncated: an entry at .247 was returned for since .247001)."""
    message_id = await submit(us)
    status, page = await get(us, f"/api/v1/audit/entries?message_id={message_id}")
    (item,) = [i for i in page["items"] if i["entry"]["event"] == "submitted"]
    at = item["entry"]["at"]  # e.g. 2026-12-07T06:18:50.247Z
    just_after = at[:-1] + "001Z"
    status, page = await get(
        us, f"/api/v1/audit/entries?message_id={message_id}&since={just_after}"
    )
    assert status == 200
    assert item["seq"] not in [i["seq"] for i in page["items"]]
    status, page = await get(
        us, f"/api/v1/audit/entries?message_id={message_id}&until={just_after}"
    )
    assert item["seq"] in [i["seq"] for i in page["items"]]
    # rounding up the last instant of 9999 is out of range: a 400, as past it
    status, body = await get(us, "/api/v1/audit/entries?until=9999-12-31T23:59:59.9995Z")
    assert status == 400
    assert "is out of range (years 0001 to 9999 UTC)" in body["detail"]


@pytest.mark.parametrize("route", ["/api/v1/audit/entries", "/api/v1/audit/export"])
@pytest.mark.parametrize("name", ["since", "until"])
async def test_a_time_beyond_9999_is_a_clear_400(us: Running, route: str, name: str) -> None:
    """RFC 3339 takes the leap second after the last second of 9999; its instant is out of
    range: a 400 that says so, not a 500."""
    status, _, body = await call(us, "GET", f"{route}?{name}=9999-12-31T23:59:60Z")
    assert status == 400, body
    assert orjson.loads(body)["detail"] == (
        f"{name} is out of range (years 0001 to 9999 UTC): '9999-12-31T23:59:60Z'"
    )


async def test_every_audit_route_needs_audit_read(us: Running) -> None:
    for path in (
        "/api/v1/audit/entries",
        "/api/v1/audit/checkpoint",
        "/api/v1/audit/proofs/inclusion?index=0",
        "/api/v1/audit/proofs/consistency?old_size=0",
        "/api/v1/audit/export",
        "/api/v1/audit/verify",
    ):
        status, body = await get(us, path, scopes=("c2c:send", "c2c:query"))
        assert status == 403, path
        assert "audit:read" in body["detail"]
    status, _ = await get(us, "/api/v1/audit/verify", scopes=("admin",))
    assert status == 200


async def test_checkpoint_with_cosignatures_and_proofs(us: Running) -> None:
    status, body = await get(us, "/api/v1/audit/checkpoint")
    assert (status, body["detail"]) == (404, "no checkpoint has been signed yet")
    for _ in range(5):
        await submit(us)
    audit_log = us.api.app[AUDIT_LOG]
    old = await audit_log.checkpoint()
    await submit(us)
    await submit(us)
    signed = await audit_log.checkpoint()
    status, body = await get(us, "/api/v1/audit/checkpoint")
    assert status == 200
    assert (body["size"], unb64(body["root_hash"]), body["note"]) == (
        signed.size,
        signed.root_hash,
        signed.note,
    )
    assert body["cosignatures"] == []
    size = signed.size
    for index in (0, old.size - 1, size - 1):
        status, proof = await get(us, f"/api/v1/audit/proofs/inclusion?index={index}&size={size}")
        assert status == 200
        row = await us.gateway.store.audit_entry(index)
        assert row is not None
        assert unb64(proof["leaf_hash"]) == merkle.leaf_hash(row.entry)
        merkle.verify_inclusion(
            index,
            size,
            merkle.leaf_hash(row.entry),
            [unb64(h) for h in proof["proof"]],
            signed.root_hash,
        )
    status, proof = await get(
        us, f"/api/v1/audit/proofs/consistency?old_size={old.size}&size={size}"
    )
    assert status == 200
    assert unb64(proof["old_root_hash"]) == old.root_hash
    merkle.verify_consistency(
        old.size, size, old.root_hash, signed.root_hash, [unb64(h) for h in proof["proof"]]
    )


async def test_the_checkpoint_carries_each_partners_latest_cosignature_with_its_proof(
    us: Running,
) -> None:
    """Each partner's latest cosigned note, and the consistency proof from its size to the
    checkpoint's: what an auditor's browser needs to check the cosignature itself."""
    mx, ca = partner_audit_key("MX-ANAM"), partner_audit_key("CA-CBSA")
    audit_log = us.api.app[AUDIT_LOG]
    await submit(us)
    first = await audit_log.checkpoint()
    await cosigned_by(us, "MX-ANAM", mx, first)
    await cosigned_by(us, "CA-CBSA", ca, first)
    await submit(us)
    second = await audit_log.checkpoint()
    mx_note = await cosigned_by(us, "MX-ANAM", mx, second)
    await submit(us)
    latest = await audit_log.checkpoint()
    assert first.size < second.size < latest.size

    status, body = await get(us, "/api/v1/audit/checkpoint")
    assert status == 200
    assert body["size"] == latest.size
    cosignatures = body["cosignatures"]
    assert [(c["partner"], c["size"]) for c in cosignatures] == [
        ("CA-CBSA", first.size),
        ("MX-ANAM", second.size),
    ]
    assert cosignatures[1]["note"] == mx_note
    for cosig, key, cosigned in ((cosignatures[0], ca, first), (cosignatures[1], mx, second)):
        assert unb64(cosig["root_hash"]) == cosigned.root_hash
        assert verify_cosignature(cosig["note"], key.verifier) == 1_800_000_000
        merkle.verify_consistency(
            cosigned.size,
            latest.size,
            cosigned.root_hash,
            latest.root_hash,
            [unb64(h) for h in cosig["consistency_proof"]],
        )
    # cosigned at the checkpoint's own size: nothing to prove
    await cosigned_by(us, "CA-CBSA", ca, latest)
    status, body = await get(us, "/api/v1/audit/checkpoint")
    assert [(c["partner"], c["size"], c["consistency_proof"]) for c in body["cosignatures"]] == [
        ("CA-CBSA", latest.size, []),
        ("MX-ANAM", second.size, body["cosignatures"][1]["consistency_proof"]),
    ]


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("inclusion?index=3&size=3", "index 3 is not below the tree size 3"),
        ("inclusion?index=0&size=999", "size 999 is larger than the tree (4 entries)"),
        ("inclusion?size=2", "query parameter index is required"),
        ("inclusion?index=one", "index must be an integer from 0 to"),
        ("consistency?old_size=3&size=2", "old_size 3 is larger than size 2"),
        ("consistency?old_size=1&size=5", "size 5 is larger than the tree (4 entries)"),
        ("consistency?size=2", "query parameter old_size is required"),
    ],
)
async def test_bad_proof_requests_are_400(us: Running, path: str, detail: str) -> None:
    await us.gateway.store.append_audit(
        [AuditEvent(event=EventKind.QUERY, at=us.gateway.clock.now()) for _ in range(4)]
    )
    status, body = await get(us, f"/api/v1/audit/proofs/{path}")
    assert status == 400
    assert body["code"] == "MALFORMED"
    assert detail in body["detail"]


async def test_case_export_downloads_a_bundle_that_verifies_offline(
    us: Running, tmp_path: Path
) -> None:
    case = str(uuid.uuid4())
    in_case = [await submit(us, case), await submit(us, case)]
    await submit(us)
    status, headers, body = await call(us, "GET", f"/api/v1/audit/export?correlation_id={case}")
    assert status == 200
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["Content-Disposition"].startswith("attachment; filename=")
    path = tmp_path / "case.jsonl"
    path.write_bytes(body)
    key = us.config.audit.key.with_name("audit.pub")
    report = verify_bundle(path, lambda origin: load_note_verifier(key, origin))
    assert report.ok, report.failures
    assert report.messages == 2
    lines = [orjson.loads(line) for line in body.splitlines()]
    messages = {line["message_id"] for line in lines if line["type"] == "message"}
    assert messages == set(in_case)
    exported = [orjson.loads(unb64(line["entry"])) for line in lines if line["type"] == "entry"]
    assert {e.get("correlation_id") for e in exported} == {case}
    assert sorted(e["message_id"] for e in exported if e["event"] == "submitted") == sorted(in_case)
    # the export itself is audited, with the API client as its actor
    (action,) = [e for e in exported if e["event"] == "operator_action"]
    assert (action["actor"], action["outcome"]) == ("api:test-client", "audit_export")
    status, _, body = await call(us, "GET", "/api/v1/audit/export?since=tomorrow")
    assert status == 400


async def test_store_check_names_the_first_bad_position(us: Running) -> None:
    events = [
        AuditEvent(event=EventKind.QUERY, at=us.gateway.clock.now(), outcome=f"n{i}")
        for i in range(40)
    ]
    await us.gateway.store.append_audit(events)
    await us.api.app[AUDIT_LOG].checkpoint()
    status, report = await get(us, "/api/v1/audit/verify")
    assert status == 200
    assert report["ok"] is True
    assert report["checked"] == report["size"] == 40
    db = Path(str(us.config.store_url).removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE audit_entries SET entry = CAST(REPLACE(CAST(entry AS TEXT), 'n17', 'n71') "
            "AS BLOB) WHERE seq = 17"
        )
    status, report = await get(us, "/api/v1/audit/verify")
    assert status == 200
    assert report["ok"] is False
    assert report["first_bad_position"] == 17
    assert report["problems"][0] == {
        "position": 17,
        "what": "entry bytes do not match the stored leaf hash",
    }


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


async def received(running: Running, root: Path) -> tuple[str, bytes]:
    """An MX-ANAM message taken over mutual TLS and receipted: its id and wire bytes."""
    message_id = new_message_id()
    now = datetime.now(UTC)
    header = Header(
        message_id=message_id,
        message_type="shipment.advance_data",
        schema_version="1.0",
        sender="MX-ANAM",
        recipient="US-CBP",
        created_at=now,
        expires_at=now + timedelta(days=1),
    )
    body = encode_envelope(header, example(running.gateway, "shipment.advance_data"))
    status, answer, _ = await post_as_partner(running, root, body)
    assert status == 202, answer
    return message_id, body


def file_name(headers: dict[str, str]) -> str:
    """The download's name, made of what any file system takes as it is."""
    disposition = headers["Content-Disposition"]
    match = re.fullmatch(r'attachment; filename="([A-Za-z0-9._-]+)"', disposition)
    assert match is not None, disposition
    return match[1]


async def test_a_message_export_over_the_api_verifies_with_the_cli(
    us: Running, tmp_path: Path
) -> None:
    inbound_id, inbound_body = await received(us, tmp_path)
    other = await submit(us)
    status, headers, body = await call(us, "GET", f"/api/v1/audit/export?message_id={inbound_id}")
    assert status == 200, body
    assert headers["Content-Type"] == "application/x-ndjson"
    origin = "dev.c2c-gateway.invalid_US-CBP"
    size = int(headers["X-Audit-Tree-Size"])
    assert file_name(headers) == f"audit-{origin}-message-{inbound_id}-{size}.jsonl"
    bundle = tmp_path / "message.jsonl"
    bundle.write_bytes(body)
    key = us.config.audit.key.with_name("audit.pub")
    code, stdout, stderr = run_cli("audit", "verify", str(bundle), "--key", str(key))
    assert (code, stderr) == (0, ""), stderr
    assert ", 1 messages proven in checkpoint " in stdout
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert lines[0]["filter"] == {"message_ids": [inbound_id]}
    exported = [orjson.loads(unb64(line["entry"])) for line in lines if line["type"] == "entry"]
    assert exported
    assert {e["message_id"] for e in exported} == {inbound_id}
    # the message line: the partner's signed wire bytes and our signed receipt
    (message,) = [line for line in lines if line["type"] == "message"]
    assert (message["message_id"], message["direction"]) == (inbound_id, "inbound")
    assert unb64(message["body"]) == inbound_body
    receipt = unb64(message["receipt_body"])
    assert inbound_id in receipt.decode()
    pki = tmp_path / "pki"
    for signer, signed, jws in (
        ("MX-ANAM", inbound_body, message["signature"]),
        ("US-CBP", receipt, message["receipt_signature"]),
    ):
        signed_file = tmp_path / f"{signer}.bin"
        signed_file.write_bytes(signed)
        code, stdout, stderr = run_cli(
            "sig",
            "verify",
            "--key",
            str(pki / signer / "sign.pub"),
            "--body",
            str(signed_file),
            "--jws",
            jws,
        )
        assert (code, stderr) == (0, ""), (signer, stderr)
    # the export is audited as the CLI's is: the messages named in its reason
    status, page = await get(us, "/api/v1/audit/entries?event=operator_action")
    assert status == 200
    (action,) = [item["entry"] for item in page["items"]]
    assert (action["actor"], action["outcome"], action["reason"]) == (
        "api:test-client",
        "audit_export",
        f"export message {inbound_id} since=- until=-",
    )

    # several: the entries and messages of any of them, named by their count
    query = f"message_id={inbound_id}&message_id={other}&message_id={inbound_id}"
    status, headers, body = await call(us, "GET", f"/api/v1/audit/export?{query}")
    assert status == 200, body
    size = int(headers["X-Audit-Tree-Size"])
    assert file_name(headers) == f"audit-{origin}-messages-2-{size}.jsonl"
    bundle.write_bytes(body)
    code, stdout, stderr = run_cli("audit", "verify", str(bundle), "--key", str(key))
    assert (code, stderr) == (0, ""), stderr
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert lines[0]["filter"] == {"message_ids": sorted([inbound_id, other])}
    assert {line["message_id"] for line in lines if line["type"] == "message"} == {
        inbound_id,
        other,
    }
    status, page = await get(us, "/api/v1/audit/entries?event=operator_action")
    assert page["items"][-1]["entry"]["reason"] == (
        f"export message {inbound_id} message {other} since=- until=-"
    )


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("message_id=xyz", "message_id must be a lowercase UUID, not 'xyz'"),
        ("message_id=", "message_id must be a lowercase UUID, not ''"),
        (
            "message_id=01890000-0000-7000-8000-00000000000A",
            "message_id must be a lowercase UUID, not '01890000-0000-7000-8000-00000000000A'",
        ),
        (
            "message_id=01890000-0000-7000-8000-000000000000&message_id=nope",
            "message_id must be a lowercase UUID, not 'nope'",
        ),
        (
            "&".join(f"message_id={uuid.UUID(int=i)}" for i in range(101)),
            "query parameter message_id given 101 times; at most 100",
        ),
        ("message_ids=01890000-0000-7000-8000-000000000000", "unknown query parameter(s)"),
        (
            "correlation_id=01890000-0000-7000-8000-000000000000"
            "&correlation_id=01890000-0000-7000-8000-000000000001",
            "query parameter correlation_id given more than once",
        ),
    ],
    ids=["not-a-uuid", "empty", "uppercase", "one-of-two", "too-many", "misspelt", "repeated"],
)
async def test_a_bad_message_id_is_400_and_nothing_is_exported(
    us: Running, query: str, detail: str
) -> None:
    before = await us.gateway.store.audit_size()
    status, headers, body = await call(us, "GET", f"/api/v1/audit/export?{query}")
    assert status == 400, body
    assert headers["Content-Type"] == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["code"] == "MALFORMED"
    assert problem["detail"].startswith(detail), problem
    # refused before the export is recorded
    assert await us.gateway.store.audit_size() == before


async def test_an_exports_file_name_is_its_filter(us: Running) -> None:
    case = str(uuid.uuid4())
    message_id = await submit(us, case)
    origin = "audit-dev.c2c-gateway.invalid_US-CBP"
    for query, named in (
        ("", "all"),
        ("since=2026-03-02T12:00:00Z", "since-20260302T120000.000Z"),
        # the bound applied: rounded up to the millisecond, as the bundle's header records it
        ("until=2099-03-02T12:00:00.247001Z", "until-20990302T120000.248Z"),
        (
            "since=2026-03-02T12:00:00Z&until=2099-03-02T12:00:00Z",
            "since-20260302T120000.000Z-until-20990302T120000.000Z",
        ),
        (f"correlation_id={case}", f"case-{case}"),
        (
            f"correlation_id={case}&message_id={message_id}&since=2026-03-02T12:00:00Z",
            f"case-{case}-message-{message_id}-since-20260302T120000.000Z",
        ),
    ):
        status, headers, body = await call(us, "GET", f"/api/v1/audit/export?{query}")
        assert status == 200, (query, body)
        size = headers["X-Audit-Tree-Size"]
        assert file_name(headers) == f"{origin}-{named}-{size}.jsonl", query
