"""The auditors' web page: served by the internal API over real TLS, and its client code
(run by Node.js, the very files the browser loads) checking a live gateway's log, including
a tampered entry, a forged earlier checkpoint and the wrong log key."""

from __future__ import annotations

import base64
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
from test_api_audit import cosigned_by, get, partner_audit_key, submit

from gateway.api import console_routes as console
from gateway.api.audit import AUDIT_LOG
from gateway.audit import merkle
from gateway.audit.bundle import verify_bundle
from gateway.audit.checkpoint import CheckpointBody, sign_checkpoint
from gateway.audit.events import AuditEvent, EventKind
from gateway.crypto.notes import (
    NoteSigner,
    load_note_signer,
    load_note_verifier,
    note_signer,
    public_key_pem,
)
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
        "origin": running.config.audit.origin,
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
    # the last as an auditor saved it with `jq -r` (one more newline) and pasted it
    notes = [old.note, current.note, old.note + "\n"]
    result = await drive(us, tmp_path, old_notes=notes, bundle_path=str(bundle))

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
        {"ok": True, "oldSize": old.size},
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
        "origin": running.config.audit.origin,
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


async def test_an_entry_the_search_did_not_ask_for_is_shown_as_failed(
    us: Running, tmp_path: Path
) -> None:
    """A dishonest gateway slips a real entry, with its valid proof, into the answer to a
    search it does not match (another message's entry in a message's trail)."""
    await queries(us, 3)
    await queries(us, 1, EventKind.OPERATOR_ACTION)
    await us.api.app[AUDIT_LOG].checkpoint()
    page = await visit(us, tmp_path, tamper="unmatched", filters={"event": "query"})
    rows = page["rows"]
    [stranger] = [r for r in rows if r["event"] != "query"]
    assert verdict(stranger) == {
        "proof": f"✗ not what the search asked for: its event is {stranger['event']}, not query",
        "kind": "bad",
    }
    assert [verdict(r) for r in rows if r is not stranger] == [PROVEN] * 3
    assert page["entries-status"]["text"].startswith("4 entries shown: 1 FAILED verification")


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


def forge(note: str, name: str) -> str:
    """``note`` with one bit of ``name``'s signature flipped (its key id kept)."""
    text, block = note.split("\n\n")
    lines = []
    for line in block.rstrip("\n").split("\n"):
        _, line_name, blob = line.split(" ")
        if line_name == name:
            raw = base64.b64decode(blob)
            forged = base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode()
            line = f"\u2014 {line_name} {forged}"
        lines.append(line)
    return text + "\n\n" + "\n".join(lines) + "\n"


def witness_keys(keys: dict[str, NoteSigner]) -> str:
    """The page's partners' keys field: MX-ANAM's as its PEM file, others as verifier keys."""
    return "\n".join(
        f"{partner}\n{public_key_pem(key).decode()}"
        if partner == "MX-ANAM"
        else f"{partner} {key.verifier.vkey()}"
        for partner, key in keys.items()
    )


async def test_partners_cosignatures_are_verified_in_the_browser(
    us: Running, tmp_path: Path
) -> None:
    mx, ca = partner_audit_key("MX-ANAM"), partner_audit_key("CA-CBSA")
    audit_log = us.api.app[AUDIT_LOG]
    await queries(us, 3)
    first = await audit_log.checkpoint()
    await cosigned_by(us, "MX-ANAM", mx, first)
    await queries(us, 2)
    latest = await audit_log.checkpoint()
    await cosigned_by(us, "CA-CBSA", ca, latest)
    mx_ok = {
        "text": f"\u2713 MX-ANAM cosigned size {first.size} (at 2027-01-15T08:00:00Z): signature"
        " verified with its key, consistent with this checkpoint",
        "kind": "ok",
    }
    ca_ok = {
        "text": f"\u2713 CA-CBSA cosigned size {latest.size} (at 2027-01-15T08:00:00Z): signature"
        " verified with its key, consistent with this checkpoint",
        "kind": "ok",
    }

    # no key given for CA-CBSA: its cosignature is the gateway's word, and labelled so
    page = await visit(us, tmp_path, witnessKeys=witness_keys({"MX-ANAM": mx}))
    assert page["checkpoint-status"]["kind"] == "status ok"
    assert page["cosigners"] == [
        {
            "text": f"CA-CBSA cosigned size {latest.size}: reported by the gateway, not verified"
            " (no audit key given for CA-CBSA)",
            "kind": "warn",
        },
        mx_ok,
    ]
    assert page["cosign-status"] == {
        "text": "Partners' cosignatures: 1 verified in this browser, 1 reported by the gateway,"
        " not verified.",
        "kind": "status warn",
    }
    page = await visit(us, tmp_path, witnessKeys=witness_keys({"MX-ANAM": mx, "CA-CBSA": ca}))
    assert page["cosigners"] == [ca_ok, mx_ok]
    assert page["cosign-status"] == {
        "text": "Partners' cosignatures: 2 verified in this browser.",
        "kind": "status ok",
    }

    # a dishonest gateway: MX-ANAM's signature forged, CA-CBSA's tree not a prefix of this
    # checkpoint's, and with a key given for a partner it does not list
    status, answer = await get(us, "/api/v1/audit/checkpoint")
    assert status == 200
    by_partner = {c["partner"]: c for c in answer["cosignatures"]}
    mx_cosig, ca_cosig = by_partner["MX-ANAM"], by_partner["CA-CBSA"]
    forged = {**mx_cosig, "note": forge(mx_cosig["note"], mx.name)}
    assert forged["note"] != mx_cosig["note"]
    bad_proof = {
        **mx_cosig,
        "consistency_proof": [
            base64.b64encode(merkle.leaf_hash(b"x")).decode(),
            *mx_cosig["consistency_proof"][1:],
        ],
    }
    answer["cosignatures"] = [forged, bad_proof]
    page = await visit(
        us,
        tmp_path,
        witnessKeys=witness_keys({"MX-ANAM": mx, "CA-CBSA": ca}),
        checkpointAnswer=answer,
    )
    assert page["checkpoint-status"]["kind"] == "status ok"
    assert page["cosigners"] == [
        {
            "text": "\u2717 MX-ANAM: cosignature FAILED verification: the cosignature by"
            f" {mx.name} (key {mx.key_id:08x}) does not verify",
            "kind": "bad",
        },
        {
            "text": "\u2717 MX-ANAM: cosignature FAILED verification: consistency proof does not"
            f" lead to the old root of size {first.size}",
            "kind": "bad",
        },
        {
            "text": "CA-CBSA: no cosignature reported by the gateway (its key is given)",
            "kind": "warn",
        },
    ]
    assert page["cosign-status"] == {
        "text": "Partners' cosignatures: 2 FAILED verification, none reported for CA-CBSA.",
        "kind": "status bad",
    }
    # a cosignature of another partner relabelled as MX-ANAM's fails with MX-ANAM's key
    answer["cosignatures"] = [{**ca_cosig, "partner": "MX-ANAM"}]
    page = await visit(
        us, tmp_path, witnessKeys=witness_keys({"MX-ANAM": mx}), checkpointAnswer=answer
    )
    assert page["cosigners"] == [
        {
            "text": "\u2717 MX-ANAM: cosignature FAILED verification: the note carries no"
            " cosignature by this key",
            "kind": "bad",
        }
    ]


async def test_a_pem_log_key_is_pinned_to_the_origin_the_auditor_gives(
    us: Running, tmp_path: Path
) -> None:
    """The gateway signs a checkpoint of a "shadow" log, under another origin, with its log
    key: with the PEM key and the origin the auditor gave, the page refuses it."""
    await queries(us, 3)
    checkpoint = await us.api.app[AUDIT_LOG].checkpoint()
    shadow = "evil.invalid/shadow-log"
    note = sign_checkpoint(
        CheckpointBody(origin=shadow, size=checkpoint.size, root_hash=checkpoint.root_hash),
        load_note_signer(us.config.audit.key, shadow),
    ).note
    status, answer = await get(us, "/api/v1/audit/checkpoint")
    assert status == 200
    page = await visit(us, tmp_path, checkpointAnswer={**answer, "origin": shadow, "note": note})
    assert page["access-status"] == {
        "text": f'checkpoint is from log "{shadow}", the key is for "{us.config.audit.origin}"',
        "kind": "status bad",
    }
    assert page["rows"] == []
    # a PEM key alone does not name the log: the page asks for the origin, it does not take
    # the gateway's
    page = await visit(us, tmp_path, origin="")
    assert page["access-status"] == {
        "text": "a PEM key does not name the log: give the log's origin with it, or give its"
        " note verifier key, which names it",
        "kind": "status bad",
    }
    # and so does the API client, which the page drives
    result = await drive(us, tmp_path, origin=None)
    assert result["checkpoint"]["error"] == (
        "VerifyError: a PEM key does not name the log: give the log's origin with it, or give"
        " its note verifier key, which names it"
    )
    # a verifier key names the log itself; an origin given with it must be that name
    vkey = load_note_verifier(public_key_file(us), us.config.audit.origin).vkey()
    result = await drive(us, tmp_path, key=vkey, origin=None)
    assert result["checkpoint"]["origin"] == us.config.audit.origin
    result = await drive(us, tmp_path, key=vkey, origin=shadow)
    assert result["checkpoint"]["error"] == (
        f'VerifyError: the verifier key names the log "{us.config.audit.origin}",'
        f' not the origin given, "{shadow}"'
    )
