"""Load client process: keep-alive mutual-TLS POSTs of pre-signed envelopes.

Reads ``{"b": body, "s": jws}`` lines (``s`` absent for internal API submissions, which carry
``--bearer`` instead), opens ``--concurrency`` kept-alive connections (spread
over the ``--url`` targets), sends ``--warmup`` unmeasured requests, then measures until the
payloads run out or ``--duration`` passes. With ``--rate`` the requests are paced (open loop):
request *i* is due at start + *i*/rate, and its latency counts from when it was due, so a
stalled server shows in the latency of every request that waited behind it (no coordinated
omission). Prints one JSON object: count, seconds, errors
(answers other than 202), p50/p99 latency in ms, the status counts and the connections
opened.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import ssl
import time
from collections import Counter

import aiohttp
import orjson
import uvloop

from bench.common import percentile

SIGNATURE = "C2C-Signature"


def load_payloads(path: str, skip: int, limit: int | None) -> list[tuple[bytes, str | None]]:
    out: list[tuple[bytes, str | None]] = []
    with open(path, "rb") as handle:
        for line in itertools.islice(handle, skip, None if limit is None else skip + limit):
            item = orjson.loads(line)
            out.append((item["b"].encode(), item.get("s")))
    return out


async def run(args: argparse.Namespace) -> dict[str, object]:
    payloads = load_payloads(args.payloads, args.skip, args.limit)
    context = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    base_headers = {"Content-Type": "application/json"}
    if args.bearer:
        base_headers["Authorization"] = f"Bearer {args.bearer}"
    connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=context, force_close=False)
    urls: list[str] = args.url
    next_index = itertools.count()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    sent = [0]
    measured_from = [0.0]
    deadline = [float("inf")]
    warmup = min(args.warmup, len(payloads) // 10)
    warm_done = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, url: str) -> None:
        while True:
            index = next(next_index)
            if index >= len(payloads) or time.perf_counter() > deadline[0]:
                return
            if index == warmup:
                measured_from[0] = time.perf_counter()
                deadline[0] = measured_from[0] + args.duration
                warm_done.set()
            body, signature = payloads[index]
            started = time.perf_counter()
            if args.rate:
                due = paced_from + index / args.rate
                if due > started:
                    await asyncio.sleep(due - started)
                started = due
            headers = base_headers if signature is None else {**base_headers, SIGNATURE: signature}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
            sent[0] += 1
            if index >= warmup:
                latencies.append(time.perf_counter() - started)
                statuses[response.status] += 1

    opened = [0]

    async def on_connection(*_: object) -> None:
        opened[0] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    paced_from = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        await asyncio.gather(
            *(worker(session, urls[i % len(urls)]) for i in range(args.concurrency))
        )
        finished = time.perf_counter()
    latencies.sort()
    return {
        "count": len(latencies),
        "sent": sent[0],
        "seconds": finished - measured_from[0] if warm_done.is_set() else 0.0,
        "errors": sum(n for status, n in statuses.items() if status != 202),
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "statuses": {str(k): v for k, v in statuses.items()},
        "connections": opened[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--bearer", help="internal API token (submissions)")
    parser.add_argument("--payloads", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="requests/s, paced (open loop)")
    args = parser.parse_args()
    print(orjson.dumps(uvloop.run(run(args))).decode())


if __name__ == "__main__":
    main()
