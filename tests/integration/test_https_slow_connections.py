"""Slow and unproductive connections at the partner endpoint (RELIABILITY-SECURITY T37,
invariant 7), over real mutual TLS on loopback: handshakes are started at a pace, in turn by
source address; at the total cap, the address holding the most connections gives up its
oldest unserved one for another address's new connection; a connection closed at its
deadline is counted by stage and logged once a minute per address and stage.

Each test's slow or flooding source is its own 127.0.0.x address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from https_env import (
    MX,
    Env,
    connection_count,
    held_per_source_becomes,
    make_message,
    open_from,
    post,
    running_gateway,
)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def gateway_with(tmp_path: Path, limits: str) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path, limits) as env:
        yield env


def _closed(env: Env, stage: str) -> float:
    return connection_count(env, "c2c_https_connections_closed_total", "stage", stage)


def _refused(env: Env, limit: str) -> float:
    return connection_count(env, "c2c_https_connections_refused_total", "limit", limit)


async def _ended(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the gateway ends the connection within ``within_s``."""
    try:
        async with asyncio.timeout(within_s):
            return await reader.read() == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


# --- at the total cap, the address holding the most makes room ----------------------------

CAP_LIMITS = "header_timeout_s = 30.0\nmax_connections = 3\n"


async def test_at_the_cap_a_silent_connection_makes_room_for_a_partner(tmp_path: Path) -> None:
    async with gateway_with(tmp_path, CAP_LIMITS) as env:
        source = "127.0.0.4"
        # Three connections that never send a ClientHello fill the cap ...
        silent = [await open_from(env, source, None) for _ in range(3)]
        await held_per_source_becomes(env, {source: 3})
        # ... yet a partner is served: the oldest silent connection was closed for it ...
        _, body = make_message(env)
        with structlog.testing.capture_logs() as logs:
            assert (await post(env, body)).status == 202
        assert await _ended(silent[0][0], 2.0)
        assert not await _ended(silent[1][0], 0.2)
        assert _closed(env, "evicted") == 1
        assert _refused(env, "total") == 0
        assert [
            (e["stage"], e["peer"]) for e in logs if e["event"] == "https_connection_evicted"
        ] == [("evicted", source)]
        # ... while the address holding the most, at the cap again, gets no more: its new
        # one is refused, not taking the place of another of its own.
        await held_per_source_becomes(env, {source: 2})
        silent.append(await open_from(env, source, None))
        await held_per_source_becomes(env, {source: 3})
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await open_from(env, source, env.client_ssl(MX))
        assert _refused(env, "total") == 1
        assert _closed(env, "evicted") == 1
        for _, writer in silent:
            writer.close()


async def test_at_the_cap_room_is_taken_from_the_address_holding_the_most(
    tmp_path: Path,
) -> None:
    async with gateway_with(tmp_path, "header_timeout_s = 30.0\nmax_connections = 5\n") as env:
        many, few = "127.0.0.5", "127.0.0.10"
        # Handshaken, no request: four from one address and one from another.
        first = [await open_from(env, many, env.client_ssl(MX)) for _ in range(4)]
        other = await open_from(env, few, env.client_ssl(MX))
        await held_per_source_becomes(env, {many: 4, few: 1})
        # The other address's second connection takes the first address's oldest place
        # (4 is twice the 2 it would hold) ...
        second = await open_from(env, few, env.client_ssl(MX))
        assert await _ended(first[0][0], 2.0)
        assert not await _ended(other[0], 0.2)
        await held_per_source_becomes(env, {many: 3, few: 2})
        assert _closed(env, "evicted") == 1
        # ... but not its third (3 is not twice 3): addresses holding about as many do not
        # take each other's places.
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await open_from(env, few, env.client_ssl(MX))
        assert _refused(env, "total") == 1
        assert _closed(env, "evicted") == 1
        for _, writer in [*first, other, second]:
            writer.close()


async def test_at_the_cap_served_connections_are_kept_and_the_new_one_refused(
    tmp_path: Path,
) -> None:
    async with gateway_with(tmp_path, CAP_LIMITS) as env:
        source = "127.0.0.6"
        connector = aiohttp.TCPConnector(
            ssl=env.client_ssl(MX), local_addr=(source, 0), limit=3, force_close=False
        )
        url = env.gateway.partner_url + "/c2c/v1/keys"
        async with aiohttp.ClientSession(connector=connector) as session:

            async def get_and_keep() -> int:
                async with session.get(url) as response:
                    await response.read()
                    await asyncio.sleep(0.3)  # so that the three run at once
                    return response.status

            # Three kept-alive connections that each made a request: served, not idle.
            assert await asyncio.gather(*(get_and_keep() for _ in range(3))) == [200] * 3
            await held_per_source_becomes(env, {source: 3})
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await open_from(env, "127.0.0.1", env.client_ssl(MX))
            assert _refused(env, "total") == 1
            assert _closed(env, "evicted") == 0
            # The served connections are still there and still serve.
            async with session.get(url) as response:
                assert response.status == 200


# --- handshakes start at a pace, in turn by source address ---------------------------------

PACE_LIMITS = "header_timeout_s = 30.0\nhandshakes_per_second = 2.0\n"


async def test_handshakes_start_at_the_pace_and_take_turns_by_address(tmp_path: Path) -> None:
    async with gateway_with(tmp_path, PACE_LIMITS) as env:
        flooder = "127.0.0.7"
        done: dict[str, list[float]] = {flooder: [], "127.0.0.1": []}
        started = time.monotonic()

        async def handshake(source: str) -> Stream:
            stream = await open_from(env, source, env.client_ssl(MX))
            done[source].append(time.monotonic() - started)
            return stream

        # Five at once from one address: one at a time, every half second ...
        flood = [asyncio.create_task(handshake(flooder)) for _ in range(5)]
        await asyncio.sleep(0.2)
        # ... and another address's one, arriving after them, gets the next turn.
        own = await handshake("127.0.0.1")
        streams = [own, *await asyncio.gather(*flood)]
        finished = sorted(done[flooder])
        assert finished[-1] >= 1.6, finished  # 1 at once, then 4 at 2 a second
        assert finished[-1] < 4.0, finished
        ahead = sum(1 for t in finished if t < done["127.0.0.1"][0])
        assert ahead <= 2, (finished, done["127.0.0.1"])
        for _, writer in streams:
            writer.close()


async def test_a_partner_address_goes_before_a_flood_from_many_addresses(tmp_path: Path) -> None:
    async with gateway_with(tmp_path, PACE_LIMITS) as env:
        partner = "127.0.0.1"
        # a partner connection completed its handshake earlier: its address is vouched for
        _, writer = await open_from(env, partner, env.client_ssl(MX))
        writer.close()
        # a connection flood: one silent connection from each of 12 more addresses, all
        # waiting for a turn (6 s of turns at 2 a second)
        flood = [await open_from(env, f"127.0.1.{i}", None) for i in range(1, 13)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        _, writer = await open_from(env, partner, env.client_ssl(MX))
        waited = time.monotonic() - started
        # the next turn or the one after, not the thirteenth
        assert waited < 1.2, waited
        writer.close()
        # an address never vouched for takes its turn behind them
        started = time.monotonic()
        stranger = asyncio.create_task(open_from(env, "127.0.0.2", env.client_ssl(MX)))
        await asyncio.sleep(1.5)
        assert not stranger.done(), time.monotonic() - started
        stranger.cancel()
        for _, flooding in flood:
            flooding.close()


async def test_a_connection_kept_waiting_past_its_deadline_is_closed_and_counted(
    tmp_path: Path,
) -> None:
    limits = "header_timeout_s = 1.0\nhandshakes_per_second = 0.4\n"
    async with gateway_with(tmp_path, limits) as env:
        source = "127.0.0.8"
        with structlog.testing.capture_logs() as logs:
            results = await asyncio.gather(
                *(open_from(env, source, env.client_ssl(MX)) for _ in range(3)),
                return_exceptions=True,
            )
            await held_per_source_becomes(env, {})
        failed = [r for r in results if isinstance(r, BaseException)]
        # The burst's one turn went to one; the next turn was 2.5 s away, past the deadline.
        assert len(failed) == 2, results
        assert all(isinstance(r, (ConnectionError, ssl.SSLError)) for r in failed), failed
        assert _closed(env, "handshake_wait") == 2
        lines = [e for e in logs if e["event"] == "https_connection_deadline"]
        # One line for the address and stage in the minute, whatever the count.
        waits = [e for e in lines if e["stage"] == "handshake_wait"]
        assert len(waits) == 1, lines
        assert waits[0]["peer"] == source
        assert waits[0]["unlogged_since"] == 0
        for result in results:
            if not isinstance(result, BaseException):
                result[1].close()


async def test_deadline_closes_are_counted_by_stage_and_logged_once_per_address(
    tmp_path: Path,
) -> None:
    limits = "header_timeout_s = 0.5\n"
    async with gateway_with(tmp_path, limits) as env:
        source = "127.0.0.9"
        with structlog.testing.capture_logs() as logs:
            silent = [await open_from(env, source, None) for _ in range(3)]
            idle = [await open_from(env, source, env.client_ssl(MX)) for _ in range(2)]
            for reader, _ in [*silent, *idle]:
                assert await _ended(reader, 3.0)
            await held_per_source_becomes(env, {})
        assert _closed(env, "handshake") == 3
        assert _closed(env, "request_head") == 2
        lines = [(e["stage"], e["peer"]) for e in logs if e["event"] == "https_connection_deadline"]
        assert sorted(lines) == [("handshake", source), ("request_head", source)]
        for _, writer in [*silent, *idle]:
            writer.close()
