"""Our own TLS identity going wrong under a real ``c2c-gateway serve``: a passphrase-protected
key is refused and never asked for on the terminal (at start: exit 2; on SIGHUP or a change of
the files: refused, logged, audited and counted while the gateway answers and the watcher goes
on), an expired certificate stops the start as it stops a reload, and a fault in a TLS file or
a listen address is named by its file and key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from outbound_env import gateway_config
from serve_proc import ServeProcess, edit_toml, run_cli
from test_tls_reload import expired_certificate

from gateway.clock import SystemClock
from gateway.config import GatewayConfig
from gateway.store import open_store
from gateway.store.base import AuditFilter

ENCRYPTED = (
    "tls.key: is encrypted; the gateway takes an unencrypted PKCS#8 or traditional PEM key and"
    " never asks for a passphrase"
)


@pytest.fixture
def config(tmp_path: Path) -> GatewayConfig:
    return gateway_config(tmp_path, "US-CBP", peers={"MX-ANAM": "https://127.0.0.1:9"})


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: its master end and the path of the end ``serve`` gets."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.set_blocking(master, False)
    try:
        yield master, name
    finally:
        os.close(slave)
        os.close(master)


def on_terminal(config: GatewayConfig, tty: str) -> ServeProcess:
    """``serve`` with ``tty`` as its controlling terminal and its stdin (a foreground shell,
    tmux, ``docker run -t``): where OpenSSL, left to itself, asks for a key's passphrase."""
    return ServeProcess(
        config.source, prefix=("sh", "-c", f'exec setsid --ctty "$@" <{tty}', "serve")
    )


def shown_on(master: int) -> bytes:
    """What the process wrote on its terminal so far."""
    shown = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(master, 1 << 16):
            shown += chunk
    return shown


def encrypt(key: Path) -> None:
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


def log_lines(process: ServeProcess) -> list[dict[str, Any]]:
    lines = bytes(process.stderr_log).splitlines()
    return [json.loads(line) for line in lines if line.startswith(b"{")]


def last_line(process: ServeProcess) -> str:
    return bytes(process.stderr_log).decode().strip().splitlines()[-1]


async def refused_start(process: ServeProcess, master: int | None = None) -> int:
    """Start a ``serve`` that must stop before it is ready; its exit status."""
    try:
        async with asyncio.timeout(30):
            assert not await process.start(may_die=True)
            return await process.wait()
    except TimeoutError:
        shown = shown_on(master) if master is not None else b""
        pytest.fail(f"serve did not stop within 30 s; on its terminal: {shown!r}")
    finally:
        if process.proc is not None:
            await process.kill()


async def test_an_encrypted_key_stops_the_start_without_asking(
    config: GatewayConfig, terminal: tuple[int, str]
) -> None:
    master, tty = terminal
    encrypt(config.tls.key)
    process = on_terminal(config, tty)
    assert await refused_start(process, master) == 2
    assert last_line(process).startswith(f"error: {config.tls.key}: {ENCRYPTED}")
    assert b"pass phrase" not in shown_on(master)


@contextlib.asynccontextmanager
async def serving(process: ServeProcess) -> AsyncIterator[ServeProcess]:
    await process.start()
    try:
        yield process
    finally:
        if process.proc is not None:
            await process.kill()


async def until_logged(process: ServeProcess, event: str, actor: str) -> None:
    for _ in range(200):
        if any(
            (line.get("event"), line.get("actor")) == (event, actor) for line in log_lines(process)
        ):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"no {event} by {actor} logged within 10 s")


async def api_get(process: ServeProcess, config: GatewayConfig, path: str) -> str:
    context = ssl.create_default_context(cafile=str(config.tls.ca))
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(process.api_url + path, ssl=context) as response,
    ):
        assert response.status == 200, path
        return await response.text()


async def test_an_encrypted_key_on_reload_is_refused_while_serve_answers(
    config: GatewayConfig, terminal: tuple[int, str]
) -> None:
    master, tty = terminal
    edit_toml(
        config.source,
        'ca = "../pki/ca.pem"\n',
        'ca = "../pki/ca.pem"\ncert_check_interval_s = 1\n',
    )
    good_key = config.tls.key.read_bytes()
    process = on_terminal(config, tty)
    async with serving(process):
        encrypt(config.tls.key)
        await until_logged(process, "tls_reload_refused", "watch:file-change")
        assert process.proc is not None
        process.proc.send_signal(signal.SIGHUP)
        await until_logged(process, "tls_reload_refused", "signal:SIGHUP")
        assert json.loads(await api_get(process, config, "/healthz")) == {"status": "ok"}
        # the watcher goes on: the good key put back is taken in
        config.tls.key.write_bytes(good_key)
        await until_logged(process, "tls_reloaded", "watch:file-change")
        metrics = await api_get(process, config, "/metrics")
        assert await asyncio.wait_for(process.stop(), 20) == 0
    assert b"pass phrase" not in shown_on(master)
    assert 'c2c_tls_reloads_total{outcome="tls_reload_refused"} 2.0' in metrics
    assert 'c2c_tls_reloads_total{outcome="tls_reloaded"} 1.0' in metrics
    refusals = [line for line in log_lines(process) if line.get("event") == "tls_reload_refused"]
    for line in refusals:
        assert line["reason"].startswith(f"{config.tls.key}: {ENCRYPTED}"), line
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        rows = await store.audit_entries(
            AuditFilter(event="operator_action"), after_seq=-1, limit=100
        )
    finally:
        await store.close()
    entries = [json.loads(row.entry) for row in rows]
    assert [(e["outcome"], e["actor"]) for e in entries if e["outcome"].startswith("tls_")] == [
        ("tls_reload_refused", "watch:file-change"),
        ("tls_reload_refused", "signal:SIGHUP"),
        ("tls_reloaded", "watch:file-change"),
    ]


async def test_an_expired_certificate_stops_the_start(config: GatewayConfig) -> None:
    pem = expired_certificate(config)
    config.tls.cert.write_bytes(pem)
    end = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    process = ServeProcess(config.source)
    assert await refused_start(process) == 2
    assert last_line(process) == (
        f"error: {config.tls.cert}: tls.cert: expired at {end.strftime('%Y-%m-%dT%H:%M:%S.000Z')}"
    )


async def test_tls_file_faults_name_their_file_and_key(config: GatewayConfig) -> None:
    tls = config.tls
    key = tls.key.read_bytes()
    tls.key.write_bytes(tls.cert.read_bytes())
    code, _, err = await run_cli("serve", "--config", str(config.source))
    assert (code, err.strip().splitlines()[-1]) == (
        2,
        f"error: {tls.key}: tls.key: holds no usable PEM private key ([SSL] PEM lib)",
    )
    tls.key.write_bytes(key)
    tls.ca.write_bytes(b"not a certificate\n")
    code, _, err = await run_cli("serve", "--config", str(config.source))
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"error: {tls.ca}: tls.ca: cannot load trust anchor: ")
    )


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("table", "host", "key", "reason"),
    [
        ("partner_listen", "999.1.1.1", "partner_listen.host", "Name or service not known"),
        ("api_listen", "no-such-host.invalid", "api_listen.host", "Name or service not known"),
        # TEST-NET-1: an address, but none of this host's
        ("partner_listen", "192.0.2.1", "partner_listen.host", "Cannot assign requested address"),
        ("api_listen", "127.0.0.1", "api_listen.port", "Address already in use"),
    ],
)
async def test_a_listener_that_cannot_open_is_named(
    config: GatewayConfig, port_in_use: int, table: str, host: str, key: str, reason: str
) -> None:
    port = port_in_use if key.endswith(".port") else 8443
    edit_toml(
        config.source,
        f'[{table}]\nhost = "127.0.0.1"\nport = 0\n',
        f'[{table}]\nhost = "{host}"\nport = {port}\n',
    )
    code, _, err = await run_cli("serve", "--config", str(config.source))
    assert (code, err.strip().splitlines()[-1]) == (
        2,
        f"error: {config.source}: {key}: cannot listen on {host!r} port {port}: {reason}",
    )
