"""Partner fairness under one partner's flood (RELIABILITY-SECURITY T40): partner B's latency
alone vs while partner A floods the same gateway far beyond its agreed rate.

One ``c2c-gateway serve`` on SQLite (as benchmark 1). B (CA-CBSA, the victim) sends pre-signed
valid messages back-to-back on one kept-alive mTLS connection (c=1, as benchmark 1's c=1),
first alone, then while A (MX-ANAM, ``[rate] per_second = 100``, ``burst = 100``) sends its own
distinct pre-signed valid messages back-to-back on 32 connections, so that most of A's requests
are answered 429 ``RATE_LIMITED``. Each partner's load is a separate ``bench.load_client``
process with that partner's client certificate.

The flood is started first; B starts once the gateway's ``/metrics`` count A's refusals (A is
past its burst and its warm-up), and the flood must still be running when B's run ends, so it
covers all of B's measured window. The rate limit is decided in ``check_limits``, the first
stage: a limited request skips the signature check, parsing, schema and the store write of a
message, but still costs the TLS record, the HTTP parse, the body digest, a REJECTED audit row,
a best-effort parse of the body's header (for the message id) and an Ed25519-signed NACK.

The section fails instead of printing a figure if any B request was answered other than 202,
any A request other than 202 or 429, A was never limited, or the gateway's own counters
disagree (B refused or not stored, A refused for anything but its rate).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
from collections import Counter
from pathlib import Path

import aiohttp

from bench.common import (
    PARTNER,
    LoadResult,
    Table,
    cpu_seconds,
    prepare,
    scaled,
    sign_messages,
    start_load,
)
from bench.https_inbound import MESSAGES_PATH, gateways

#: the flooding partner and its agreed rate during the benchmark
FLOODER = PARTNER
FLOOD_RATE = 100.0
FLOOD_BURST = 100
FLOOD_CONCURRENCY = 32
#: the partner whose latency is measured
VICTIM = "CA-CBSA"
#: load_client's unmeasured first requests: B's (each run), A's
VICTIM_WARMUP, FLOOD_WARMUP = 50, 200
#: T40: "B gets 0 rejections and p99 < 1.5 x baseline"
TARGET_P99_RATIO = 1.5

_COUNTER = re.compile(rb"^c2c_inbound_(received|accepted|rejected)_total\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class FairnessFailed(RuntimeError):
    """The gateway or the run did not do what the section measures: no figure is printed."""


def limit_rate(root: Path, partner: str, per_second: float, burst: int) -> None:
    """Replace the ``[rate]`` that ``prepare`` wrote for ``partner``."""
    toml = root / "partners" / partner / "partner.toml"
    text = re.sub(r"\[rate\]\n(?:[^\[\n][^\n]*\n)*", "", toml.read_text(encoding="utf-8"))
    toml.write_text(text + f"\n[rate]\nper_second = {per_second}\nburst = {burst}\n")


async def client_result(proc: asyncio.subprocess.Process, who: str) -> LoadResult:
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise FairnessFailed(f"{who}'s load client failed with exit code {proc.returncode}")
    return LoadResult.from_json(json.loads(out))


async def server_counts(session: aiohttp.ClientSession, api_url: str) -> Counter[str]:
    """The gateway's inbound counters: ``received <partner>``, ``accepted <partner>`` (all
    message types), ``rejected <partner> <code>``."""
    async with session.get(api_url + "/metrics") as response:
        text = await response.read()
    counts: Counter[str] = Counter()
    for kind, labels, value in _COUNTER.findall(text):
        label = dict(_LABEL.findall(labels.decode()))
        key = f"{kind.decode()} {label.get('partner', '-')}"
        if kind == b"rejected":
            key += f" {label.get('code', '-')}"
        counts[key] += int(float(value))
    return counts


async def wait_flooding(
    session: aiohttp.ClientSession,
    api_url: str,
    before: Counter[str],
    flood: asyncio.Task[LoadResult],
) -> None:
    """Until the gateway has refused more of A's requests than A's burst and warm-up: A's
    measured window has begun."""
    key = f"rejected {FLOODER} RATE_LIMITED"
    enough = before[key] + FLOOD_BURST + FLOOD_WARMUP
    async with asyncio.timeout(60):
        while (await server_counts(session, api_url))[key] < enough:
            if flood.done():
                raise FairnessFailed(f"{FLOODER}'s flood ended before it was rate limited")
            await asyncio.sleep(0.05)


def check_statuses(who: str, result: LoadResult, allowed: set[str]) -> None:
    if result.count == 0 or not set(result.statuses) <= allowed:
        raise FairnessFailed(f"{who}: {result.count} measured, statuses {result.statuses}")


def delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key in after.keys() | before.keys():
        if after[key] != before[key]:
            out[key] = after[key] - before[key]
    return out


async def fairness(root: Path) -> Table:
    config = prepare(root)
    limit_rate(root, FLOODER, FLOOD_RATE, FLOOD_BURST)
    # B's windows: ~2,000+ requests each in full mode (B is ~10x slower during the flood)
    alone_s, flooded_s = scaled(8.0, 3.0), scaled(40.0, 8.0)
    # B: more than c=1 can send in its window, so the runs are timed; A: more than the flood
    # needs (checked: the flood must outlast B's run)
    b_budget, a_budget = int(scaled(8_000, 3_000)), int(scaled(110_000, 40_000))
    b_path = sign_messages(root, root / "victim.jsonl", count=2 * b_budget, sender=VICTIM)
    a_path = sign_messages(root, root / "flood.jsonl", count=a_budget, sender=FLOODER)
    context = ssl.create_default_context(cafile=str(root / "ca.pem"))
    async with (
        gateways(config) as (gw,),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
    ):
        url = gw.partner_url + MESSAGES_PATH
        counts0 = await server_counts(session, gw.api_url)
        cpu0 = cpu_seconds(gw.pid)
        alone_proc = await start_load(
            [url],
            pki=root,
            payloads=b_path,
            partner=VICTIM,
            concurrency=1,
            duration_s=alone_s,
            skip=0,
            limit=b_budget,
            warmup=VICTIM_WARMUP,
        )
        alone = await client_result(alone_proc, VICTIM)
        cpu1 = cpu_seconds(gw.pid)
        counts1 = await server_counts(session, gw.api_url)
        # the flood runs past B's start-up, warm-up and measured window
        flood_proc = await start_load(
            [url],
            pki=root,
            payloads=a_path,
            partner=FLOODER,
            concurrency=FLOOD_CONCURRENCY,
            duration_s=flooded_s + scaled(6.0, 5.0),
            skip=0,
            limit=a_budget,
            warmup=FLOOD_WARMUP,
        )
        flood_task = asyncio.create_task(client_result(flood_proc, FLOODER))
        try:
            await wait_flooding(session, gw.api_url, counts1, flood_task)
            victim_proc = await start_load(
                [url],
                pki=root,
                payloads=b_path,
                partner=VICTIM,
                concurrency=1,
                duration_s=flooded_s,
                skip=b_budget,
                limit=b_budget,
                warmup=VICTIM_WARMUP,
            )
            flooded = await client_result(victim_proc, VICTIM)
            if flood_task.done():
                ended = await flood_task
                raise FairnessFailed(
                    f"{FLOODER}'s flood ended before {VICTIM}'s run did ({ended.sent:,} sent,"
                    f" {ended.rate:,.0f}/s over {ended.seconds:.1f} s; {VICTIM}"
                    f" {flooded.count:,} over {flooded.seconds:.1f} s): give it more payloads"
                )
            flood = await flood_task
        finally:
            if not flood_task.done():
                if flood_proc.returncode is None:
                    flood_proc.terminate()
                await asyncio.gather(flood_task, return_exceptions=True)
        cpu2 = cpu_seconds(gw.pid)
        counts2 = await server_counts(session, gw.api_url)

    check_statuses(f"{VICTIM} alone", alone, {"202"})
    check_statuses(f"{VICTIM} during the flood", flooded, {"202"})
    check_statuses(f"{FLOODER}'s flood", flood, {"202", "429"})
    base_run, flood_run = delta(counts1, counts0), delta(counts2, counts1)
    limited = flood_run[f"rejected {FLOODER} RATE_LIMITED"]
    expected_base = Counter({f"received {VICTIM}": alone.sent, f"accepted {VICTIM}": alone.sent})
    a_accepted = flood_run[f"accepted {FLOODER}"]
    expected_flood = Counter(
        {
            f"received {VICTIM}": flooded.sent,
            f"accepted {VICTIM}": flooded.sent,
            f"received {FLOODER}": flood.sent,
            f"accepted {FLOODER}": a_accepted,
            f"rejected {FLOODER} RATE_LIMITED": flood.sent - a_accepted,
        }
    )
    if base_run != expected_base or flood_run != +expected_flood or "429" not in flood.statuses:
        raise FairnessFailed(
            f"gateway counters: alone {dict(base_run)}, flood {dict(flood_run)};"
            f" clients: {VICTIM} {alone.sent} + {flooded.sent} sent, {FLOODER} {flood.sent} sent"
            f" ({flood.statuses})"
        )

    alone_cpu_us = (cpu1 - cpu0) / alone.sent * 1e6
    flood_cpu = cpu2 - cpu1
    served = flooded.sent + flood.sent
    accepted = flooded.sent + a_accepted
    limited_cpu_us = max(0.0, flood_cpu - accepted * alone_cpu_us / 1e6) / limited * 1e6
    a_202 = flood.statuses.get("202", 0)
    a_429 = flood.statuses.get("429", 0)
    p99_ratio = flooded.p99_ms / alone.p99_ms

    table = Table("8. Partner fairness under one partner's flood (T40), SQLite store")
    table.add(f"B ({VICTIM}, c=1) messages/s", alone.rate, flooded.rate, "/s")
    table.add("B p50", alone.p50_ms, flooded.p50_ms, "ms")
    table.add("B p99", alone.p99_ms, flooded.p99_ms, "ms")
    table.add("B requests measured (all 202)", alone.count, flooded.count, "")
    table.add(f"A ({FLOODER}, c={FLOOD_CONCURRENCY}) answered requests/s", None, flood.rate, "/s")
    table.add("A answered 429 RATE_LIMITED", None, a_429 / flood.count * 100, "%")
    table.add("A answered 202", None, a_202 / flood.count * 100, "%")
    table.add("A accepted (202) per second", None, a_202 / flood.seconds, "/s")
    table.add("A p50", None, flood.p50_ms, "ms")
    table.add("A p99", None, flood.p99_ms, "ms")
    table.add("server CPU per request (all partners)", alone_cpu_us, flood_cpu / served * 1e6, "us")
    table.add("server CPU per rate-limited request (estimate)", None, limited_cpu_us, "us")
    table.notes += [
        f"baseline column: B alone; gateway column: B while A floods (same serve, same run);"
        f" A's [rate] per_second = {FLOOD_RATE:g}, burst = {FLOOD_BURST}: A sent"
        f" {flood.rate / FLOOD_RATE:.0f}x its rate (T40's action: 10x)",
        f"B's measured windows: {alone_s:g} s alone, {flooded_s:g} s during the flood;"
        f" warm-up {VICTIM_WARMUP} requests each",
        f"rate-limited CPU estimate: the flood's server CPU less its {accepted:,} accepted"
        f" messages at B's alone cost, over its {limited:,} refusals",
        f"load clients and server share {os.cpu_count()} vCPUs: A's client competes for them too",
        f"target (T40) B 0 rejections (checked) and p99 < {TARGET_P99_RATIO:g}x alone:"
        f" {'MET' if p99_ratio < TARGET_P99_RATIO else 'MISSED'} ({p99_ratio:.2f}x)",
    ]
    return table
