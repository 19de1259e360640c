"""A step of the wall clock under a running ``c2c-gateway serve`` (RELIABILITY-SECURITY T71).

The process runs under libfaketime (the ``libfaketime`` test dependency ships the preload
library) with an offset read from a file on every wall-clock read; monotonic time is left
alone, as a real NTP step leaves it. The test steps the process's wall clock an hour forward,
then back: the clock watch logs each step, counts it and audits it; while the clock is an hour
ahead a partner's fresh message is refused STALE, after the step back the same message is
accepted; the process keeps serving throughout. A second test shows the step back moving back
an outbound retry scheduled by the clock an hour ahead: it comes within seconds, not an hour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import re
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import libfaketime
import pytest
from outbound_env import auth, free_port, gateway_config, token
from prometheus_client.parser import text_string_to_metric_families
from serve_proc import ServeProcess, partner_client_ssl, signed_messages

from gateway.config import load_config
from gateway.runtime import Gateway
from gateway.schemas.registry import SchemaRegistry
from gateway.store.base import AuditFilter

# the wheel's preload library is built for x86-64 Linux (this project's CI machines)
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="libfaketime's wheel carries an x86-64 Linux library only",
)

PATH = "/c2c/v1/messages"
HOUR_S = 3600
WAIT_S = 20
#: every retry within MAX_DELAY_S of the failure before it (full jitter below the cap); the
#: breaker never opens and the attempts never run out, so the partner being down only retries
BASE_DELAY_S, MAX_DELAY_S = 2.0, 4.0
#: the moved-back retry is due at most MAX_DELAY_S after the step; unmoved, in an hour
RETRY_WAIT_S = MAX_DELAY_S + 6
OUTBOX = f"""
[outbox]
max_attempts = 1000
base_delay_s = {BASE_DELAY_S}
max_delay_s = {MAX_DELAY_S}
breaker_failures = 1000
poll_interval_s = 0.1
"""
PRELOAD = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"


def set_offset(offset_file: Path, seconds: int) -> None:
    """The process's wall clock is real time plus ``seconds`` from its next read on."""
    staged = offset_file.with_suffix(".new")
    staged.write_text(f"{seconds:+d}\n", encoding="ascii")
    staged.replace(offset_file)  # whole: a read never sees half a line


def faked_environment(offset_file: Path) -> dict[str, str]:
    assert PRELOAD.is_file(), PRELOAD
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKETIME")}
    preload = [str(PRELOAD), *filter(None, [env.get("LD_PRELOAD")])]
    env.update(
        LD_PRELOAD=":".join(preload),
        FAKETIME_TIMESTAMP_FILE=str(offset_file),
        FAKETIME_NO_CACHE="1",  # read the file at every wall-clock read
        DONT_FAKE_MONOTONIC="1",  # a step moves CLOCK_REALTIME, never CLOCK_MONOTONIC
        NO_FAKE_STAT="1",  # nor does it move the times of files already written
    )
    return env


def log_lines(server: ServeProcess) -> list[dict[str, Any]]:
    whole = bytes(server.stderr_log).rpartition(b"\n")[0]
    return [json.loads(line) for line in whole.splitlines() if line.startswith(b"{")]


async def stepped(server: ServeProcess, count: int) -> dict[str, Any]:
    """The ``count``-th ``clock_stepped`` log line, once the process has logged it."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        steps = [line for line in log_lines(server) if line["event"] == "clock_stepped"]
        if len(steps) >= count:
            assert len(steps) == count, steps
            return steps[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"no clock_stepped line #{count} within {WAIT_S} s; log: {server.stderr_log.decode()}"
    )


async def post(
    session: aiohttp.ClientSession, url: str, message: tuple[str, bytes, str]
) -> tuple[int, dict[str, Any]]:
    _, body, signature = message
    headers = {"Content-Type": "application/json", "C2C-Signature": signature}
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, json.loads(await response.read())


async def clock_steps(session: aiohttp.ClientSession, server: ServeProcess) -> dict[str, float]:
    async with session.get(server.api_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        sample.labels["direction"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "c2c_clock_steps"
        for sample in family.samples
        if sample.name == "c2c_clock_steps_total"
    }


async def test_wall_clock_steps_of_a_serving_process_are_logged_counted_and_audited(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = gateway_config(tmp_path, "US-CBP", partner_port=port)
    pki = tmp_path / "pki"
    offset_file = tmp_path / "faketime"
    set_offset(offset_file, 0)
    server = ServeProcess(config.source, env=faked_environment(offset_file))
    await server.start()
    url = f"https://127.0.0.1:{port}{PATH}"
    api_ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=api_ca)) as api,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=partner_client_ssl(pki))
            ) as partner,
        ):
            assert await clock_steps(api, server) == {"forward": 0.0, "back": 0.0}
            before = dt.datetime.now(dt.UTC)
            set_offset(offset_file, HOUR_S)
            forward = await stepped(server, 1)
            assert abs(forward["step_s"] - HOUR_S) < 1, forward
            assert "stepped forward" in forward["reason"]

            # the process's clock is an hour ahead: a message stamped now is an hour old
            [message] = signed_messages(
                pki,
                sender="MX-ANAM",
                recipient="US-CBP",
                count=1,
                message_type="shipment.advance_data",
            )
            status, refusal = await post(partner, url, message)
            assert (status, refusal["payload"]["code"]) == (422, "STALE"), refusal

            set_offset(offset_file, 0)
            back = await stepped(server, 2)
            assert abs(back["step_s"] + HOUR_S) < 1, back
            assert "stepped back" in back["reason"]
            assert "moved back with it" in back["reason"], back

            status, receipt = await post(partner, url, message)
            assert (status, receipt["payload"]["status"]) == (202, "ACK"), receipt
            async with api.get(server.api_url + "/readyz") as response:
                assert response.status == 200, await response.text()
            assert await clock_steps(api, server) == {"forward": 1.0, "back": 1.0}
    finally:
        code = await server.stop()
    assert code == 0, server.stderr_log.decode()[-3000:]

    gateway = Gateway(load_config(config.source))
    await gateway.store.open()
    try:
        rows = await gateway.store.audit_entries(AuditFilter(event="operator_action"))
    finally:
        await gateway.store.close()
    entries = [json.loads(row.entry) for row in rows]
    audited = [e for e in entries if e["outcome"] == "clock_stepped"]
    assert [e["actor"] for e in audited] == ["watch:clock", "watch:clock"], entries
    assert audited[0]["reason"].startswith("the wall clock stepped forward 3600.")
    assert audited[1]["reason"].startswith("the wall clock stepped back 3600.")
    # each entry carries the process's time when it was made: an hour ahead, then real again
    at = [dt.datetime.fromisoformat(e["at"]) for e in audited]
    assert dt.timedelta(minutes=59) < at[0] - before < dt.timedelta(minutes=61), at
    assert abs(at[1] - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=WAIT_S), at


def attempts_of(server: ServeProcess, message_id: str, *, after: int = 0) -> list[dict[str, Any]]:
    """The ``outbound_attempt`` log lines of ``message_id`` from log line ``after`` on."""
    return [
        line
        for line in log_lines(server)[after:]
        if line["event"] == "outbound_attempt" and line.get("message_id") == message_id
    ]


async def attempted(
    server: ServeProcess, message_id: str, *, after: int, within_s: float = WAIT_S
) -> dict[str, Any]:
    """The first attempt of ``message_id`` logged after log line ``after``, once there is one
    (at most ``within_s`` seconds from now)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        if attempts := attempts_of(server, message_id, after=after):
            return attempts[0]
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"no attempt of {message_id} within {within_s} s; log: {server.stderr_log.decode()}"
    )


async def test_an_outbound_retry_scheduled_an_hour_ahead_is_moved_back_with_the_clock(
    tmp_path: Path,
) -> None:
    # MX-ANAM's endpoint is a closed port: every attempt is refused and retried later
    down = free_port()
    config = gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": f"https://127.0.0.1:{down}"})
    with config.source.open("a", encoding="utf-8") as handle:
        handle.write(OUTBOX)
    offset_file = tmp_path / "faketime"
    set_offset(offset_file, 0)
    server = ServeProcess(config.source, env=faked_environment(offset_file))
    await server.start()
    # issued by the real clock and valid for longer than the hour ahead: good on either side
    headers = auth(token(config, ttl_s=3 * HOUR_S))
    payload = SchemaRegistry.load_builtin().examples("shipment.status", "1.0")[0]
    submission = {"recipient": "MX-ANAM", "message_type": "shipment.status", "payload": payload}
    api_ca = ssl.create_default_context(cafile=str(config.tls.ca))

    async def view(api: aiohttp.ClientSession, message_id: str) -> dict[str, Any]:
        async with api.get(f"{server.api_url}/api/v1/messages/{message_id}") as response:
            assert response.status == 200, await response.text()
            return dict(await response.json())

    def ahead_of_real(at: str) -> float:
        return (dt.datetime.fromisoformat(at) - dt.datetime.now(dt.UTC)).total_seconds()

    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=api_ca), headers=headers
        ) as api:
            set_offset(offset_file, HOUR_S)
            await stepped(server, 1)
            async with api.post(server.api_url + "/api/v1/messages", json=submission) as response:
                assert response.status == 202, await response.text()
                message_id = str((await response.json())["message_id"])
            first = await attempted(server, message_id, after=0)
            assert (first["attempt"], first["result"], first["state"]) == (1, "retry", "queued")
            # the retry is scheduled by the clock an hour ahead: an hour away in real time
            ahead = await view(api, message_id)
            assert ahead["state"] == "queued", ahead
            assert HOUR_S - 60 < ahead_of_real(ahead["next_attempt_at"]) < HOUR_S + 60, ahead

            set_offset(offset_file, 0)
            back = await stepped(server, 2)
            assert abs(back["step_s"] + HOUR_S) < 1, back
            moved = re.search(
                r"; (\d+) outbound schedules and \d+ leases moved back", back["reason"]
            )
            assert moved is not None, back
            assert int(moved[1]) == 1, back
            # Nothing is due in the hour after the step unless it was moved back with it:
            # an attempt logged after the step's line, within seconds, is the moved-back retry.
            step_line = log_lines(server).index(back)
            retry = await attempted(server, message_id, after=step_line, within_s=RETRY_WAIT_S)
            assert (retry["result"], retry["state"]) == ("retry", "queued"), retry
            assert retry["attempt"] > ahead["attempts"], (retry, ahead)
            after = await view(api, message_id)
            assert after["state"] == "queued", after
            assert after["attempts"] >= retry["attempt"], after
            # and what the real clock schedules now is seconds away, not an hour
            assert ahead_of_real(after["next_attempt_at"]) < 60, after
    finally:
        code = await server.stop()
    assert code == 0, server.stderr_log.decode()[-3000:]
