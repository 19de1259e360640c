"""`c2c-gateway audit ...` against a real dev environment and SQLite store; offline verify.

Covers export -> verify, every single-byte change of a bundle (T75), truncation, reordering,
a case export with archived wire bytes, and the store-side commands.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc8785
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit.bundle import verify_bundle
from gateway.audit.events import AuditEvent, EventKind
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.crypto.notes import (
    NoteVerifier,
    load_note_verifier,
    note_signer,
    parse_note,
    sign_note,
)
from gateway.devenv import prepare_dev_environment
from gateway.envelope import body_digest
from gateway.model import Priority
from gateway.store import open_store
from gateway.store.base import OutboundRecord

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CASE = "5f0c1a2e-9b7d-4e3a-8c61-2d4b7e9f0a13"
WIRE = b'{"header":{"message_id":"msg-case-1"},"payload":{"x":1}}'


async def _populate(config_path: Path) -> None:
    config = load_config(config_path)
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        events = [
            AuditEvent(
                event=EventKind.RECEIVED if i % 3 else EventKind.REJECTED,
                at=T0 + timedelta(minutes=i),
                message_id=f"msg-{i}",
                sender="MX-ANAM",
                recipient="US-CBP",
                message_type="shipment.manifest",
                body_digest=f"sha-256:{i:043d}",
                outcome="ACK" if i % 3 else "SCHEMA_INVALID",
                reason=None if i % 3 else f"/payload/items/{i}: required",
            )
            for i in range(45)
        ]
        submitted = AuditEvent(
            event=EventKind.SUBMITTED,
            at=T0 + timedelta(minutes=20),
            message_id="msg-case-1",
            recipient="MX-ANAM",
            message_type="enforcement.seizure_report",
            correlation_id=CASE,
            body_digest=body_digest(WIRE),
            outcome="queued",
            actor="jwt:officer-7",
        )
        await store.append_audit(events[:20])
        await store.enqueue_outbound(
            OutboundRecord(
                message_id="msg-case-1",
                recipient="MX-ANAM",
                message_type="enforcement.seizure_report",
                schema_version="1.0",
                correlation_id=CASE,
                in_reply_to=None,
                priority=Priority.URGENT,
                body=WIRE,
                body_digest=body_digest(WIRE),
                signature="eyJhbGciOiJFZERTQSJ9..c2ln",
                kid="kid-1",
                transport="https",
                created_at=T0,
                expires_at=None,
                next_attempt_at=T0,
                updated_at=T0,
            ),
            [submitted],
        )
        await store.append_audit(events[21:])
    finally:
        await store.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config_path = prepare_dev_environment(tmp_path_factory.mktemp("audit-env"))
    asyncio.run(_populate(config_path))
    return config_path


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _pub(env: Path) -> Path:
    return env.parent / "US-CBP" / "audit.pub"


@pytest.fixture(scope="module")
def bundle(env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "all.jsonl"
    code, stdout, stderr = _invoke("audit", "export", "--config", str(env), "--out", str(out))
    assert code == 0, stderr
    assert "46 entries" in stdout
    return out


def _key(env: Path) -> NoteVerifier:
    return load_note_verifier(_pub(env), "dev.c2c-gateway.invalid/US-CBP")


def test_export_then_verify_offline(env: Path, bundle: Path) -> None:
    code, stdout, stderr = _invoke("audit", "verify", str(bundle), "--key", str(_pub(env)))
    assert (code, stderr) == (0, "")
    assert stdout.startswith(f"OK {bundle}: 46 entries, 0 messages proven in checkpoint ")
    assert not bundle.with_name(bundle.name + ".partial").exists()


def test_progress_bar_only_when_asked(env: Path, bundle: Path) -> None:
    code, _, stderr = _invoke("audit", "verify", str(bundle), "--key", str(_pub(env)), "--progress")
    assert code == 0
    assert "verifying" in stderr


def test_every_single_byte_change_fails(env: Path, bundle: Path, tmp_path: Path) -> None:
    data = bundle.read_bytes()
    key = _key(env)
    rng = random.Random(7)
    target = tmp_path / "mutated.jsonl"
    undetected = []
    for _ in range(1000):
        pos = rng.randrange(len(data))
        mutated = bytearray(data)
        mutated[pos] = (mutated[pos] + rng.randrange(1, 256)) % 256
        target.write_bytes(bytes(mutated))
        if verify_bundle(target, lambda _origin: key).ok:
            undetected.append(pos)
    assert undetected == []


def test_changed_entry_is_named(env: Path, bundle: Path, tmp_path: Path) -> None:
    lines = bundle.read_bytes().splitlines(keepends=True)
    obj = json.loads(lines[11])
    assert obj["seq"] == 10
    raw = bytearray(base64.b64decode(obj["entry"]))
    raw[raw.index(b"msg-10") + 4] = ord("9")
    obj["entry"] = base64.b64encode(bytes(raw)).decode()
    lines[11] = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    target = tmp_path / "entry.jsonl"
    target.write_bytes(b"".join(lines))
    code, _, stderr = _invoke("audit", "verify", str(target), "--key", str(_pub(env)))
    assert code == 1
    assert f"FAIL {target}: line 12: entry 10 is not in the checkpoint's tree" in stderr
    assert "end signature does not cover these lines" in stderr


def test_truncated_and_reordered_bundles_fail(env: Path, bundle: Path, tmp_path: Path) -> None:
    lines = bundle.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:-1]))
    code, _, stderr = _invoke("audit", "verify", str(cut), "--key", str(_pub(env)))
    assert code == 1
    assert "bundle is truncated: it has no end line" in stderr
    cut.write_bytes(b"".join(lines)[:-40])
    assert _invoke("audit", "verify", str(cut), "--key", str(_pub(env)))[0] == 1
    swapped = lines[:]
    swapped[5], swapped[9] = swapped[9], swapped[5]
    cut.write_bytes(b"".join(swapped))
    code, _, stderr = _invoke("audit", "verify", str(cut), "--key", str(_pub(env)))
    assert code == 1
    # each swapped line still proves its own seq: the order check and the end seal catch it
    assert "line 7: entry 5 is out of order (after entry 8)" in stderr
    assert "line 10: entry 4 is out of order (after entry 8)" in stderr
    assert "end signature does not cover these lines" in stderr


def test_wrong_key_names_the_checkpoint(env: Path, bundle: Path) -> None:
    other = env.parent / "MX-ANAM" / "sign.pub"
    code, _, stderr = _invoke("audit", "verify", str(bundle), "--key", str(other))
    assert code == 1
    assert (
        "line 1: checkpoint: checkpoint signature: note carries no signature by a known key"
        in stderr
    )


def test_case_export_carries_wire_bytes_and_checks_them(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "case.jsonl"
    code, stdout, stderr = _invoke(
        "audit", "export", "--config", str(env), "--out", str(out), "--correlation-id", CASE
    )
    assert code == 0, stderr
    assert ": 2 entries, 1 messages" in stdout  # the submission and the export itself
    code, stdout, _ = _invoke("audit", "verify", str(out), "--key", str(_pub(env)))
    assert code == 0
    assert "2 entries, 1 messages" in stdout
    lines = out.read_bytes().splitlines(keepends=True)
    message = json.loads(lines[3])
    assert message["type"] == "message"
    assert base64.b64decode(message["body"]) == WIRE
    message["body"] = base64.b64encode(WIRE.replace(b"1}", b"2}")).decode()
    lines[3] = json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    out.write_bytes(b"".join(lines))
    code, _, stderr = _invoke("audit", "verify", str(out), "--key", str(_pub(env)))
    assert code == 1
    assert "line 4: message msg-case-1: wire bytes do not match sha-256:" in stderr


def test_store_commands(env: Path, tmp_path: Path) -> None:
    code, stdout, _ = _invoke(
        "audit", "query", "--config", str(env), "--outcome", "SCHEMA_INVALID", "--limit", "3"
    )
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["seq"] for r in rows] == [0, 3, 6]
    assert rows[1]["entry"]["reason"] == "/payload/items/3: required"

    code, stdout, _ = _invoke("audit", "checkpoint", "--config", str(env))
    assert code == 0
    note = stdout
    size = int(note.splitlines()[1])
    root = base64.b64decode(note.splitlines()[2])

    code, stdout, _ = _invoke("audit", "proof", "--config", str(env), "--index", "7")
    proof = json.loads(stdout)
    merkle.verify_inclusion(
        7,
        proof["size"],
        base64.b64decode(proof["leaf_hash"]),
        [base64.b64decode(h) for h in proof["proof"]],
        base64.b64decode(proof["root_hash"]),
    )
    code, stdout, _ = _invoke(
        "audit", "proof", "--config", str(env), "--old-size", "5", "--size", str(size)
    )
    cons = json.loads(stdout)
    assert base64.b64decode(cons["root_hash"]) == root
    merkle.verify_consistency(
        5,
        size,
        base64.b64decode(cons["old_root_hash"]),
        root,
        [base64.b64decode(h) for h in cons["proof"]],
    )

    trusted = tmp_path / "cp.note"
    trusted.write_text(note)
    code, stdout, stderr = _invoke(
        "audit", "check", "--config", str(env), "--trusted", str(trusted)
    )
    assert (code, stderr) == (0, "")
    assert stdout.startswith("OK ")

    code, _, stderr = _invoke("audit", "proof", "--config", str(env), "--index", "100000")
    assert code == 2
    assert stderr.startswith("error: tree size") or stderr.startswith("error: leaf index")
    code, _, stderr = _invoke("audit", "query", "--config", str(env), "--since", "yesterday")
    assert (code, stderr) == (
        2,
        "error: --since: 'yesterday' is not an RFC 3339 UTC time (e.g. 2026-03-01T00:00:00Z)\n",
    )


def _query_seqs(env: Path, *times: str) -> list[int]:
    code, stdout, stderr = _invoke("audit", "query", "--config", str(env), *times)
    assert (code, stderr) == (0, "")
    return [json.loads(line)["seq"] for line in stdout.splitlines()]


def test_times_are_read_as_the_api_and_messages_list_read_them(env: Path, tmp_path: Path) -> None:
    """RFC 3339 section 5.6: "T" and "Z" may be lower case; the same parser as the API's."""
    upper = _query_seqs(env, "--since", "2026-11-24T12:40:00Z", "--until", "2026-11-24T12:42:00Z")
    assert len(upper) == 2
    lower = _query_seqs(env, "--since", "2026-11-24t12:40:00z", "--until", "2026-11-24t12:42:00z")
    assert lower == upper
    assert (
        _query_seqs(
            env, "--since", "2026-11-24T12:40:00-00:00", "--until", "2026-11-24T12:42:00+00:00"
        )
        == upper
    )
    out = tmp_path / "lower.jsonl"
    code, stdout, stderr = _invoke(
        "audit",
        "export",
        "--config",
        str(env),
        "--out",
        str(out),
        "--since",
        "2026-11-24t12:40:00z",
        "--until",
        "2026-11-24t12:42:00.000z",
    )
    assert code == 0, stderr
    assert ": 2 entries," in stdout


@pytest.mark.parametrize("command", ["query", "export"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        # ISO 8601's basic form, an offset other than UTC (the API's since/until are UTC), a
        # space for the T, no zone: not RFC 3339 UTC
        ("20261124T124000Z", "is not an RFC 3339 UTC time (e.g. 2026-03-01T00:00:00Z)"),
        ("2026-11-24T12:40:00+01:00", "is not an RFC 3339 UTC time (e.g. 2026-03-01T00:00:00Z)"),
        ("2026-11-24 12:40:00Z", "is not an RFC 3339 UTC time (e.g. 2026-03-01T00:00:00Z)"),
        ("2026-11-24T12:40:00", "is not an RFC 3339 UTC time (e.g. 2026-03-01T00:00:00Z)"),
        ("9999-12-31T23:59:60Z", "is out of range (years 0001 to 9999 UTC)"),
    ],
)
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_time_that_is_not_rfc_3339_utc_is_refused_saying_why(
    env: Path, tmp_path: Path, command: str, option: str, value: str, error: str
) -> None:
    extra = ["--out", str(tmp_path / "x.jsonl")] if command == "export" else []
    code, stdout, stderr = _invoke("audit", command, "--config", str(env), *extra, option, value)
    assert (code, stdout, stderr) == (2, "", f"error: {option}: {value!r} {error}\n")
    assert not (tmp_path / "x.jsonl").exists()


def _copy_env(env: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the dev environment (config, keys, store) to tamper with."""
    root = tmp_path / "env"
    shutil.copytree(env.parent, root)
    return root / "gateway.toml", root / "c2c.db"


def _sql(db: Path, statement: str) -> None:
    """One raw statement behind the store's back, the way an insider would."""
    conn = sqlite3.connect(db)
    try:
        conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_entry_changed_to_text_is_a_failed_entry(env: Path, tmp_path: Path) -> None:
    config, db = _copy_env(env, tmp_path)
    # SQLite's replace() on a BLOB returns TEXT: the entry comes back as str, not bytes
    _sql(db, "UPDATE audit_entries SET entry = replace(entry, 'queued', 'QUEUED') WHERE seq = 20")
    code, _, stderr = _invoke("audit", "check", "--config", str(config), "--no-progress")
    assert code == 1
    assert stderr.startswith("FAIL entry 20: entry bytes do not match the stored leaf hash\n")
    assert "Traceback" not in stderr

    # no bundle that could not verify is written: the export names the first bad seq
    out = tmp_path / "tampered.jsonl"
    code, stdout, stderr = _invoke("audit", "export", "--config", str(config), "--out", str(out))
    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: entry 20 is not in the tree of the checkpoint of size ")
    assert "run `c2c-gateway audit check`" in stderr
    assert not out.exists()
    assert not out.with_name("tampered.jsonl.partial").exists()

    code, _, stderr = _invoke("store", "backup", "--config", str(config), str(tmp_path / "b.db"))
    assert code == 1
    assert "FAIL entry 20: entry bytes do not match the stored leaf hash" in stderr


def test_hashes_changed_to_text_are_found(env: Path, tmp_path: Path) -> None:
    config, db = _copy_env(env, tmp_path)
    _sql(db, "UPDATE audit_nodes SET hash = 'not a hash' WHERE level = 5 AND idx = 0")
    _sql(db, "UPDATE audit_entries SET leaf_hash = 'not a hash' WHERE seq = 3")
    code, _, stderr = _invoke("audit", "check", "--config", str(config), "--no-progress")
    assert code == 1
    assert "FAIL entry 3: entry bytes do not match the stored leaf hash" in stderr
    assert "FAIL entry 0: stored tree node over entries [0, 32) differs" in stderr
    assert "Traceback" not in stderr
    code, stdout, _ = _invoke(
        "audit", "query", "--config", str(config), "--after", "2", "--limit", "1"
    )
    assert code == 0
    assert json.loads(stdout)["leaf_hash"] == base64.b64encode(b"not a hash").decode()
    _sql(db, "UPDATE audit_entries SET entry = 'not json' WHERE seq = 4")
    code, stdout, _ = _invoke(
        "audit", "query", "--config", str(config), "--after", "3", "--limit", "1"
    )
    assert code == 0
    assert json.loads(stdout)["entry"] == {"unreadable": "bm90IGpzb24="}
    # no checkpoint is signed over a log that contradicts the last one
    code, _, stderr = _invoke(
        "audit", "export", "--config", str(config), "--out", str(tmp_path / "b.jsonl")
    )
    assert code != 0
    assert stderr.startswith("error: ")
    assert "Traceback" not in stderr
    assert not (tmp_path / "b.jsonl").exists()


def test_a_deleted_audit_head_is_named(env: Path, tmp_path: Path) -> None:
    config, db = _copy_env(env, tmp_path)
    _sql(db, "DELETE FROM audit_head")
    code, _, stderr = _invoke("audit", "check", "--config", str(config), "--no-progress")
    assert (code, stderr) == (
        2,
        "error: store: the audit log's head row (audit_head) is missing: the store was changed"
        " outside the gateway; restore it from a backup\n",
    )


def test_query_cursor_out_of_range_is_a_usage_error(env: Path) -> None:
    code, stdout, stderr = _invoke(
        "audit", "query", "--config", str(env), "--after", "99999999999999999999999"
    )
    assert (code, stdout) == (2, "")
    assert "Invalid value for '--after': 99999999999999999999999 is not in the range" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("query", "--event", "bogus"),
            "Invalid value for '--event': 'bogus' is not one of 'received', 'rejected',",
        ),
        (
            ("query", "--message-id", "nope"),
            "Invalid value for '--message-id': 'nope' is not a lowercase UUID",
        ),
        (
            ("query", "--correlation-id", CASE.upper()),
            f"Invalid value for '--correlation-id': '{CASE.upper()}' is not a lowercase UUID",
        ),
        (
            ("query", "--partner", "mx-anam"),
            "Invalid value for '--partner': 'mx-anam' is not a party id (CC-AGENCY)",
        ),
        (
            ("export", "--correlation-id", "nope"),
            "Invalid value for '--correlation-id': 'nope' is not a lowercase UUID",
        ),
    ],
)
def test_filters_are_refused_like_the_api(
    env: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    command, *options = args
    out = tmp_path / "never-written.jsonl"
    if command == "export":
        options += ["--out", str(out)]
    code, stdout, stderr = _invoke("audit", command, "--config", str(env), *options)
    assert (code, stdout) == (2, "")
    assert message in stderr
    assert not out.exists()


def test_export_refuses_to_replace_a_fifo(env: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "reader.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"
    link.symlink_to(fifo)
    for target in (fifo, link):
        code, stdout, stderr = _invoke(
            "audit", "export", "--config", str(env), "--out", str(target)
        )
        assert (code, stdout) == (2, "")
        assert stderr == (
            f"error: --out: {target} is a FIFO: "
            "a bundle is written only to a new path or over a regular file "
            "(--out - writes it to stdout)\n"
        )
        assert stat.S_ISFIFO(target.stat().st_mode)
        assert not target.with_name(target.name + ".partial").exists()
    assert link.is_symlink()


def test_a_failed_signature_is_no_truncation(env: Path, bundle: Path, tmp_path: Path) -> None:
    other = env.parent / "MX-ANAM" / "sign.pub"
    code, _, stderr = _invoke("audit", "verify", str(bundle), "--key", str(other))
    assert code == 1
    assert "truncated" not in stderr
    assert stderr.endswith("verification failed (1 problem(s))\n")

    # the end line is there, sealed by another key: one failure, on that line
    lines = bundle.read_bytes().splitlines(keepends=True)
    end = json.loads(lines[-1])
    text = parse_note(end["signature"]).text
    forger = note_signer("dev.c2c-gateway.invalid/US-CBP", Ed25519PrivateKey.generate())
    end["signature"] = sign_note(text, [forger])
    lines[-1] = bytes(rfc8785.dumps(end)) + b"\n"
    target = tmp_path / "forged-end.jsonl"
    target.write_bytes(b"".join(lines))
    code, _, stderr = _invoke("audit", "verify", str(target), "--key", str(_pub(env)))
    assert code == 1
    assert f"FAIL {target}: line {len(lines)}: end signature: " in stderr
    assert "truncated" not in stderr
    assert stderr.endswith("verification failed (1 problem(s))\n")
