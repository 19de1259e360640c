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
