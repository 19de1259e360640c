"""An oversight body's review of the audit tools, from the docs alone (real CLI, SQLite store).

A gateway that took a real partner message (signed, receipted) and queued one of its own,
stopped, then read as an auditor does: a checkpoint note kept with `jq -r` (one more
newline) and bad kept-note files (refused before anything runs, nothing recorded); one
message's bundle, its signed body and receipt checked with `sig verify`; `audit query`
saying there is more; tree nodes left past a truncated head; the wording of `audit verify`'s
failures (CRLF, a non-canonical line, order, the wrong key, advice for unfiltered bundles).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import rfc8785
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from outbound_env import gateway_config, start_gateway, submit_to
from test_api_audit import received

from gateway.audit import merkle
from gateway.audit.checkpoint import CheckpointBody, sign_checkpoint
from gateway.audit.events import AuditEvent, EventKind
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.crypto.notes import load_note_signer, note_signer, sign_note
from gateway.store import open_store

US_ORIGIN = "dev.c2c-gateway.invalid/US-CBP"
#: entries appended beyond the messages' own, so that a listing has more than a page
EXTRA = 110


@dataclass(frozen=True)
class Env:
    config: Path
    pki: Path
    inbound_id: str
    inbound_body: bytes
    outbound_id: str

    @property
    def db(self) -> Path:
        return self.config.parent / "c2c.db"

    def pub(self, party: str = "US-CBP", name: str = "audit.pub") -> Path:
        return self.pki / party / name


async def _populate(root: Path) -> Env:
    config = gateway_config(root, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})
    running = await start_gateway(config)
    try:
        message_id, body = await received(running, root)  # with our signed receipt
        outbound = await submit_to(running, "MX-ANAM")
        await running.gateway.store.append_audit(
            [
                AuditEvent(event=EventKind.QUERY, at=datetime.now(UTC), outcome=f"n{i}")
                for i in range(EXTRA)
            ]
        )
    finally:
        await running.gateway.stop()
    return Env(
        config=config.source,
        pki=root / "pki",
        inbound_id=message_id,
        inbound_body=body,
        outbound_id=outbound.message_id,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return asyncio.run(_populate(tmp_path_factory.mktemp("review")))


def _copy(env: Env, target: Path) -> Env:
    """The environment copied (the configuration's paths are relative): a store to damage."""
    shutil.copytree(env.config.parent.parent, target)
    return Env(
        config=target / env.config.parent.name / env.config.name,
        pki=target / "pki",
        inbound_id=env.inbound_id,
        inbound_body=env.inbound_body,
        outbound_id=env.outbound_id,
    )


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _export(env: Env, out: Path, *options: str) -> Path:
    code, _, stderr = _invoke(
        "audit", "export", "--config", str(env.config), "--out", str(out), *options
    )
    assert code == 0, stderr
    return out


def _verify(env: Env, bundle: Path, *options: str) -> tuple[int, str, str]:
    return _invoke("audit", "verify", str(bundle), "--key", str(env.pub()), *options)


def _lines(bundle: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in bundle.read_bytes().splitlines()]


def _reseal(objs: list[dict[str, object]], env: Env, target: Path) -> Path:
    """``objs`` (the old end line last, dropped) resealed with the log's own key."""
    body = b"".join(bytes(rfc8785.dumps(o)) + b"\n" for o in objs[:-1])
    signer = load_note_signer(env.pki / "US-CBP" / "audit.key", US_ORIGIN)
    digest = hashlib.sha256(body).hexdigest()
    text = f"c2c-audit-bundle/v1 {US_ORIGIN}\n{len(objs) - 1}\n{digest}\n"
    end = {"type": "end", "signature": sign_note(text, [signer])}
    target.write_bytes(body + bytes(rfc8785.dumps(end)) + b"\n")
    return target


def _size(bundle: Path) -> int:
    return int(str(_lines(bundle)[0]["checkpoint"]).split("\n")[1])


def _audit_size(env: Env) -> int:
    with sqlite3.connect(env.db) as conn:
        (size,) = conn.execute("SELECT size FROM audit_head").fetchone()
    conn.close()
    return int(size)


# ------------------------------------------- 1. a kept note as `jq -r` and editors save it


@pytest.mark.parametrize(
    "saved",
    [
        pytest.param(lambda note: note + "\n", id="jq-r"),
        pytest.param(lambda note: note + "\n \n\t\n\n", id="blank-lines"),
        pytest.param(lambda note: note.replace("\n", "\r\n"), id="crlf"),
    ],
)
def test_a_kept_note_saved_with_more_newlines_holds_against_later_bundles(
    env: Env, tmp_path: Path, saved: Callable[[str], str]
) -> None:
    first = _export(env, tmp_path / "b1.jsonl")
    note = str(_lines(first)[0]["checkpoint"])
    assert note.endswith("\n")
    assert not note.endswith("\n\n")
    kept = tmp_path / "b1.checkpoint"
    kept.write_bytes(saved(note).encode())
    later = _export(env, tmp_path / "b2.jsonl")
    code, stdout, stderr = _verify(env, later, "--checkpoint", str(kept))
    assert (code, stderr) == (0, ""), stderr
    assert f"; consistent with the kept checkpoint of size {_size(first)} (verified " in stdout
    code, stdout, stderr = _invoke(
        "audit", "check", "--config", str(env.config), "--trusted", str(kept), "--no-progress"
    )
    assert (code, stderr) == (0, ""), stderr
    assert stdout.startswith("OK ")


def _bad_notes(env: Env, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Kept-note files an auditor may get wrong: each path, and what is said of it."""
    stranger = note_signer(US_ORIGIN, Ed25519PrivateKey.generate())
    forged = sign_checkpoint(
        CheckpointBody(origin=US_ORIGIN, size=3, root_hash=merkle.leaf_hash(b"x")), stranger
    ).note
    files = {
        "garbage": ("not a note\n", "note has no blank line before its signatures"),
        "empty": ("\n\n", "empty or blank: it holds no note"),
        "other-key": (
            forged,
            f"note carries no signature by a known key (known: {US_ORIGIN} (",
        ),
        "latin1": ("caf\xe9\n", "the file is not UTF-8 text, so no checkpoint note"),
    }
    out: dict[str, tuple[Path, str]] = {}
    for name, (content, why) in files.items():
        path = tmp_path / f"{name}.checkpoint"
        path.write_bytes(content.encode("latin-1" if name == "latin1" else "utf-8"))
        out[name] = (path, why)
    out["missing"] = (tmp_path / "missing.checkpoint", "cannot read the checkpoint note: ")
    return out


def test_a_bad_trusted_note_is_a_usage_error_and_nothing_is_recorded(
    env: Env, tmp_path: Path
) -> None:
    for path, why in _bad_notes(env, tmp_path).values():
        before = _audit_size(env)
        code, stdout, stderr = _invoke(
            "audit", "check", "--config", str(env.config), "--trusted", str(path)
        )
        assert (code, stdout) == (2, ""), stderr
        assert stderr.startswith(f"error: --trusted {path}: "), stderr
        assert why in stderr, stderr
        assert "FAIL" not in stderr
        assert _audit_size(env) == before, "a refused --trusted file was recorded in the log"
    other_key = _bad_notes(env, tmp_path)["other-key"][0]
    code, _, stderr = _invoke(
        "audit", "check", "--config", str(env.config), "--trusted", str(other_key)
    )
    assert stderr.rstrip().endswith("signed by another key, or forged"), stderr


def test_a_bad_kept_note_for_verify_names_the_file(env: Env, tmp_path: Path) -> None:
    bundle = _export(env, tmp_path / "b.jsonl")
    for path, why in _bad_notes(env, tmp_path).values():
        code, stdout, stderr = _verify(env, bundle, "--checkpoint", str(path))
        assert (code, stdout) == (2, ""), stderr
        assert stderr.startswith(f"error: --checkpoint {path}: "), stderr
        assert why in stderr, stderr


# --------------------------------------------- 2. one message's bundle: body and receipt


def _message_lines(bundle: Path) -> list[dict[str, object]]:
    return [o for o in _lines(bundle) if o["type"] == "message"]


def _sig_verify(key: Path, body: bytes, jws: object, tmp_path: Path) -> tuple[int, str, str]:
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    return _invoke("sig", "verify", "--key", str(key), "--body", str(path), "--jws", str(jws))


def _query_seqs(env: Env, *options: str) -> list[int]:
    code, stdout, stderr = _invoke("audit", "query", "--config", str(env.config), *options)
    assert code == 0, stderr
    return [json.loads(line)["seq"] for line in stdout.splitlines()]


def test_a_message_export_holds_its_signed_body_and_receipt(env: Env, tmp_path: Path) -> None:
    bundle = _export(env, tmp_path / "message.jsonl", "--message-id", env.inbound_id)
    code, stdout, stderr = _verify(env, bundle)
    assert (code, stderr) == (0, ""), stderr
    seqs = _query_seqs(env, "--message-id", env.inbound_id)
    assert f": {len(seqs)} entries, 1 messages proven in checkpoint " in stdout
    objs = _lines(bundle)
    assert objs[0]["filter"] == {"message_ids": [env.inbound_id]}
    assert [o["seq"] for o in objs if o["type"] == "entry"] == seqs
    (message,) = _message_lines(bundle)
    assert (message["direction"], message["sender"], message["message_id"]) == (
        "inbound",
        "MX-ANAM",
        env.inbound_id,
    )
    body = base64.b64decode(str(message["body"]))
    assert body == env.inbound_body
    # the partner's signature over the wire bytes, and our receipt's, re-verified with the
    # signers' public keys
    code, stdout, stderr = _sig_verify(
        env.pub("MX-ANAM", "sign.pub"), body, message["signature"], tmp_path
    )
    assert (code, stderr) == (0, ""), stderr
    assert stdout.startswith("OK kid=")
    receipt = base64.b64decode(str(message["receipt_body"]))
    assert env.inbound_id in receipt.decode()
    code, stdout, stderr = _sig_verify(
        env.pub("US-CBP", "sign.pub"), receipt, message["receipt_signature"], tmp_path
    )
    assert (code, stderr) == (0, ""), stderr

    tampered_body = body.replace(b'"payload":{', b'"payload":{"x":1,', 1)
    assert tampered_body != body
    index = objs.index(message)
    objs[index] = {**message, "body": base64.b64encode(tampered_body).decode()}
    target = _reseal(objs, env, tmp_path / "tampered.jsonl")
    code, stdout, stderr = _verify(env, target)
    assert (code, stdout) == (1, "")
    assert stderr.startswith(
        f"FAIL {target}: line {index + 1}: message {env.inbound_id}: wire bytes do not match "
    ), stderr
    code, _, stderr = _sig_verify(
        env.pub("MX-ANAM", "sign.pub"), tampered_body, message["signature"], tmp_path
    )
    assert code == 1, stderr


def test_messages_of_both_directions_and_an_outbound_line_names_no_sender(
    env: Env, tmp_path: Path
) -> None:
    bundle = _export(
        env,
        tmp_path / "two.jsonl",
        "--message-id",
        env.outbound_id,
        "--message-id",
        env.inbound_id,
        "--message-id",
        env.outbound_id,
    )
    code, stdout, stderr = _verify(env, bundle)
    assert (code, stderr) == (0, ""), stderr
    assert ", 2 messages proven in checkpoint " in stdout
    assert _lines(bundle)[0]["filter"] == {"message_ids": sorted([env.inbound_id, env.outbound_id])}
    entries = [o for o in _lines(bundle) if o["type"] == "entry"]
    assert [o["seq"] for o in entries] == sorted(
        _query_seqs(env, "--message-id", env.inbound_id)
        + _query_seqs(env, "--message-id", env.outbound_id)
    )
    outbound = next(o for o in _message_lines(bundle) if o["direction"] == "outbound")
    assert "sender" not in outbound
    assert outbound["recipient"] == "MX-ANAM"
    body = base64.b64decode(str(outbound["body"]))
    code, _, stderr = _sig_verify(
        env.pub("US-CBP", "sign.pub"), body, outbound["signature"], tmp_path
    )
    assert code == 0, stderr


@pytest.mark.parametrize(
    ("filt", "why"),
    [
        ({"message_ids": ["0192f4d6-0000-7000-8000-000000000000"]}, "line 2: entry "),
        ({"message_ids": []}, "line 1: filter message_ids is not a non-empty list of strings"),
        ({"message_ids": "x"}, "line 1: filter message_ids is not a non-empty list of strings"),
    ],
)
def test_a_message_filter_the_bundle_does_not_hold_to_fails(
    env: Env, tmp_path: Path, filt: dict[str, object], why: str
) -> None:
    objs = _lines(_export(env, tmp_path / "m.jsonl", "--message-id", env.inbound_id))
    objs[0]["filter"] = filt
    target = _reseal(objs, env, tmp_path / "filter.jsonl")
    code, _, stderr = _verify(env, target)
    assert code == 1
    assert stderr.startswith(f"FAIL {target}: {why}"), stderr
    if filt["message_ids"] and isinstance(filt["message_ids"], list):
        assert "is outside the bundle's filter: its message_id is not " in stderr


# ---------------------------------------------------------- 3. audit query says there is more


def test_query_says_on_stderr_how_to_get_the_rest(env: Env) -> None:
    size = _audit_size(env)
    assert size > 100
    code, stdout, stderr = _invoke("audit", "query", "--config", str(env.config))
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["seq"] for r in rows] == list(range(100))
    assert stderr == "more: --after 99\n"
    rest = size - 100
    code, stdout, stderr = _invoke(
        "audit", "query", "--config", str(env.config), "--after", "99", "--limit", str(rest)
    )
    assert (code, stderr) == (0, "")
    assert len(stdout.splitlines()) == rest
    # the leaf hash is base64, as `audit proof` and the API give it
    code, stdout, _ = _invoke("audit", "proof", "--config", str(env.config), "--index", "7")
    assert rows[7]["leaf_hash"] == json.loads(stdout)["leaf_hash"]


# ------------------------------------------------ 4. tree nodes left beyond a truncated head


async def _append_one(config: Path) -> int:
    loaded = load_config(config)
    store = open_store(loaded.store_url, clock=SystemClock())
    await store.open()
    try:
        (seq,) = await store.append_audit(
            [AuditEvent(event=EventKind.QUERY, at=datetime.now(UTC), outcome="last")]
        )
    finally:
        await store.close()
    return seq


def test_nodes_left_beyond_a_truncated_head_are_a_problem(env: Env, tmp_path: Path) -> None:
    copy = _copy(env, tmp_path / "copy")
    code, _, stderr = _invoke("audit", "checkpoint", "--config", str(copy.config))
    assert code == 0, stderr
    last = asyncio.run(_append_one(copy.config))  # after the last checkpoint
    with sqlite3.connect(copy.db) as conn:
        conn.execute("DELETE FROM audit_entries WHERE seq = ?", (last,))
        conn.execute("UPDATE audit_head SET size = ?", (last,))
    conn.close()
    code, stdout, stderr = _invoke("audit", "check", "--config", str(copy.config), "--no-progress")
    assert (code, stdout) == (1, "")
    assert (
        f"FAIL entry {last}: the log holds tree nodes for entries beyond its head {last}: "
        "entries were removed\n"
    ) in stderr
    assert f"error: audit log check failed: 1 problem(s) in {last} entries" in stderr


# --------------------------------------------------------- 5. the words of audit verify


def test_an_unfiltered_bundle_is_not_told_to_be_exported_unfiltered(
    env: Env, tmp_path: Path
) -> None:
    first = _export(env, tmp_path / "b1.jsonl")
    kept = tmp_path / "b1.checkpoint"
    kept.write_text(str(_lines(first)[0]["checkpoint"]), encoding="utf-8")
    objs = _lines(_export(env, tmp_path / "b2.jsonl"))
    objs[3] = {**objs[3], "entry": base64.b64encode(b'{"event":"forged"}').decode()}
    target = _reseal(objs, env, tmp_path / "bad-entry.jsonl")
    code, stdout, stderr = _verify(env, target, "--checkpoint", str(kept))
    assert (code, stdout) == (1, "")
    size = _size(first)
    assert stderr.startswith(f"FAIL {target}: line 4: entry 2 is not in the checkpoint's tree: ")
    assert (
        f"FAIL {target}: kept checkpoint {kept} (size {size}) cannot be checked against this "
        f"bundle: not every entry below {size} is there and proven (see the failures above)\n"
    ) in stderr
    assert "--prove-from" not in stderr
    assert "export it unfiltered" not in stderr


def test_crlf_line_endings_are_named_once(env: Env, tmp_path: Path) -> None:
    bundle = _export(env, tmp_path / "b.jsonl")
    target = tmp_path / "crlf.jsonl"
    target.write_bytes(bundle.read_bytes().replace(b"\n", b"\r\n"))
    code, stdout, stderr = _verify(env, target)
    assert (code, stdout) == (1, "")
    assert stderr == (
        f"FAIL {target}: line 1: the bundle has CRLF line endings (converted in transfer?): its "
        "lines end with \\n alone; the rest is checked as if they did\n"
        f"error: {target}: verification failed (1 problem(s))\n"
    )


def test_a_non_canonical_line_is_not_also_a_missing_entry(env: Env, tmp_path: Path) -> None:
    bundle = _export(env, tmp_path / "b.jsonl")
    lines = bundle.read_bytes().splitlines(keepends=True)
    # line 6 holds entry 4, in JSON with spaces: the same object, not its canonical bytes
    assert json.loads(lines[5])["seq"] == 4
    lines[5] = json.dumps(json.loads(lines[5]), sort_keys=True).encode() + b"\n"
    target = tmp_path / "spaced.jsonl"
    target.write_bytes(b"".join(lines))
    code, stdout, stderr = _verify(env, target)
    assert (code, stdout) == (1, "")
    failures = stderr.splitlines()[:-1]
    assert failures == [
        f"FAIL {target}: line 6: line is not in RFC 8785 canonical form",
        f"FAIL {target}: line {len(lines)}: end signature does not cover these lines: the "
        "bundle was altered",
    ]


def test_failures_are_printed_in_line_order(env: Env, tmp_path: Path) -> None:
    objs = _lines(_export(env, tmp_path / "m.jsonl", "--message-id", env.inbound_id))
    index = next(i for i, o in enumerate(objs) if o["type"] == "message")
    objs[index] = {**objs[index], "body_digest": "sha-256:AAAA"}  # checked once all is read
    objs.insert(-1, {"type": "bogus"})  # after it, failed as it is read
    target = _reseal(objs, env, tmp_path / "two-failures.jsonl")
    code, _, stderr = _verify(env, target)
    assert code == 1
    numbers = [
        int(line.split(": line ", 1)[1].split(":", 1)[0])
        for line in stderr.splitlines()
        if ": line " in line
    ]
    assert numbers == [index + 1, len(objs) - 1], stderr


def test_the_wrong_key_names_the_key_found(env: Env, tmp_path: Path) -> None:
    bundle = _export(env, tmp_path / "b.jsonl")
    signer = load_note_signer(env.pki / "US-CBP" / "audit.key", US_ORIGIN)
    wrong = note_signer(
        US_ORIGIN, load_note_signer(env.pki / "MX-ANAM" / "audit.key", "x").private_key
    )
    code, _, stderr = _invoke("audit", "verify", str(bundle), "--key", str(env.pub("MX-ANAM")))
    assert code == 1
    assert (
        f"FAIL {bundle}: line 1: checkpoint: checkpoint signature: note carries no signature "
        f"by a known key (known: {US_ORIGIN} ({wrong.key_id:08x}); found: {US_ORIGIN} "
        f"({signer.key_id:08x})): signed by another key, or forged\n"
    ) in stderr


def test_check_names_the_trusted_file_the_log_contradicts(env: Env, tmp_path: Path) -> None:
    signer = load_note_signer(env.pki / "US-CBP" / "audit.key", US_ORIGIN)
    forged = tmp_path / "forged.checkpoint"
    forged.write_text(
        sign_checkpoint(
            CheckpointBody(origin=US_ORIGIN, size=5, root_hash=merkle.leaf_hash(b"x")), signer
        ).note,
        encoding="utf-8",
    )
    code, _, stderr = _invoke(
        "audit", "check", "--config", str(env.config), "--trusted", str(forged), "--no-progress"
    )
    assert code == 1
    assert f"differs from the trusted checkpoint {forged}" in stderr, stderr
    assert "trusted checkpoint 1" not in stderr
