"""The auditors' web page: served by the internal API over real TLS, and its client code
(run by Node.js, the very files the browser loads) checking a live gateway's log, including
a tampered entry, a forged earlier checkpoint and the wrong log key."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nodejs import run_script
from outbound_env import Running, client_ssl, token
from test_api_audit import submit

from gateway.api import console_routes as console
from gateway.api.audit import AUDIT_LOG
from gateway.audit import merkle
from gateway.audit.bundle import verify_bundle
from gateway.audit.checkpoint import CheckpointBody, sign_checkpoint
from gateway.audit.events import AuditEvent, EventKind
from gateway.crypto.notes import load_note_signer, load_note_verifier, note_signer
from gateway.store.base import AuditFilter

CSP = "default-src 'none'; script-src 'self'"


async def fetch(running: Running, path: str) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            running.api_url + path, ssl=client_ssl(running.config), allow_redirects=False
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_the_page_and_its_files_are_served_without_a_token(us: Running) -> None:
    status, headers, _ = await fetch(us, "/console")
    assert (status, headers["Location"]) == (308, "/console/")
    status, headers, page = await fetch(us, "/console/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith(CSP)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    html = page.decode()
    # what the page loads, and what those modules import, is all served from here
    wanted = set(re.findall(r'(?:src|href)="([^"]+)"', html))
    for name in list(wanted):
        if name.endswith(".js"):
            wanted |= set(re.findall(r'from "\./([^"]+)"', console.asset(name).decode()))
    assert wanted == {"console.css", "app.js", "client.js", "verify.js"}
    for name in wanted:
        status, headers, body = await fetch(us, f"/console/{name}")
        assert status == 200, name
        assert body == console.asset(name)
        assert headers["Content-Security-Policy"].startswith(CSP)
        expected = "text/css" if name.endswith(".css") else "text/javascript"
        assert headers["Content-Type"] == f"{expected}; charset=utf-8"
    for name in ("index.html", "..%2fapp.py", "nope.js"):
        status, headers, body = await fetch(us, f"/console/{name}")
        assert status == 404, name
        assert headers["Content-Type"] == "application/problem+json"


def test_every_element_the_script_uses_is_on_the_page() -> None:
    html = console.asset("index.html").decode()
    ids = set(re.findall(r'id="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', console.asset("app.js").decode()))
    assert used, "app.js looks elements up with $()"
    assert used <= ids, used - ids


def public_key_file(running: Running) -> Path:
    return running.config.audit.key.with_name("audit.pub")


async def drive(running: Running, tmp_path: Path, **plan: Any) -> dict[str, Any]:
    path = tmp_path / "plan.json"
    document = {
        "baseUrl": running.api_url,
        "token": token(running.config, ("audit:read",), subject="auditor-1"),
        "key": public_key_file(running).read_text(),
        **plan,
    }
    path.write_text(json.dumps(document))
    result: dict[str, Any] = await run_script(
        "live.mjs", str(path), extra_env={"NODE_EXTRA_CA_CERTS": str(running.config.tls.ca)}
    )
    return result


async def test_the_page_proves_every_entry_of_a_live_log(us: Running, tmp_path: Path) -> None:
    audit_log = us.api.app[AUDIT_LOG]
    for _ in range(3):
        await submit(us)
    old = await audit_log.checkpoint()
    for _ in range(4):
        await submit(us)
    current = await audit_log.checkpoint()
    await submit(us)  # after the checkpoint: its hash is checked, it cannot be proven yet
    bundle = tmp_path / "bundle.jsonl"
    result = await drive(us, tmp_path, old_notes=[old.note, current.note], bundle_path=str(bundle))

    assert result["checkpoint"] == {
        "origin": us.config.audit.origin,
        "size": current.size,
        "cosigners": 0,
    }
    entries = result["entries"]
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    assert {e["result"] for e in entries[: current.size]} == {"included"}
    assert {e["result"] for e in entries[current.size :]} == {"after checkpoint"}
    assert len(entries) > current.size > old.size > 0
    assert result["consistency"] == [
        {"ok": True, "oldSize": old.size},
        {"ok": True, "oldSize": current.size},
    ]
    report = verify_bundle(bundle, lambda origin: load_note_verifier(public_key_file(us), origin))
    assert report.ok, report.failures
    assert result["storeCheck"]["ok"] is True
    assert result["badToken"].startswith("ApiError: 401: ")
    # the export and the store check are the auditor's, recorded under their token's subject
    rows = await us.gateway.store.audit_entries(
        AuditFilter(event="operator_action"), after_seq=-1, limit=10
    )
    actions = [(orjson.loads(r.entry)["outcome"], orjson.loads(r.entry)["actor"]) for r in rows]
    assert actions == [("audit_export", "api:auditor-1"), ("audit_verify", "api:auditor-1")]


async def test_tampering_shows_on_the_page(us: Running, tmp_path: Path) -> None:
    await us.gateway.store.append_audit(
        [
            AuditEvent(event=EventKind.QUERY, at=us.gateway.clock.now(), outcome=f"n{i}")
            for i in range(20)
        ]
    )
    audit_log = us.api.app[AUDIT_LOG]
    old = await audit_log.checkpoint()
    # an earlier checkpoint of the same size with another root, signed by the log's key:
    # what a monitor holds when the history it saw was later rewritten
    signer = load_note_signer(us.config.audit.key, us.config.audit.origin)
    forged = sign_checkpoint(
        CheckpointBody(
            origin=us.config.audit.origin, size=old.size, root_hash=merkle.leaf_hash(b"x")
        ),
        signer,
    ).note
    smaller = sign_checkpoint(
        CheckpointBody(origin=us.config.audit.origin, size=5, root_hash=merkle.leaf_hash(b"y")),
        signer,
    ).note
    db = Path(str(us.config.store_url).removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        # entry 4 rewritten: its bytes no longer match its leaf hash
        conn.execute(
            "UPDATE audit_entries SET entry = CAST(REPLACE(CAST(entry AS TEXT), 'n4', 'n5')"
            " AS BLOB) WHERE seq = 4"
        )
        # entry 9 rewritten with a matching leaf hash: the tree's nodes no longer lead to it
        (raw,) = conn.execute("SELECT entry FROM audit_entries WHERE seq = 9").fetchone()
        new = bytes(raw).replace(b"n9", b"n0")
        conn.execute(
            "UPDATE audit_entries SET entry = ?, leaf_hash = ? WHERE seq = 9",
            (new, merkle.leaf_hash(new)),
        )
    result = await drive(us, tmp_path, old_notes=[forged, smaller])
    verdicts = {e["seq"]: e["result"] for e in result["entries"]}
    assert verdicts.pop(4) == "VerifyError: entry 4 does not hash to the leaf hash stored with it"
    assert verdicts.pop(9) == (
        f"VerifyError: inclusion proof of leaf 9 in tree size {old.size} leads to another root"
    )
    assert set(verdicts.values()) == {"included"}
    assert [c["ok"] for c in result["consistency"]] == [False, False]
    assert (
        result["consistency"][0]["error"]
        == f"VerifyError: two different roots for tree size {old.size}"
    )
    assert result["consistency"][1]["error"] == (
        "VerifyError: consistency proof does not lead to the old root of size 5"
    )


async def test_a_checkpoint_under_another_key_is_refused(us: Running, tmp_path: Path) -> None:
    await submit(us)
    await us.api.app[AUDIT_LOG].checkpoint()
    stranger = note_signer(us.config.audit.origin, Ed25519PrivateKey.generate()).verifier.vkey()
    result = await drive(us, tmp_path, key=stranger)
    assert result["checkpoint"]["error"].startswith(
        f"VerifyError: checkpoint carries no signature by the log key {us.config.audit.origin}"
    )
    # without a verified checkpoint nothing is shown as proven; hashes are still checked
    assert {e["result"] for e in result["entries"]} == {"after checkpoint"}


async def visit(running: Running, tmp_path: Path, **plan: Any) -> dict[str, Any]:
    """The page itself (app.js) opened on ``running``; local storage lasts across visits."""
    path = tmp_path / "page.json"
    document = {
        "baseUrl": running.api_url,
        "token": token(running.config, ("audit:read",), subject="auditor-1"),
        "key": public_key_file(running).read_text(),
        "storage": str(tmp_path / "local-storage.json"),
        **plan,
    }
    path.write_text(json.dumps(document))
    result: dict[str, Any] = await run_script(
        "page.mjs", str(path), extra_env={"NODE_EXTRA_CA_CERTS": str(running.config.tls.ca)}
    )
    return result


async def queries(running: Running, count: int, event: EventKind = EventKind.QUERY) -> None:
    await running.gateway.store.append_audit(
        [
            AuditEvent(event=event, at=running.gateway.clock.now(), outcome=f"q{i}")
            for i in range(count)
        ]
    )


PROVEN = {"proof": "✓ included in the checkpoint", "kind": "ok"}
AFTER = {"proof": "not proven: after the checkpoint", "kind": "warn"}
NO_CHECKPOINT = {"proof": "not proven: no verified checkpoint", "kind": "warn"}


def verdict(row: dict[str, Any]) -> dict[str, Any]:
    return {"proof": row["proof"], "kind": row["kind"]}


async def test_the_page_counts_proven_entries_apart_from_unproven_ones(
    us: Running, tmp_path: Path
) -> None:
    await queries(us, 5)
    size = await us.gateway.store.audit_size()
    page = await visit(us, tmp_path)
    # no checkpoint signed yet: nothing is proven, and the page does not say otherwise
    assert page["checkpoint-status"]["kind"] == "status warn"
    assert [verdict(r) for r in page["rows"]] == [NO_CHECKPOINT] * size
    assert page["entries-status"] == {
        "text": f"{size} entries shown: {size} not proven (no verified checkpoint).",
        "kind": "status warn",
    }

    checkpoint = await us.api.app[AUDIT_LOG].checkpoint()
    await queries(us, 2)
    page = await visit(us, tmp_path)
    assert [r["seq"] for r in page["rows"]] == list(range(checkpoint.size + 2))
    assert [verdict(r) for r in page["rows"]] == [PROVEN] * checkpoint.size + [AFTER] * 2
    assert page["entries-status"] == {
        "text": f"{checkpoint.size + 2} entries shown: {checkpoint.size} proven against the"
        " signed checkpoint, 2 after it (not yet provable).",
        "kind": "status warn",
    }

    await us.api.app[AUDIT_LOG].checkpoint()
    page = await visit(us, tmp_path)
    assert page["monitor-status"]["kind"] == "status ok"
    assert page["entries-status"] == {
        "text": f"{checkpoint.size + 2} entries shown: {checkpoint.size + 2} proven against"
        " the signed checkpoint.",
        "kind": "status ok",
    }


async def test_an_old_entry_moved_past_the_checkpoint_is_not_shown_as_checked(
    us: Running, tmp_path: Path
) -> None:
    """A dishonest gateway rewrites entry 1 and gives it the checkpoint's size as position,
    where no inclusion proof can be asked for."""
    await queries(us, 10)
    size = (await us.api.app[AUDIT_LOG].checkpoint()).size
    await queries(us, 1, EventKind.OPERATOR_ACTION)

    # in its place in the full listing: after the checkpoint, yet before entries it covers
    page = await visit(us, tmp_path, tamper="shift")
    rows = page["rows"]
    assert [r["seq"] for r in rows] == [0, size, *range(2, size + 1)]
    assert (rows[1]["outcome"], verdict(rows[1])) == (
        "REWRITTEN",
        {
            "proof": f"✗ out of order: placed after the checkpoint (size {size}), yet listed"
            " before entry 2, which it covers",
            "kind": "bad",
        },
    )
    assert verdict(rows[2]) == {
        "proof": "✗ entry 1 is missing from the listing with no filter",
        "kind": "bad",
    }
    assert [verdict(r) for r in rows[3:]] == [PROVEN] * (size - 3) + [AFTER]
    assert page["entries-status"] == {
        "text": f"{size + 1} entries shown: 2 FAILED verification, {size - 2} proven against"
        " the signed checkpoint, 1 after it (not yet provable).",
        "kind": "status bad",
    }

    # moved to the end of the full listing: the gap it leaves shows
    page = await visit(us, tmp_path, tamper="shift_last")
    rows = page["rows"]
    assert [r["seq"] for r in rows] == [0, *range(2, size + 1), size]
    assert verdict(rows[1]) == {
        "proof": "✗ entry 1 is missing from the listing with no filter",
        "kind": "bad",
    }
    assert page["entries-status"]["kind"] == "status bad"

    # moved to the end of a filtered listing, where gaps are expected: shown as unproven, and
    # counted apart from the proven entries
    page = await visit(us, tmp_path, tamper="shift_last", filters={"event": "query"})
    rows = page["rows"]
    assert [r["seq"] for r in rows] == [0, *range(2, size), size]
    assert rows[-1]["outcome"] == "REWRITTEN"
    assert [verdict(r) for r in rows] == [PROVEN] * (size - 1) + [AFTER]
    assert page["entries-status"] == {
        "text": f"{size} entries shown: {size - 1} proven against the signed checkpoint,"
        " 1 after it (not yet provable).",
        "kind": "status warn",
    }


async def test_pages_loaded_while_proofs_are_checked_keep_the_listing_in_order(
    us: Running, tmp_path: Path
) -> None:
    """The gateway answers each inclusion proof slowly, so the auditor acts while the page is
    still checking: "Load more" once, then double-clicked, then a search."""
    await queries(us, 60)
    size = (await us.api.app[AUDIT_LOG].checkpoint()).size
    await queries(us, 2, EventKind.OPERATOR_ACTION)
    total = size + 2
    assert 50 < total < 100  # two pages of 50
    everything = {
        "text": f"{total} entries shown: {size} proven against the signed checkpoint, 2 after"
        " it (not yet provable).",
        "kind": "status warn",
    }

    # page 2 comes while page 1 is checked: its rows are still listed after page 1's
    page = await visit(us, tmp_path, proofDelay=40, steps=[{"checked": 10, "do": "more"}])
    assert [r["seq"] for r in page["rows"]] == list(range(total))
    assert [verdict(r) for r in page["rows"]] == [PROVEN] * size + [AFTER] * 2
    assert page["entries-status"] == everything
    assert page["more"] == {"hidden": True, "disabled": False}

    # a double click asks for page 2 once
    page = await visit(us, tmp_path, proofDelay=40, steps=[{"checked": 0, "do": "more_twice"}])
    assert [r["seq"] for r in page["rows"]] == list(range(total))
    assert [verdict(r) for r in page["rows"]] == [PROVEN] * size + [AFTER] * 2
    assert page["entries-status"] == everything

    # a search while the full listing is checked, or while its page 2 loads: the listing it
    # replaced keeps quiet, and its page 2 is not added to the search's rows
    search = {"checked": 0, "do": "filter", "filters": {"event": "operator_action"}}
    searched = {
        "text": "2 entries shown: 0 proven against the signed checkpoint, 2 after it"
        " (not yet provable).",
        "kind": "status warn",
    }
    for steps in ([{**search, "checked": 10}], [{"checked": 10, "do": "more"}, search]):
        page = await visit(us, tmp_path, proofDelay=40, steps=steps)
        assert [r["seq"] for r in page["rows"]] == [size, size + 1], steps
        assert [verdict(r) for r in page["rows"]] == [AFTER] * 2
        assert page["entries-status"] == searched
        assert page["more"] == {"hidden": True, "disabled": False}


async def test_a_checkpoint_hidden_since_the_last_visit_shows_in_red(
    us: Running, tmp_path: Path
) -> None:
    await queries(us, 3)
    size = (await us.api.app[AUDIT_LOG].checkpoint()).size
    page = await visit(us, tmp_path)
    assert page["checkpoint-status"]["kind"] == "status ok"
    assert page["kept"] == [size]

    page = await visit(us, tmp_path, tamper="no_checkpoint")
    assert page["checkpoint-status"] == {
        "text": f"The gateway shows no checkpoint, yet this browser verified a checkpoint of"
        f" size {size} on an earlier visit: the log's history is hidden or lost. No entry can"
        " be proven.",
        "kind": "status bad",
    }
    assert page["monitor-status"]["kind"] == "status bad"
    assert page["monitor-status"]["text"].startswith(
        f"NOT consistent with your last visit: the checkpoint of size {size} signed at "
    )
    assert page["kept"] == [size]  # the evidence stays
    assert {verdict(r)["proof"] for r in page["rows"]} == {NO_CHECKPOINT["proof"]}
    shown = len(page["rows"])
    assert page["entries-status"] == {
        "text": f"{shown} entries shown: {shown} not proven (no verified checkpoint), and the"
        " log's history does not match your earlier visit (see the checkpoint).",
        "kind": "status bad",
    }

    # the gateway shows its checkpoint again: consistent with the one kept
    page = await visit(us, tmp_path)
    assert page["monitor-status"]["kind"] == "status ok"
