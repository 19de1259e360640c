"""Two real gateway processes (``c2c-gateway serve``): submit at one, receipted by the other.

US-CBP's outbound message crosses mutual TLS to MX-ANAM's process, which stores it and
answers with its signed ACK; US-CBP verifies that receipt and records ``acknowledged``.
A message that died while MX-ANAM was down is sent once an operator retries it via the API.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from outbound_env import auth, client_ssl, free_port, gateway_config, token

from gateway.config import GatewayConfig
from gateway.schemas.registry import SchemaRegistry

FAST_OUTBOX = """
[outbox]
max_attempts = 2
base_delay_s = 0.1
max_delay_s = 0.2
breaker_failures = 10
poll_interval_s = 0.05
"""


@asynccontextmanager
async def serve(config: GatewayConfig) -> AsyncIterator[str]:
    """Run ``c2c-gateway serve`` and yield its internal API URL once it reports ready."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "c2c-gateway"),
        "serve",
        "--config",
        str(config.source),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        api_url = None
        async with asyncio.timeout(30):
            while api_url is None:
                line = await proc.stderr.readline()
                assert line, "serve exited before it was ready"
                if line.startswith(b"{") and json.loads(line).get("event") == "serving":
                    api_url = json.loads(line)["api_url"]
        drain = asyncio.create_task(proc.stderr.read())
        yield api_url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await proc.wait()
    await drain
    assert proc.returncode == 0


async def call(
    config: GatewayConfig, url: str, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, url + path, json=body, headers=auth(token(config)), ssl=client_ssl(config)
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


async def wait_state(config: GatewayConfig, url: str, message_id: str, state: str) -> Any:
    async with asyncio.timeout(30):
        while True:
            status, view = await call(config, url, "GET", f"/api/v1/messages/{message_id}")
            assert status == 200
            if view["state"] == state:
                return view
            await asyncio.sleep(0.1)


def configs(tmp_path: Path) -> tuple[GatewayConfig, GatewayConfig]:
    us_port, mx_port = free_port(), free_port()
    us = gateway_config(
        tmp_path,
        "US-CBP",
        peers={"MX-ANAM": f"https://127.0.0.1:{mx_port}"},
        partner_port=us_port,
    )
    mx = gateway_config(
        tmp_path,
        "MX-ANAM",
        peers={"US-CBP": f"https://127.0.0.1:{us_port}"},
        partner_port=mx_port,
    )
    with us.source.open("a", encoding="utf-8") as handle:
        handle.write(FAST_OUTBOX)
    return us, mx


def example_of(message_type: str) -> dict[str, Any]:
    return SchemaRegistry.load_builtin().examples(message_type, "1.0")[0]


def submission(message_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"recipient": "MX-ANAM", "message_type": message_type, "payload": payload}


async def test_message_crosses_processes_and_its_ack_verifies(tmp_path: Path) -> None:
    us, mx = configs(tmp_path)
    example = example_of("shipment.advance_data")
    async with serve(us) as us_api:
        # MX-ANAM is down: two refused attempts and the message is dead.
        status, body = await call(
            us,
            us_api,
            "POST",
            "/api/v1/messages",
            submission("shipment.status", example_of("shipment.status")),
        )
        assert status == 202
        early = body["message_id"]
        dead = await wait_state(us, us_api, early, "dead")
        assert dead["attempts"] == 2
        assert dead["last_error"].startswith("gave up after 2 attempts; last error: cannot connect")
        async with serve(mx) as mx_api:
            status, body = await call(
                us, us_api, "POST", "/api/v1/messages", submission("shipment.advance_data", example)
            )
            assert status == 202
            view = await wait_state(us, us_api, body["message_id"], "acknowledged")
            receipt = view["receipt"]["envelope"]
            assert receipt["header"]["sender"] == "MX-ANAM"
            assert receipt["payload"]["status"] == "ACK"
            assert receipt["payload"]["ref_digest"] == view["body_digest"]
            status, stored = await call(mx, mx_api, "GET", f"/api/v1/messages/{body['message_id']}")
            assert status == 200
            assert (stored["direction"], stored["partner"]) == ("inbound", "US-CBP")
            assert stored["envelope"]["payload"] == example
            assert stored["body_digest"] == view["body_digest"]
            # The operator retries the dead one through the API; now it is delivered.
            status, retried = await call(us, us_api, "POST", f"/api/v1/messages/{early}/retry")
            assert (status, retried) == (200, {"message_id": early, "status": "queued"})
            again = await wait_state(us, us_api, early, "acknowledged")
            assert again["attempts"] == 1
            status, arrived = await call(mx, mx_api, "GET", f"/api/v1/messages/{early}")
            assert (status, arrived["body_digest"]) == (200, dead["body_digest"])
            status, page = await call(mx, mx_api, "GET", "/api/v1/messages?direction=inbound")
            assert sorted(item["message_id"] for item in page["items"]) == sorted(
                [early, body["message_id"]]
            )
