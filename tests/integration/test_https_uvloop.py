"""The partner endpoint's own TLS handshakes on uvloop, the loop ``serve`` runs on: served,
served with the request in the handshake's last segment, and refused with an audit entry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import uvloop
from https_env import make_message, post, post_with_handshake_end, running_gateway

from gateway.audit.events import EventKind
from gateway.store.base import AuditFilter


async def scenario(root: Path) -> None:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    async with running_gateway(root) as env:
        _, body = make_message(env)
        assert (await post(env, body)).status == 202
        _, body = make_message(env)
        assert (await post_with_handshake_end(env, body)).startswith(b"HTTP/1.1 202 ")
        _, body = make_message(env)
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await post(env, body, cert=None)
        store = env.gateway.store
        for _ in range(100):
            rows = await store.audit_entries(AuditFilter(event=EventKind.TLS_REFUSED.value))
            if rows:
                break
            await asyncio.sleep(0.02)
        assert [json.loads(row.entry)["outcome"] for row in rows] == ["no_cert"]


def test_handshakes_on_uvloop(tmp_path: Path) -> None:
    uvloop.run(scenario(tmp_path))
