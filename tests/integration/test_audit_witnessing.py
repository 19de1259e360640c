"""Mutual witnessing between two real gateways (in-process runtimes, real mutual TLS).

US-CBP offers its checkpoint to MX-ANAM as an ``audit.checkpoint`` message; MX-ANAM's
gateway verifies and cosigns it and answers ``audit.cosignature``; US-CBP verifies that
cosignature and stores it. Then US-CBP's history is rewritten in its database (raw SQL) and a
new checkpoint is signed with its real audit key: MX-ANAM answers ``inconsistent``, keeps both
notes in its own audit log, raises the alert, and cosigns nothing.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import re
import secrets
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.checkpoint import cosign, open_checkpoint, parse_body, verify_cosignature
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.witnessing import (
    CHECKPOINT_TYPE,
    COSIGNATURE_TYPE,
    WitnessingService,
    attach_witnessing,
)
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, OutboxConfig, load_config
from gateway.crypto.notes import (
    load_note_signer,
    load_note_verifier,
    note_signer,
    parse_note,
    sign_note,
)
from gateway.devenv import default_partners_src, prepare_dev_environment
from gateway.outbound.service import attach_outbound
from gateway.outbound.submission import Submission, submit
from gateway.runtime import Gateway
from gateway.store import open_store
from gateway.store.base import AuditFilter, OutboundState

US, MX = "US-CBP", "MX-ANAM"
FAST_OUTBOX = OutboxConfig(
    max_attempts=5,
    base_delay_s=0.1,
    max_delay_s=0.5,
    send_timeout_s=5.0,
    poll_interval_s=0.05,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _configs(root: Path) -> dict[str, GatewayConfig]:
    ports = {US: _free_port(), MX: _free_port()}
    # Only the two parties under test: no offers to a third partner nobody serves.
    samples = root / "samples"
    shutil.copytree(default_partners_src() / MX, samples / MX)
    configs = {}
    for party in (US, MX):
        other = MX if party == US else US
        path = prepare_dev_environment(
            root / party,
            party=party,
            pki_dir=root / "pki",
            partners_src=samples,
            partner_port=ports[party],
            peers={other: f"https://127.0.0.1:{ports[other]}"},
        )
        config = load_config(path)
        # The periodic round stays out of the way: the test offers checkpoints itself.
        audit = dataclasses.replace(config.audit, checkpoint_interval_s=3600.0)
        configs[party] = dataclasses.replace(config, outbox=FAST_OUTBOX, audit=audit)
    return configs


@asynccontextmanager
async def running(config: GatewayConfig) -> AsyncIterator[tuple[Gateway, WitnessingService]]:
    gateway = Gateway(config)
    dispatcher, _ = attach_outbound(gateway, with_api=False)
    witnessing = attach_witnessing(gateway, wake=dispatcher.dispatcher.wake)
    await gateway.start()
    try:
        yield gateway, witnessing
    finally:
        await gateway.stop()


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _rewrite_history(db: Path) -> None:
    """What an insider with database access does: drop the log and its signed checkpoints."""
    with sqlite3.connect(db) as conn:
        for table in ("audit_entries", "audit_nodes", "audit_checkpoints", "audit_cosignatures"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("UPDATE audit_head SET size = 0")
    conn.close()


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, GatewayConfig]:
    return _configs(tmp_path)


async def test_checkpoint_cosigned_then_rewritten_history_is_caught(
    configs: dict[str, GatewayConfig],
) -> None:
    us_config, mx_config = configs[US], configs[MX]
    mx_audit_pub = mx_config.audit.key.with_name("audit.pub")
    mx_cosigner = load_note_verifier(mx_audit_pub, mx_config.audit.origin, cosignature=True)
    us_log_key = load_note_verifier(
        us_config.audit.key.with_name("audit.pub"), us_config.audit.origin
    )

    async with running(mx_config) as (mx, mx_witnessing), running(us_config) as (us, us_witnessing):
        # Some history worth witnessing: the log has the startup entries and these.
        await us.store.append_audit(
            [AuditEvent(event=EventKind.OPERATOR_ACTION, at=us.clock.now(), actor="test")] * 5
        )
        offered = await us_witnessing.send_checkpoints()
        assert [record.recipient for record in offered] == [MX]
        checkpoint = await us.store.latest_checkpoint()
        assert checkpoint is not None

        async def cosigned() -> bool:
            return any(c.partner == MX for c in await us.store.cosignatures())

        await _until("US-CBP to store MX-ANAM's cosignature", cosigned)
        (stored,) = await us.store.cosignatures()
        assert (stored.size, stored.root_hash) == (checkpoint.size, checkpoint.root_hash)
        assert verify_cosignature(stored.note, mx_cosigner) > 0
        open_checkpoint(stored.note, us_log_key, origin=us_config.audit.origin)
        witnessed = await mx.store.get_witnessed(us_config.audit.origin)
        assert witnessed is not None
        assert (witnessed.size, witnessed.root_hash) == (checkpoint.size, checkpoint.root_hash)
        answer = await us.store.find_inbound_reply(
            offered[0].message_id, sender=offered[0].recipient
        )
        assert answer is not None
        assert answer.message_type == COSIGNATURE_TYPE
        assert answer.body is not None
        assert orjson.loads(answer.body)["payload"]["status"] == "cosigned"
        await _until("witnessing tasks to finish", _idle(mx_witnessing, us_witnessing))
        witnessed_size = witnessed.size

    _rewrite_history(Path(us_config.store_url.removeprefix("sqlite:///")))

    with structlog.testing.capture_logs() as logs:
        async with (
            running(mx_config) as (mx, mx_witnessing),
            running(us_config) as (us, us_witnessing),
        ):
            # A forged history, longer than what MX-ANAM witnessed, signed with the real key.
            await us.store.append_audit(
                [
                    AuditEvent(event=EventKind.OPERATOR_ACTION, at=us.clock.now(), actor="x")
                    for _ in range(witnessed_size + 3)
                ]
            )
            offered = await us_witnessing.send_checkpoints(force=True)
            assert len(offered) == 1
            forged = await us.store.latest_checkpoint()
            assert forged is not None
            assert forged.size > witnessed_size

            async def alert_recorded() -> bool:
                rows = await mx.store.audit_entries(
                    AuditFilter(event=EventKind.HISTORY_INCONSISTENT.value)
                )
                return bool(rows)

            await _until("MX-ANAM's history_inconsistent entry", alert_recorded)

            async def reported_back() -> bool:
                rows = await us.store.audit_entries(
                    AuditFilter(event=EventKind.HISTORY_INCONSISTENT.value)
                )
                return bool(rows)

            await _until("US-CBP to learn MX-ANAM refused", reported_back)

            (row,) = await mx.store.audit_entries(
                AuditFilter(event=EventKind.HISTORY_INCONSISTENT.value)
            )
            entry = orjson.loads(row.entry)
            assert entry["sender"] == US
            assert entry["outcome"] == "refused"
            # Both signed notes are the evidence: the one witnessed and the forged one.
            assert checkpoint.note in entry["reason"]
            assert forged.note in entry["reason"]
            assert f"witnessed size {witnessed_size}" in entry["reason"]
            # MX-ANAM still holds the honest tree, and US-CBP got no cosignature.
            still = await mx.store.get_witnessed(us_config.audit.origin)
            assert still is not None
            assert (still.size, still.root_hash) == (checkpoint.size, checkpoint.root_hash)
            assert await us.store.cosignatures() == []
            counter = mx.metrics.registry.get_sample_value(
                "c2c_audit_history_inconsistent_total", {"partner": US, "whose": "partner"}
            )
            assert counter == 1.0
            witnessed_counter = mx.metrics.registry.get_sample_value(
                "c2c_audit_checkpoints_witnessed_total", {"partner": US, "status": "stale"}
            )
            assert witnessed_counter == 1.0

    errors = [e for e in logs if e["log_level"] == "error"]
    assert any(e["event"] == "audit.history_rewritten" and e["partner"] == US for e in errors)
    assert any(e["event"] == "audit.history_inconsistent_reported" for e in errors)
    # The forged note says it is US-CBP's, signed by its real key: only history betrays it.
    assert parse_body(parse_note(forged.note).text).origin == us_config.audit.origin


def test_cli_checkpoint_send_queues_an_offer_per_witnessing_partner(
    configs: dict[str, GatewayConfig],
) -> None:
    config = configs[US]
    result = CliRunner().invoke(
        cli, ["audit", "checkpoint", "--config", str(config.source), "--send"]
    )
    assert result.exit_code == 0, result.output
    # The note is the last thing on stdout (the CLI leaves structlog's default stdout output
    # in place: log lines may precede it).
    start = result.stdout.rfind(f"{config.audit.origin}\n")
    assert start >= 0, result.stdout
    note = result.stdout[start:]
    (line,) = result.stderr.splitlines()
    match = re.fullmatch(rf"queued audit\.checkpoint (\S+) for {MX}", line)
    assert match is not None, line

    async def queued() -> None:
        store = open_store(config.store_url, clock=SystemClock())
        await store.open()
        try:
            record = await store.get_outbound(match.group(1))
        finally:
            await store.close()
        assert record is not None
        assert (record.message_type, record.recipient, record.state) == (
            "audit.checkpoint",
            MX,
            OutboundState.QUEUED,
        )
        assert record.body is not None
        payload = orjson.loads(record.body)["payload"]
        assert payload == {"checkpoint": note, "old_size": 0, "consistency_proof": []}

    asyncio.run(queued())


def _idle(*services: WitnessingService) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        for service in services:
            await service.idle()
        return True

    return check


async def _settled(gateways: tuple[Gateway, ...], services: tuple[WitnessingService, ...]) -> None:
    """Wait until no witnessing task runs and neither log grew for a while: the deliveries
    and receipts of the last exchange are all written."""
    sizes: list[int] = []
    deadline = time.monotonic() + 15
    while True:
        for service in services:
            await service.idle()
        now = [await g.store.audit_size() for g in gateways]
        sizes = [*sizes[-4:], sum(now)]
        if len(sizes) == 5 and len(set(sizes)) == 1:
            return
        assert time.monotonic() < deadline, "the logs never stopped growing"
        await asyncio.sleep(0.1)


async def test_an_idle_pair_settles_and_a_real_entry_is_still_witnessed(
    configs: dict[str, GatewayConfig],
) -> None:
    """Witnessing's own exchange writes entries on both sides after the checkpoint it
    cosigns; they must not call for the next round, or two idle gateways offer forever."""
    async with (
        running(configs[MX]) as (mx, mx_witnessing),
        running(configs[US]) as (us, us_witnessing),
    ):
        services, gateways = (us_witnessing, mx_witnessing), (us, mx)
        await us.store.append_audit(
            [AuditEvent(event=EventKind.OPERATOR_ACTION, at=us.clock.now(), actor="test")]
        )
        assert [r.recipient for r in await us_witnessing.send_checkpoints()] == [MX]
        await _settled(gateways, services)
        (cosigned,) = await us.store.cosignatures()
        grown = await us.store.audit_size()
        assert grown > cosigned.size  # the exchange itself was logged after the checkpoint

        for _ in range(3):  # rounds with nothing new: nobody offers, nothing is logged
            assert await us_witnessing.send_checkpoints() == []
            assert await mx_witnessing.send_checkpoints() == []
            await _settled(gateways, services)
        assert await us.store.audit_size() == grown
        assert len(await us.store.cosignatures()) == 1
        # nor is anything signed: the latest checkpoint stays the one MX-ANAM cosigned
        latest_checkpoint = await us.store.latest_checkpoint()
        assert latest_checkpoint is not None
        assert latest_checkpoint.size == cosigned.size

        # one real entry after all that: the next round offers it, and it gets cosigned
        (real,) = await us.store.append_audit(
            [AuditEvent(event=EventKind.OPERATOR_ACTION, at=us.clock.now(), actor="test")]
        )
        assert [r.recipient for r in await us_witnessing.send_checkpoints()] == [MX]
        await _settled(gateways, services)
        latest = max(c.size for c in await us.store.cosignatures())
        assert latest > real
        assert await mx_witnessing.send_checkpoints() == []


# ----------------------------------------------------------------------------- partners' answers


@asynccontextmanager
async def running_without_witnessing(
    config: GatewayConfig,
) -> AsyncIterator[tuple[Gateway, Callable[[], None]]]:
    """A gateway that takes checkpoints in but does not answer them: the test answers in its
    place, as a partner's own (foreign) witnessing code would."""
    gateway = Gateway(config)
    dispatcher, _ = attach_outbound(gateway, with_api=False)
    await gateway.start()
    try:
        yield gateway, dispatcher.dispatcher.wake
    finally:
        await gateway.stop()


async def _answer(
    sender: Gateway, wake: Callable[[], None], payload: dict[str, Any], in_reply_to: str
) -> str:
    """Send ``payload`` as an ``audit.cosignature`` from ``sender`` (signed, over mutual TLS)."""
    record = await submit(
        sender.submission_services(),
        Submission(
            recipient=US,
            message_type=COSIGNATURE_TYPE,
            payload=payload,
            actor="test",
            in_reply_to=in_reply_to,
            by_gateway=True,  # as the partner's witnessing sends it
        ),
    )
    wake()
    return record.message_id


async def _handled(us: Gateway, witnessing: WitnessingService, message_id: str) -> None:
    """Wait until US-CBP handed ``message_id`` to its bus and witnessing handled it."""

    async def delivered() -> bool:
        rows = await us.store.audit_entries(
            AuditFilter(event=EventKind.DELIVERED.value, message_id=message_id)
        )
        return bool(rows)

    await _until(f"US-CBP to deliver {message_id}", delivered)
    await witnessing.idle()


async def _entries(gateway: Gateway, **where: str) -> list[dict[str, Any]]:
    rows = await gateway.store.audit_entries(AuditFilter(**where))
    return [orjson.loads(row.entry) for row in rows]


async def _offer_to_mx(us: Gateway, witnessing: WitnessingService) -> tuple[str, str]:
    """US-CBP offers MX-ANAM a checkpoint; returns the message id and the note, once MX-ANAM
    has it."""
    await us.store.append_audit(
        [AuditEvent(event=EventKind.OPERATOR_ACTION, at=us.clock.now(), actor="test")] * 3
    )
    (offered,) = await witnessing.send_checkpoints()
    latest = await us.store.latest_checkpoint()
    assert latest is not None

    async def acknowledged() -> bool:
        record = await us.store.get_outbound(offered.message_id)
        return record is not None and record.state == OutboundState.ACKNOWLEDGED

    await _until("MX-ANAM to acknowledge the checkpoint", acknowledged)
    return offered.message_id, latest.note


async def _nacked(mx: Gateway, message_id: str) -> str:
    """Wait until US-CBP's NACK of MX-ANAM's ``message_id`` settled it; its last error."""

    async def rejected() -> bool:
        record = await mx.store.get_outbound(message_id)
        return record is not None and record.state == OutboundState.REJECTED

    await _until(f"US-CBP to NACK {message_id}", rejected)
    record = await mx.store.get_outbound(message_id)
    assert record is not None
    assert record.last_error is not None
    return record.last_error


async def _refused_before_commit(
    us: Gateway, mx: Gateway, message_id: str, code: str, detail: str
) -> dict[str, Any]:
    """MX-ANAM's message was NACKed ``code`` with ``detail``: nothing stored or handed on at
    US-CBP, one ``rejected`` entry there. Returns that entry."""
    last_error = await _nacked(mx, message_id)
    assert code in last_error, last_error
    assert detail in last_error, last_error
    assert await us.store.get_inbound(MX, message_id) is None
    (refusal,) = await _entries(us, message_id=message_id)
    assert refusal["event"] == EventKind.REJECTED.value
    assert (refusal["sender"], refusal["outcome"]) == (MX, code)
    return refusal


async def test_an_answer_to_no_checkpoint_we_offered_raises_no_alarm_and_no_offer(
    configs: dict[str, GatewayConfig],
) -> None:
    """nodepeer finding 6: ``inconsistent`` or ``stale`` naming a message we never sent, or
    another checkpoint than the one our message offered, is NACKed before the commit (the
    partner learns its answer pairs with nothing) and audited with the exact reason."""
    async with (
        running_without_witnessing(configs[MX]) as (mx, mx_wake),
        running(configs[US]) as (us, us_witnessing),
    ):
        offer_id, note = await _offer_to_mx(us, us_witnessing)
        body = parse_body(parse_note(note).text)
        random_root = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        origin = configs[US].audit.origin
        unknown_id = str(uuid.uuid4())
        cases = [
            # the nodepeer's: a size never signed, a random root, a random in_reply_to
            (
                {"status": "inconsistent", "origin": origin, "size": 999999,
                 "root_hash": random_root, "witnessed_size": 5},
                unknown_id,
                "MALFORMED",
                "in_reply_to names no audit.checkpoint sent to this sender",
                f"in_reply_to {unknown_id} names no message of ours",
            ),
            (
                {"status": "stale", "origin": origin, "size": body.size,
                 "root_hash": base64.b64encode(body.root_hash).decode("ascii"),
                 "witnessed_size": 1},
                unknown_id,
                "MALFORMED",
                "in_reply_to names no audit.checkpoint sent to this sender",
                f"in_reply_to {unknown_id} names no message of ours",
            ),
            # our real offer named, but not the checkpoint it offered
            (
                {"status": "inconsistent", "origin": origin, "size": 999999,
                 "root_hash": random_root, "witnessed_size": 5},
                offer_id,
                "SCHEMA_INVALID",
                "schema error at /payload: does not echo the checkpoint of the"
                " audit.checkpoint named in in_reply_to",
                f"answers a checkpoint ({origin} size 999999 root {random_root}) other than"
                f" the one our audit.checkpoint {offer_id} offered ({origin} size {body.size}",
            ),
        ]  # fmt: skip
        for payload, in_reply_to, code, detail, reason in cases:
            message_id = await _answer(mx, mx_wake, payload, in_reply_to)
            refusal = await _refused_before_commit(us, mx, message_id, code, detail)
            assert refusal["message_type"] == COSIGNATURE_TYPE
            assert refusal["reason"].startswith(reason), refusal["reason"]

        # no alarm: no entry, no counter
        assert await _entries(us, event=EventKind.HISTORY_INCONSISTENT.value) == []
        counter = us.metrics.registry.get_sample_value(
            "c2c_audit_history_inconsistent_total", {"partner": MX, "whose": "ours"}
        )
        assert counter in (None, 0.0)
        # no new offer: the stale answer to nothing did not make us prove again
        offers = await _entries(
            us, event=EventKind.SUBMITTED.value, message_type="audit.checkpoint"
        )
        assert [o["message_id"] for o in offers] == [offer_id]
        assert await us.store.cosignatures() == []


async def test_a_cosignature_by_another_key_is_nacked_and_audited(
    configs: dict[str, GatewayConfig],
) -> None:
    """nodepeer finding 4: a cosignature of our real offer, by a key that is not MX-ANAM's
    audit key, is NACKed ``SCHEMA_INVALID`` at ``/payload/cosignature`` (it used to be ACKed
    and then refused after the commit, so MX-ANAM never learnt of it); the exact reason is in
    US-CBP's audit log."""
    async with (
        running_without_witnessing(configs[MX]) as (mx, mx_wake),
        running(configs[US]) as (us, us_witnessing),
    ):
        offer_id, note = await _offer_to_mx(us, us_witnessing)
        body = parse_body(parse_note(note).text)
        # MX-ANAM's name, another key: what a peer that picked the wrong key file sends
        wrong = note_signer(
            configs[MX].audit.origin, Ed25519PrivateKey.generate(), cosignature=True
        )
        payload = {
            "status": "cosigned",
            "origin": body.origin,
            "size": body.size,
            "root_hash": base64.b64encode(body.root_hash).decode("ascii"),
            "cosignature": cosign(note, wrong, timestamp=int(time.time())),
            "witnessed_size": body.size,
        }
        message_id = await _answer(mx, mx_wake, payload, offer_id)
        refusal = await _refused_before_commit(
            us,
            mx,
            message_id,
            "SCHEMA_INVALID",
            "schema error at /payload/cosignature: not the recipient's checkpoint cosigned"
            " with the sender's audit key",
        )
        assert refusal["message_type"] == COSIGNATURE_TYPE
        assert "note carries no signature by a known key" in refusal["reason"]
        assert await us.store.cosignatures() == []

        # the same answer with MX-ANAM's real audit key is taken
        real = load_note_signer(configs[MX].audit.key, configs[MX].audit.origin, cosignature=True)
        payload["cosignature"] = cosign(note, real, timestamp=int(time.time()))
        taken = await _answer(mx, mx_wake, payload, offer_id)
        await _handled(us, us_witnessing, taken)
        assert [c.partner for c in await us.store.cosignatures()] == [MX]

        # what changed between the check and witnessing (here: the offer it names) is
        # refused after the commit: the message was ACKed, so the refusal is an audit entry
        record = await us.store.get_inbound(MX, taken)
        assert record is not None
        gone = str(uuid.uuid4())
        await us_witnessing.handle(dataclasses.replace(record, in_reply_to=gone))
        (late,) = await _entries(us, message_id=taken, outcome="refused")
        assert late["event"] == EventKind.COSIGNATURE_RECEIVED.value
        assert late["reason"] == f"in_reply_to {gone} names no message of ours"


async def test_a_checkpoint_not_signed_with_the_partners_audit_key_is_nacked(
    configs: dict[str, GatewayConfig],
) -> None:
    """An ``audit.checkpoint`` whose note does not verify with the sender's configured audit
    key (or origin) is NACKed ``SCHEMA_INVALID`` at ``/payload/checkpoint``: nothing can be
    said about a log we cannot authenticate, and the partner now learns it at once."""
    async with (
        running_without_witnessing(configs[MX]) as (mx, mx_wake),
        running(configs[US]) as (us, us_witnessing),
    ):
        leaf = b"an entry"
        root = base64.b64encode(hashlib.sha256(b"\x00" + leaf).digest()).decode("ascii")
        text = f"{configs[MX].audit.origin}\n1\n{root}\n"
        for signer, reason in [
            # another key under MX-ANAM's name, then MX-ANAM's key under another origin
            (note_signer(configs[MX].audit.origin, Ed25519PrivateKey.generate()), "signature"),
            (load_note_signer(configs[MX].audit.key, configs[MX].audit.origin), None),
        ]:
            note = sign_note(text if reason else text.replace("MX-ANAM", "MX-OTHER"), [signer])
            record = await submit(
                mx.submission_services(),
                Submission(
                    recipient=US,
                    message_type=CHECKPOINT_TYPE,
                    payload={"checkpoint": note, "old_size": 0, "consistency_proof": []},
                    actor="test",
                    by_gateway=True,
                ),
            )
            mx_wake()
            refusal = await _refused_before_commit(
                us,
                mx,
                record.message_id,
                "SCHEMA_INVALID",
                "schema error at /payload/checkpoint: not a checkpoint of the sender's log"
                " signed with its audit key",
            )
            assert refusal["reason"].startswith("/checkpoint: checkpoint ")
        await us_witnessing.idle()
        assert await _entries(us, event=EventKind.CHECKPOINT_WITNESSED.value) == []
