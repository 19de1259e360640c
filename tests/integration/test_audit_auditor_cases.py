"""An auditor's cases against `c2c-gateway audit verify` and `audit check` (real CLI, SQLite).

A bundle read from a pipe; a tampered header origin; cosignature lines that are the log's
own signature, forged or attributed to another partner, with and without the partners'
witness keys; one cosignature per partner in a bundle; and stores rewritten behind the
gateway's back that only the notes it signed and its partners cosigned still contradict.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc8785
from click.testing import CliRunner

from gateway.audit import merkle
from gateway.audit.checkpoint import cosign
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.log import AuditLog
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.crypto.notes import (
    Note,
    NoteSignature,
    load_note_signer,
    load_note_verifier,
    parse_note,
    sign_note,
)
from gateway.devenv import prepare_dev_environment
from gateway.store import open_store

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
US_ORIGIN = "dev.c2c-gateway.invalid/US-CBP"
WITNESSES = ("MX-ANAM", "CA-CBSA")
#: the sizes both partners cosigned: each cosignature received is an entry of its own
COSIGNED = (10, 22)
C2C_GATEWAY = str(Path(sys.executable).parent / "c2c-gateway")


def _events(n: int, start: int) -> list[AuditEvent]:
    return [
        AuditEvent(
            event=EventKind.ACCEPTED,
            at=T0 + timedelta(minutes=start + i),
            message_id=f"msg-{start + i}",
            sender="MX-ANAM",
            recipient="US-CBP",
            message_type="shipment.manifest",
            outcome="ACK",
        )
        for i in range(n)
    ]


async def _populate(config_path: Path) -> None:
    """Entries cosigned by both partners at size 10 and again at size 22, then 10 more."""
    config = load_config(config_path)
    pki = config_path.parent
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        audit = AuditLog(
            store, signer=load_note_signer(config.audit.key, US_ORIGIN), clock=SystemClock()
        )
        for start in (0, 10, 20):
            await store.append_audit(_events(10, start))
            if start == 20:
                break
            checkpoint = await audit.checkpoint()
            for party in WITNESSES:
                origin = f"dev.c2c-gateway.invalid/{party}"
                key = pki / party / "audit.key"
                cosigner = load_note_signer(key, origin, cosignature=True)
                note = cosign(checkpoint.note, cosigner, timestamp=1_800_000_000 + start)
                verifier = load_note_verifier(key.with_name("audit.pub"), origin, cosignature=True)
                await audit.accept_cosignature(party, note, verifier)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config_path = prepare_dev_environment(tmp_path_factory.mktemp("auditor-env"))
    asyncio.run(_populate(config_path))
    return config_path


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _pub(env: Path, party: str = "US-CBP") -> Path:
    return env.parent / party / "audit.pub"


def _witness_keys(env: Path) -> list[str]:
    return [arg for p in WITNESSES for arg in ("--witness-key", f"{p}={_pub(env, p)}")]


@pytest.fixture(scope="module")
def bundle(env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "all.jsonl"
    code, _, stderr = _invoke("audit", "export", "--config", str(env), "--out", str(out))
    assert code == 0, stderr
    return out


def _lines(bundle: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in bundle.read_bytes().splitlines()]


def _write(objs: list[dict[str, object]], env: Path, target: Path) -> Path:
    """The bundle of ``objs`` resealed with the log's own key: what its gateway could do."""
    body = b"".join(bytes(rfc8785.dumps(o)) + b"\n" for o in objs[:-1])
    signer = load_note_signer(env.parent / "US-CBP" / "audit.key", US_ORIGIN)
    text = f"c2c-audit-bundle/v1 {US_ORIGIN}\n{len(objs) - 1}\n{hashlib.sha256(body).hexdigest()}\n"
    end = {"type": "end", "signature": sign_note(text, [signer])}
    target.write_bytes(body + bytes(rfc8785.dumps(end)) + b"\n")
    return target


def test_a_bundle_read_from_a_pipe_verifies(env: Path, bundle: Path) -> None:
    code, from_file, stderr = _invoke("audit", "verify", str(bundle), "--key", str(_pub(env)))
    assert code == 0, stderr
    for progress in ("--progress", "--no-progress"):
        done = subprocess.run(
            [C2C_GATEWAY, "audit", "verify", "/dev/stdin", "--key", str(_pub(env)), progress],
            input=bundle.read_bytes(),
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        # the same verdict as from the file, but for the moment it was reached
        said = from_file.replace(str(bundle), "/dev/stdin", 1).rsplit(" (verified ", 1)[0]
        assert done.stdout.decode().rsplit(" (verified ", 1)[0] == said


def test_a_tampered_header_origin_is_a_failed_first_line(
    env: Path, bundle: Path, tmp_path: Path
) -> None:
    objs = _lines(bundle)
    objs[0]["origin"] = "evil origin"
    target = _write(objs, env, tmp_path / "origin.jsonl")
    code, stdout, stderr = _invoke("audit", "verify", str(target), "--key", str(_pub(env)))
    assert (code, stdout) == (1, "")
    assert stderr.startswith(f"FAIL {target}: line 1: checkpoint: 'evil origin' cannot name")
    assert str(_pub(env)) not in stderr  # the auditor's key file is not what is wrong


def test_a_bundle_carries_each_partners_latest_cosignature(env: Path, bundle: Path) -> None:
    cosigs = [o for o in _lines(bundle) if o["type"] == "cosignature"]
    assert sorted(str(o["partner"]) for o in cosigs) == sorted(WITNESSES)
    assert {parse_note(str(o["note"])).text.split("\n")[1] for o in cosigs} == {"22"}


def test_cosignatures_are_claimed_only_with_witness_keys(env: Path, bundle: Path) -> None:
    code, stdout, _ = _invoke("audit", "verify", str(bundle), "--key", str(_pub(env)))
    assert code == 0
    assert (
        "0 cosignatures verified with witness keys, 2 cosignature lines not checked: "
        "no witness key for CA-CBSA, MX-ANAM" in stdout
    )
    code, stdout, stderr = _invoke(
        "audit", "verify", str(bundle), "--key", str(_pub(env)), *_witness_keys(env)
    )
    assert code == 0, stderr
    assert "; 2 cosignatures verified with witness keys (verified " in stdout


def _tampered_cosignature(objs: list[dict[str, object]], how: str) -> int:
    index = next(i for i, o in enumerate(objs) if o["type"] == "cosignature")
    line = objs[index]
    note = parse_note(str(line["note"]))
    own, partner_sig = note.signatures
    if how == "own signature twice":
        line["note"] = Note(text=note.text, signatures=(own, own)).encode()
    elif how == "forged":
        forged = NoteSignature(
            name=partner_sig.name, key_id=partner_sig.key_id, signature=bytes(72)
        )
        line["note"] = Note(text=note.text, signatures=(own, forged)).encode()
    else:
        other = next(p for p in WITNESSES if p != line["partner"])
        line["partner"] = other
    return index + 1


@pytest.mark.parametrize("how", ["own signature twice", "forged", "another partner"])
def test_a_false_cosignature_line_fails_with_witness_keys(
    env: Path, bundle: Path, tmp_path: Path, how: str
) -> None:
    objs = _lines(bundle)
    number = _tampered_cosignature(objs, how)
    target = _write(objs, env, tmp_path / "cosig.jsonl")
    code, stdout, stderr = _invoke(
        "audit", "verify", str(target), "--key", str(_pub(env)), *_witness_keys(env)
    )
    assert (code, stdout) == (1, "")
    assert stderr.startswith(f"FAIL {target}: line {number}: ")
    code, stdout, stderr = _invoke("audit", "verify", str(target), "--key", str(_pub(env)))
    if how == "own signature twice":  # the log's own line is no cosignature, keys or not
        assert code == 1
        assert f"line {number}: checkpoint of size 22 carries no cosignature of" in stderr
    else:
        assert code == 0, stderr
        assert "0 cosignatures verified with witness keys" in stdout


def test_a_bad_witness_key_is_an_operator_error(env: Path, bundle: Path) -> None:
    missing = env.parent / "nowhere.pub"
    code, stdout, stderr = _invoke(
        "audit",
        "verify",
        str(bundle),
        "--key",
        str(_pub(env)),
        "--witness-key",
        f"MX-ANAM={missing}",
    )
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: {missing}: public key: ")
    code, _, stderr = _invoke(
        "audit", "verify", str(bundle), "--key", str(_pub(env)), "--witness-key", "MX-ANAM"
    )
    assert code == 2
    assert "'MX-ANAM' is not PARTY=PATH" in stderr


def _copy_env(env: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "env"
    shutil.copytree(env.parent, root)
    return root / "gateway.toml", root / "c2c.db"


def _check(config: Path) -> tuple[int, str, str]:
    return _invoke("audit", "check", "--config", str(config), "--no-progress")


def test_a_consistently_rewritten_store_is_caught_by_its_cosigned_notes(
    env: Path, tmp_path: Path
) -> None:
    """Entry 5 rewritten with every leaf and node recomputed and the checkpoint rows dropped:
    the tree holds together, but the notes partners cosigned say otherwise."""
    config, db = _copy_env(env, tmp_path)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, entry FROM audit_entries ORDER BY seq").fetchall()
        entries = [bytes(e) for _, e in rows]
        entries[5] = entries[5].replace(b'"ACK"', b'"REWRITTEN"')
        conn.execute(
            "UPDATE audit_entries SET entry = ?, leaf_hash = ?, outcome = 'REWRITTEN' "
            "WHERE seq = 5",
            (entries[5], merkle.leaf_hash(entries[5])),
        )
        nodes = merkle.subtree_hashes([merkle.leaf_hash(e) for e in entries])
        conn.execute("DELETE FROM audit_nodes")
        conn.executemany(
            "INSERT INTO audit_nodes (level, idx, hash) VALUES (?, ?, ?)",
            [(level, idx, h) for (level, idx), h in nodes.items()],
        )
        conn.execute("DELETE FROM audit_checkpoints")
    conn.close()
    code, _, stderr = _check(config)
    assert code == 1
    for party in WITNESSES:
        for size in COSIGNED:
            assert (
                f"recomputed root of the first {size} entries differs from the checkpoint "
                f"cosigned by {party}"
            ) in stderr


def test_check_holds_the_tree_to_what_a_note_signs_not_its_row(env: Path, tmp_path: Path) -> None:
    """The size-10 note put into the latest row, whose columns still say the latest size."""
    config, db = _copy_env(env, tmp_path)
    with sqlite3.connect(db) as conn:
        (old,) = conn.execute("SELECT note FROM audit_checkpoints WHERE size = 10").fetchone()
        (latest,) = conn.execute("SELECT max(size) FROM audit_checkpoints").fetchone()
        conn.execute("UPDATE audit_checkpoints SET note = ? WHERE size = ?", (old, latest))
    conn.close()
    code, _, stderr = _check(config)
    assert code == 1
    assert (
        f"FAIL log: latest checkpoint: its row says size {latest} but its note is of size 10\n"
    ) in stderr
