"""The auditor's findings against `audit export` / `audit verify` (real CLI, SQLite store).

Bundles are tampered the way the log key's holder could: edited, then resealed with the log's
own key. Covered: a partner given a witness key with no cosignature line (F2); entries
withheld from an unfiltered bundle and entries outside the recorded filter (F3); a checkpoint
note the auditor kept from an earlier bundle, against a forked log, a shrunk log and filtered
bundles with and without ``--prove-from`` (F1); the log's own signature relabelled as a
partner's cosignature (F6); sub-millisecond ``--since``/``--until`` (F7); an export of a log
whose entries do not match its tree (F8).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
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

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
#: one entry's time has sub-millisecond digits: its entry says .247Z, its row .247500
SUB_MS_AT = T0 + timedelta(minutes=35, microseconds=247_500)
SUB_MS_SEQ = 30
CASE = "0192f4d6-0000-7000-8000-00000000ca5e"
US_ORIGIN = "dev.c2c-gateway.invalid/US-CBP"
WITNESSES = ("MX-ANAM", "CA-CBSA")


def _event(i: int, at: datetime) -> AuditEvent:
    return AuditEvent(
        event=EventKind.ACCEPTED,
        at=at,
        message_id=f"msg-{i}",
        sender="MX-ANAM",
        recipient="US-CBP",
        message_type="shipment.manifest",
        correlation_id=CASE if i % 5 == 0 else None,
        outcome="ACK",
    )


async def _populate(config_path: Path) -> None:
    """30 entries, one per minute (every fifth of case CASE), both partners cosigning the
    tree at size 10 and again at size 20 (each received cosignature is an entry too), then
    the sub-millisecond entry."""
    config = load_config(config_path)
    pki = config_path.parent
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        audit = AuditLog(
            store, signer=load_note_signer(config.audit.key, US_ORIGIN), clock=SystemClock()
        )
        seq = 0
        while seq < SUB_MS_SEQ:
            await store.append_audit([_event(seq, T0 + timedelta(minutes=seq))])
            seq = await store.audit_size()
            if seq in (10, 20):
                checkpoint = await audit.checkpoint()
                for party in WITNESSES:
                    origin = f"dev.c2c-gateway.invalid/{party}"
                    key = pki / party / "audit.key"
                    cosigner = load_note_signer(key, origin, cosignature=True)
                    note = cosign(checkpoint.note, cosigner, timestamp=1_750_000_000 + seq)
                    verifier = load_note_verifier(
                        key.with_name("audit.pub"), origin, cosignature=True
                    )
                    await audit.accept_cosignature(party, note, verifier)
                seq = await store.audit_size()
        assert seq == SUB_MS_SEQ, seq
        await store.append_audit([_event(seq, SUB_MS_AT)])
    finally:
        await store.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The populated environment, never exported from: tests work on copies of it."""
    config_path = prepare_dev_environment(tmp_path_factory.mktemp("bundle-auditor-base"))
    asyncio.run(_populate(config_path))
    return config_path


def _copy(base: Path, target: Path) -> Path:
    shutil.copytree(base.parent, target)
    return target / base.name


@pytest.fixture(scope="module")
def env(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy(base, tmp_path_factory.mktemp("bundle-auditor") / "env")


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _pub(env: Path, party: str = "US-CBP") -> Path:
    return env.parent / party / "audit.pub"


def _witness_keys(env: Path) -> list[str]:
    return [arg for p in WITNESSES for arg in ("--witness-key", f"{p}={_pub(env, p)}")]


def _export(env: Path, out: Path, *options: str) -> Path:
    code, _, stderr = _invoke("audit", "export", "--config", str(env), "--out", str(out), *options)
    assert code == 0, stderr
    return out


def _verify(env: Path, bundle: Path, *options: str) -> tuple[int, str, str]:
    return _invoke("audit", "verify", str(bundle), "--key", str(_pub(env)), *options)


@pytest.fixture(scope="module")
def bundle(env: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(env, tmp_path_factory.mktemp("bundles") / "all.jsonl")


def _lines(bundle: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in bundle.read_bytes().splitlines()]


def _reseal(objs: list[dict[str, object]], env: Path, target: Path) -> Path:
    """``objs`` (the old end line last, dropped) resealed with the log's own key."""
    body = b"".join(bytes(rfc8785.dumps(o)) + b"\n" for o in objs[:-1])
    signer = load_note_signer(env.parent / "US-CBP" / "audit.key", US_ORIGIN)
    text = f"c2c-audit-bundle/v1 {US_ORIGIN}\n{len(objs) - 1}\n{hashlib.sha256(body).hexdigest()}\n"
    end = {"type": "end", "signature": sign_note(text, [signer])}
    target.write_bytes(body + bytes(rfc8785.dumps(end)) + b"\n")
    return target


def _size(bundle: Path) -> int:
    return int(str(_lines(bundle)[0]["checkpoint"]).split("\n")[1])


def _keep(bundle: Path, target: Path) -> Path:
    """The auditor keeps the bundle's checkpoint note."""
    target.write_text(str(_lines(bundle)[0]["checkpoint"]), encoding="utf-8")
    return target


# ------------------------------------------------------------------ F2: witnesses required


@pytest.mark.parametrize("stripped", [WITNESSES, ("CA-CBSA",)])
def test_a_witness_key_without_its_cosignature_line_fails(
    env: Path, bundle: Path, tmp_path: Path, stripped: tuple[str, ...]
) -> None:
    objs = [
        o for o in _lines(bundle) if not (o["type"] == "cosignature" and o["partner"] in stripped)
    ]
    target = _reseal(objs, env, tmp_path / "stripped.jsonl")
    code, stdout, stderr = _verify(env, target, *_witness_keys(env))
    assert (code, stdout) == (1, "")
    for party in WITNESSES:
        assert (f"FAIL {target}: no cosignature of {party} in the bundle\n" in stderr) == (
            party in stripped
        )
    # without witness keys nothing is asked of the partners: the lines left are "not checked"
    code, stdout, stderr = _verify(env, target)
    assert code == 0, stderr
    assert "0 cosignatures verified with witness keys" in stdout


def test_every_witness_key_with_its_cosignature_verifies(env: Path, bundle: Path) -> None:
    code, stdout, stderr = _verify(env, bundle, *_witness_keys(env))
    assert code == 0, stderr
    assert "; 2 cosignatures verified with witness keys (verified " in stdout


# ------------------------------------------------- F3: completeness and the recorded filter


def _without_seq(objs: list[dict[str, object]], seq: int) -> list[dict[str, object]]:
    return [o for o in objs if not (o["type"] == "entry" and o["seq"] == seq)]


def test_an_entry_withheld_from_an_unfiltered_bundle_fails(
    env: Path, bundle: Path, tmp_path: Path
) -> None:
    objs = _lines(bundle)
    assert objs[0]["filter"] == {}
    target = _reseal(_without_seq(objs, 5), env, tmp_path / "middle.jsonl")
    code, stdout, stderr = _verify(env, target, *_witness_keys(env))
    assert (code, stdout) == (1, "")
    # the entry after the gap is on line 7 (header, entries 0-4)
    assert stderr.startswith(
        f"FAIL {target}: line 7: entry 5 is missing: an unfiltered bundle holds every entry "
        f"from 0 to {_size(bundle) - 1}\n"
    )


def test_a_missing_tail_of_an_unfiltered_bundle_fails(
    env: Path, bundle: Path, tmp_path: Path
) -> None:
    last = _size(bundle) - 1
    target = _reseal(_without_seq(_lines(bundle), last), env, tmp_path / "tail.jsonl")
    code, stdout, stderr = _verify(env, target)
    assert (code, stdout) == (1, "")
    assert (
        f"FAIL {target}: entry {last} is missing: an unfiltered bundle holds every entry "
        f"from 0 to {last}\n"
    ) in stderr


@pytest.mark.parametrize(
    ("filt", "first_bad", "why"),
    [
        ({"correlation_id": CASE}, 1, f"its correlation_id is not {CASE}"),
        (
            {"until": "2025-06-01T12:05:00.000Z"},
            5,
            "its time 2025-06-01T12:05:00.000Z is not before",
        ),
        ({"since": "2025-06-01T12:01:00.000Z"}, 0, "its time 2025-06-01T12:00:00.000Z is before"),
    ],
)
def test_entries_outside_the_recorded_filter_fail(
    env: Path, bundle: Path, tmp_path: Path, filt: dict[str, str], first_bad: int, why: str
) -> None:
    objs = _lines(bundle)
    objs[0]["filter"] = filt
    target = _reseal(objs, env, tmp_path / "filter.jsonl")
    code, stdout, stderr = _verify(env, target)
    assert (code, stdout) == (1, "")
    first = stderr.splitlines()[0]
    assert first.startswith(
        f"FAIL {target}: line {first_bad + 2}: entry {first_bad} is outside the bundle's filter: "
        f"{why}"
    ), first


@pytest.mark.parametrize(
    "filt",
    [{"since": "yesterday"}, {"until": None}, {"partner": "MX-ANAM"}, {"correlation_id": 5}],
)
def test_a_filter_verify_cannot_read_fails_the_header(
    env: Path, bundle: Path, tmp_path: Path, filt: dict[str, object]
) -> None:
    objs = _lines(bundle)
    objs[0]["filter"] = filt
    target = _reseal(objs, env, tmp_path / "filter.jsonl")
    code, _, stderr = _verify(env, target)
    assert code == 1
    assert stderr.startswith(f"FAIL {target}: line 1: filter")


def test_filtered_exports_verify(env: Path, tmp_path: Path) -> None:
    case = _export(env, tmp_path / "case.jsonl", "--correlation-id", CASE)
    ranged = _export(
        env,
        tmp_path / "range.jsonl",
        "--since",
        "2025-06-01T12:03:00Z",
        "--until",
        "2025-06-01T12:09:00Z",
    )
    for target in (case, ranged):
        code, _, stderr = _verify(env, target, *_witness_keys(env))
        assert code == 0, stderr
    seqs = [o["seq"] for o in _lines(ranged) if o["type"] == "entry"]
    assert seqs == [3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------ F1: kept checkpoints, forks


def _fork(config: Path, *, drop_cosignatures: bool = True) -> None:
    """Entry 5 rewritten, every node recomputed, the signed checkpoints and cosignatures
    dropped: the insider's store holds together and exports again."""
    with sqlite3.connect(config.parent / "c2c.db") as conn:
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
        if drop_cosignatures:
            conn.execute("DELETE FROM audit_cosignatures")
    conn.close()


@pytest.fixture(scope="module")
def kept(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(the honest log's config, the note the auditor kept from its first export, its size)."""
    work = tmp_path_factory.mktemp("kept")
    honest = _copy(base, work / "honest")
    first = _export(honest, work / "first.jsonl")
    return honest, _keep(first, work / "first.checkpoint"), _size(first)


def test_later_bundles_of_the_honest_log_are_consistent_with_the_kept_note(
    kept: tuple[Path, Path, int], tmp_path: Path
) -> None:
    honest, note, size = kept
    later = _export(honest, tmp_path / "later.jsonl")
    case = _export(
        honest, tmp_path / "case.jsonl", "--correlation-id", CASE, "--prove-from", str(size)
    )
    assert size < _size(later) < _size(case)
    for target in (later, case):
        code, stdout, stderr = _verify(honest, target, "--checkpoint", str(note))
        assert code == 0, stderr
        assert f"; consistent with the kept checkpoint of size {size} (verified " in stdout
    consistency = [o for o in _lines(case) if o["type"] == "consistency"]
    assert [o["old_size"] for o in consistency] == [size]


def test_a_filtered_bundle_without_a_proof_cannot_be_held_to_a_kept_note(
    kept: tuple[Path, Path, int], tmp_path: Path
) -> None:
    honest, note, size = kept
    case = _export(honest, tmp_path / "case.jsonl", "--correlation-id", CASE)
    code, stdout, stderr = _verify(honest, case, "--checkpoint", str(note))
    assert (code, stdout) == (1, "")
    assert (
        f"FAIL {case}: kept checkpoint {note} (size {size}) cannot be checked against this "
        f"filtered bundle: it holds not every proven entry below {size} and no consistency "
        f"proof from {size}; export it unfiltered or with --prove-from {size}\n"
    ) == stderr.splitlines(keepends=True)[0]


def test_a_forked_log_contradicts_the_kept_note(
    base: Path, kept: tuple[Path, Path, int], tmp_path: Path
) -> None:
    _, note, size = kept
    forked = _copy(base, tmp_path / "forked")
    _fork(forked)
    same = _export(forked, tmp_path / "same.jsonl")
    code, _, stderr = _invoke("audit", "check", "--config", str(forked), "--no-progress")
    assert code == 0, stderr  # the insider's store holds together (and records the check)
    bigger = _export(forked, tmp_path / "bigger.jsonl")
    proven = _export(
        forked, tmp_path / "proven.jsonl", "--correlation-id", CASE, "--prove-from", str(size)
    )
    assert _size(same) == size < _size(bigger) < _size(proven)
    for target in (same, bigger, proven):  # each verifies on its own
        code, _, stderr = _verify(forked, target)
        assert code == 0, stderr
    code, stdout, stderr = _verify(forked, same, "--checkpoint", str(note))
    assert (code, stdout) == (1, "")
    assert (
        f"FAIL {same}: kept checkpoint {note} (size {size}): fork: the bundle's checkpoint "
        f"has the same size and another root\n"
    ) in stderr
    code, stdout, stderr = _verify(forked, bigger, "--checkpoint", str(note))
    assert (code, stdout) == (1, "")
    assert (
        f"FAIL {bigger}: kept checkpoint {note} (size {size}): fork: the root of the bundle's "
        f"first {size} entries is not the kept root\n"
    ) in stderr
    code, stdout, stderr = _verify(forked, proven, "--checkpoint", str(note))
    assert (code, stdout) == (1, "")
    # (from a power-of-two size the kept root is the proof's first hash: the new root fails)
    assert (
        f"FAIL {proven}: kept checkpoint {note} (size {size}): fork: consistency proof does "
        f"not lead to the "
    ) in stderr


def test_a_kept_note_larger_than_the_bundle_means_the_log_shrank(
    base: Path, kept: tuple[Path, Path, int], tmp_path: Path
) -> None:
    honest, _, size = kept
    older = _export(_copy(base, tmp_path / "older"), tmp_path / "older.jsonl")
    later = _export(honest, tmp_path / "later.jsonl")
    later_note = _keep(later, tmp_path / "later.checkpoint")
    code, stdout, stderr = _verify(honest, older, "--checkpoint", str(later_note))
    assert (code, stdout) == (1, "")
    assert (
        f"FAIL {older}: kept checkpoint {later_note} (size {_size(later)}) is larger than the "
        f"bundle's checkpoint (size {_size(older)}): the log shrank\n"
    ) in stderr
    assert _size(older) == size


def test_a_kept_note_the_key_did_not_sign_is_an_operator_error(
    env: Path, bundle: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.checkpoint"
    bad.write_text("not a note\n", encoding="utf-8")
    code, stdout, stderr = _verify(env, bundle, "--checkpoint", str(bad))
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: --checkpoint {bad}: ")


def test_prove_from_beyond_the_log_is_refused(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    code, _, stderr = _invoke(
        "audit", "export", "--config", str(env), "--out", str(out), "--prove-from", "100000"
    )
    assert code == 2
    assert "no consistency proof from size 100000" in stderr
    assert not out.exists()
    assert not out.with_name("x.jsonl.partial").exists()


# ------------------------------------------------------------------ F6: the log's own key


def test_the_logs_own_signature_under_a_partners_name_is_no_cosignature(
    env: Path, bundle: Path, tmp_path: Path
) -> None:
    objs = _lines(bundle)
    index = next(i for i, o in enumerate(objs) if o["type"] == "cosignature")
    note = parse_note(str(objs[index]["note"]))
    own, partner_sig = note.signatures
    relabelled = NoteSignature(name=partner_sig.name, key_id=own.key_id, signature=own.signature)
    objs[index]["note"] = Note(text=note.text, signatures=(own, relabelled)).encode()
    target = _reseal(objs, env, tmp_path / "relabelled.jsonl")
    code, stdout, stderr = _verify(env, target)
    assert (code, stdout) == (1, "")
    assert stderr.startswith(
        f"FAIL {target}: line {index + 1}: checkpoint of size 20 carries no cosignature of "
        f"{objs[index]['partner']}\n"
    )


# ------------------------------------------------------------- F7: sub-millisecond bounds


def _query_seqs(env: Path, *options: str) -> list[int]:
    code, stdout, stderr = _invoke("audit", "query", "--config", str(env), *options)
    assert code == 0, stderr
    return [json.loads(line)["seq"] for line in stdout.splitlines()]


@pytest.mark.parametrize("fraction", ["247001", "247000001", "2471"])
def test_sub_millisecond_bounds_are_rounded_up(env: Path, fraction: str) -> None:
    bound = f"2025-06-01T12:35:00.{fraction}Z"
    # the entry says 12:35:00.247Z: not at or after the bound, but before it
    assert SUB_MS_SEQ not in _query_seqs(env, "--since", bound)
    assert SUB_MS_SEQ in _query_seqs(env, "--until", bound, "--since", "2025-06-01T12:30:00Z")
    exact = "2025-06-01T12:35:00.247Z"
    assert SUB_MS_SEQ in _query_seqs(env, "--since", exact)
    assert SUB_MS_SEQ not in _query_seqs(env, "--until", exact, "--since", "2025-06-01T12:30:00Z")


def test_an_export_records_the_rounded_bounds_it_applied(env: Path, tmp_path: Path) -> None:
    out = _export(
        env,
        tmp_path / "sub.jsonl",
        "--since",
        "2025-06-01T12:29:00.000500Z",
        "--until",
        "2025-06-01T12:35:00.247001Z",
    )
    objs = _lines(out)
    assert objs[0]["filter"] == {
        "since": "2025-06-01T12:29:00.001Z",
        "until": "2025-06-01T12:35:00.248Z",
    }
    assert [o["seq"] for o in objs if o["type"] == "entry"] == [SUB_MS_SEQ]
    code, _, stderr = _verify(env, out)
    assert code == 0, stderr


def test_help_says_bounds_are_rounded_up() -> None:
    for command in ("query", "export"):
        code, stdout, _ = _invoke("audit", command, "--help")
        assert code == 0
        assert "rounded up to the next millisecond" in " ".join(stdout.split())


# --------------------------------------------------------- F8: no bundle that cannot verify


def test_an_export_of_entries_that_do_not_match_the_tree_fails(base: Path, tmp_path: Path) -> None:
    config = _copy(base, tmp_path / "env")
    with sqlite3.connect(config.parent / "c2c.db") as conn:
        (entry,) = conn.execute("SELECT entry FROM audit_entries WHERE seq = 7").fetchone()
        changed = bytes(entry).replace(b'"ACK"', b'"REWRITTEN"')
        conn.execute(
            "UPDATE audit_entries SET entry = ?, leaf_hash = ? WHERE seq = 7",
            (changed, merkle.leaf_hash(changed)),
        )
    conn.close()
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"an earlier bundle\n")
    code, stdout, stderr = _invoke("audit", "export", "--config", str(config), "--out", str(out))
    assert code != 0
    assert stdout == ""
    # every proof over the changed leaf fails: the first bad seq is named
    assert stderr.startswith("error: entry 0 is not in the tree of the checkpoint of size ")
    assert "audit check" in stderr
    assert out.read_bytes() == b"an earlier bundle\n"  # not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env", "out.jsonl"]


def test_an_export_whose_cosignatures_the_tree_contradicts_fails(
    base: Path, tmp_path: Path
) -> None:
    """The fork above with the partners' cosignatures left in the store: no consistency proof
    from their cosigned trees exists, and the export says so instead of writing it."""
    config = _copy(base, tmp_path / "env")
    _fork(config, drop_cosignatures=False)
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = _invoke("audit", "export", "--config", str(config), "--out", str(out))
    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: the checkpoint of size 20 cosigned by CA-CBSA is not a prefix")
    assert "audit check" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]
