"""Auditor API over real TLS on a log changed behind the gateway's back into another SQLite type.

SQLite keeps whatever type a raw UPDATE gives a column: ``replace()`` on a BLOB entry stores
TEXT. The store check and the export (which refuses, 409, to send a bundle that would not
verify) must name that entry like any other changed one, never answer 500.
"""

from __future__ import annotations

import sqlite3

import aiohttp
import orjson
from outbound_env import Running, auth, client_ssl, token

from gateway.api.audit import AUDIT_LOG
from gateway.audit.events import AuditEvent, EventKind


async def _get(running: Running, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            running.api_url + path,
            headers=auth(token(running.config, ("audit:read",))),
            ssl=client_ssl(running.config),
        ) as response,
    ):
        return response.status, await response.read()


def _behind_its_back(running: Running, statement: str) -> None:
    conn = sqlite3.connect(str(running.config.store_url).removeprefix("sqlite:///"))
    try:
        conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


async def test_entry_stored_as_text_is_reported_by_verify_and_export(us: Running) -> None:
    events = [
        AuditEvent(event=EventKind.QUERY, at=us.gateway.clock.now(), outcome=f"n{i}")
        for i in range(40)
    ]
    await us.gateway.store.append_audit(events)
    await us.api.app[AUDIT_LOG].checkpoint()
    _behind_its_back(
        us, "UPDATE audit_entries SET entry = replace(entry, 'n17', 'n71') WHERE seq = 17"
    )

    status, body = await _get(us, "/api/v1/audit/verify")
    assert status == 200, body
    report = orjson.loads(body)
    assert (report["ok"], report["first_bad_position"]) == (False, 17)
    assert report["problems"][0] == {
        "position": 17,
        "what": "entry bytes do not match the stored leaf hash",
    }

    # the export would not verify (entry 17 is not in the tree): no bundle is sent
    status, body = await _get(us, "/api/v1/audit/export")
    assert status == 409, body
    assert "entry 17 is not in the tree of the checkpoint of size" in orjson.loads(body)["detail"]

    # a leaf hash changed to text: found by the check, and listed as the bytes stored
    _behind_its_back(us, "UPDATE audit_entries SET leaf_hash = 'no hash' WHERE seq = 30")
    status, body = await _get(us, "/api/v1/audit/verify")
    assert status == 200, body
    problems = orjson.loads(body)["problems"]
    assert {"position": 30, "what": "entry bytes do not match the stored leaf hash"} in problems
    status, body = await _get(us, "/api/v1/audit/entries?after=29&limit=1")
    assert status == 200, body
    # an entry that holds no JSON any more is listed as its bytes, and the check names it
    _behind_its_back(us, "UPDATE audit_entries SET entry = x'ff7b' WHERE seq = 33")
    status, body = await _get(us, "/api/v1/audit/entries?after=32&limit=2")
    assert status == 200, body
    items = orjson.loads(body)["items"]
    assert items[0]["entry"] == {"unreadable": "/3s="}
    assert items[1]["entry"]["outcome"] == "n34"
    status, body = await _get(us, "/api/v1/audit/verify")
    problems = orjson.loads(body)["problems"]
    assert {"position": 33, "what": "entry bytes do not match the stored leaf hash"} in problems
