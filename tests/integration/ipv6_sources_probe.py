"""Run by test_https_ipv6_sources inside a network namespace of its own, whose loopback has
``ADDRESSES``: a gateway's partner endpoint listens on one of them, and connections come from
the others. Prints what it saw as JSON.

Usage: python -m ipv6_sources_probe <empty directory>
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
from https_env import (
    MX,
    URL_PATH,
    Env,
    connection_count,
    held_per_source_becomes,
    make_message,
    running_gateway,
)

from gateway.crypto.jws import sign_detached

LISTEN = "2001:db8:c2c::1"
#: two addresses of one /64, and a third of it
FLOODERS = ("2001:db8:c2c:1::a", "2001:db8:c2c:1:ffff::b")
SAME_64 = "2001:db8:c2c:1::c"
#: an address of another /64
NEIGHBOUR = "2001:db8:c2c:2::a"
ADDRESSES = (LISTEN, *FLOODERS, SAME_64, NEIGHBOUR)
PER_SOURCE = 2
LIMITS = (
    "header_timeout_s = 3.0\nrequest_timeout_s = 3.0\n"
    f"max_connections = 16\nmax_connections_per_source = {PER_SOURCE}\n"
)


def _listen_on_ipv6(root: Path) -> None:
    toml = root / "gateway.toml"
    text = toml.read_text()
    listen = '[partner_listen]\nhost = "127.0.0.1"'
    assert listen in text
    toml.write_text(text.replace(listen, f'[partner_listen]\nhost = "{LISTEN}"'))


async def _open(
    env: Env, source: str, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        LISTEN,
        env.gateway.partner_server.port,
        ssl=context,
        # the dev PKI's server certificate names localhost and 127.0.0.1
        server_hostname="localhost" if context is not None else None,
        local_addr=(source, 0),
    )


async def _request(env: Env, source: str, method: str, path: str, **kwargs: Any) -> int:
    connector = aiohttp.TCPConnector(ssl=env.client_ssl(MX), local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(
            method, env.gateway.partner_url + path, server_hostname="localhost", **kwargs
        ) as response,
    ):
        await response.read()
        return response.status


async def _refused(env: Env, source: str) -> bool:
    """Whether a partner's mTLS connection from ``source`` is closed without being served."""
    try:
        reader, writer = await _open(env, source, env.client_ssl(MX))
    except (ConnectionError, ssl.SSLError):
        return True
    writer.write(b"GET /c2c/v1/keys HTTP/1.1\r\nHost: localhost\r\n\r\n")
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        answer = await reader.read(12)
        writer.close()
        return not answer
    return True


async def probe(root: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with running_gateway(root, LIMITS, prepare=_listen_on_ipv6) as env:
        seen["partner_url"] = env.gateway.partner_url
        # Two silent connections from two addresses of one /64 fill that source's slots ...
        silent = [await _open(env, source, None) for source in FLOODERS]
        await held_per_source_becomes(env, {"2001:db8:c2c:1::/64": PER_SOURCE})
        seen["held"] = env.gateway.partner_server.held_per_source
        # ... so a third address of it is refused, a partner's certificate or not ...
        seen["same_64_refused"] = await _refused(env, SAME_64)
        seen["refused_per_source"] = connection_count(
            env, "c2c_https_connections_refused_total", "limit", "per_source"
        )
        # ... while an address of another /64 is served.
        _, body = make_message(env)
        seen["neighbour_post"] = await _request(
            env,
            NEIGHBOUR,
            "POST",
            URL_PATH,
            data=body,
            headers={
                "Content-Type": "application/json",
                "C2C-Signature": sign_detached(body, env.keys[MX]),
            },
        )
        for _, writer in silent:
            writer.close()
        await held_per_source_becomes(env, {})
        # The slots came back: the /64 is served again.
        seen["same_64_after"] = await _request(env, SAME_64, "GET", "/c2c/v1/keys")
    return seen


def main() -> None:
    print(json.dumps(asyncio.run(probe(Path(sys.argv[1])))))


if __name__ == "__main__":
    main()
