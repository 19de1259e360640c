"""A full disk under a running ``c2c-gateway serve`` (RELIABILITY-SECURITY T70).

The SQLite store lives on a small tmpfs of the process's own: ``unshare`` gives it a private
mount namespace, and the test reaches that filesystem through ``/proc/PID/root``. The test fills
it to the last byte while a partner keeps sending. Every answer is then either an ACK of a
message really stored or 503 ``UNAVAILABLE``; the operator's log says so once. Once space is freed,
the partner's retries are each accepted once, the database passes ``PRAGMA integrity_check``
and the audit log verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from amqp_env import AMQP_PARTNER, GATEWAY, write_config
from amqp_peer import IN_EXCHANGE, OUT_QUEUE, preload, queue_depth
from outbound_env import free_port, gateway_config
from rabbit import RabbitVhost
from serve_proc import (
    ServeProcess,
    edit_toml,
    partner_client_ssl,
    raise_rate_limit,
    readiness,
    signed_messages,
)

PATH = "/c2c/v1/messages"
DISK_SIZE = "32m"
BEFORE = 40
DURING = 400
CLIENTS = 8
AMQP_BEFORE = 20
AMQP_DURING = 400
FULL = "unavailable: sqlite: OperationalError: database or disk is full"

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs util-linux unshare and nsenter",
)


def private_tmpfs(mountpoint: Path, size: str) -> tuple[str, ...]:
    """Run the command after it with a tmpfs of ``size`` mounted on ``mountpoint``, seen by
    that process alone (root maps to itself; anyone else gets a user namespace)."""
    user = () if os.geteuid() == 0 else ("--map-root-user",)
    script = f'mount -t tmpfs -o size={size} c2c-test "$0" && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", *user, "sh", "-c", script)


def enter_mounts_of(pid: int) -> tuple[str, ...]:
    """Run the command after it in the mount namespace of process ``pid``."""
    user = () if os.geteuid() == 0 else ("--user", "--preserve-credentials")
    return ("nsenter", f"--target={pid}", "--mount", *user)


async def depth_at_least(vhost: RabbitVhost, queue: str, count: int) -> None:
    while True:
        if await queue_depth(vhost, queue) >= count:
            return
        await asyncio.sleep(0.1)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem refuses another byte."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
    assert os.statvfs(folder).f_bavail == 0
    return filler


async def post(
    session: aiohttp.ClientSession, url: str, message: tuple[str, bytes, str]
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    _, body, signature = message
    headers = {"Content-Type": "application/json", "C2C-Signature": signature}
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, json.loads(await response.read()), dict(response.headers)


async def test_full_disk_answers_503_acknowledges_only_what_is_stored_and_recovers(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = gateway_config(tmp_path, "US-CBP", partner_port=port)
    raise_rate_limit(config, "MX-ANAM")
    disk = config.source.parent / "disk"
    disk.mkdir()
    edit_toml(
        config.source, 'store_url = "sqlite:///c2c.db"', 'store_url = "sqlite:///disk/c2c.db"'
    )
    pki = tmp_path / "pki"
    messages = signed_messages(
        pki,
        sender="MX-ANAM",
        recipient="US-CBP",
        count=BEFORE + DURING,
        message_type="shipment.advance_data",
    )
    server = ServeProcess(config.source, prefix=(*private_tmpfs(disk, DISK_SIZE), str(disk)))
    await server.start()
    assert server.proc is not None
    seen = Path(f"/proc/{server.proc.pid}/root") / disk.relative_to("/")
    url = f"https://127.0.0.1:{port}{PATH}"
    receipts: dict[str, dict[str, Any]] = {}
    refused: list[tuple[str, bytes, str]] = []
    try:
        assert os.statvfs(seen).f_blocks * os.statvfs(seen).f_frsize <= 32 << 20
        connector = aiohttp.TCPConnector(ssl=partner_client_ssl(pki), limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector) as session:
            for message in messages[:BEFORE]:
                status, answer, _ = await post(session, url, message)
                assert status == 202, answer
                receipts[message[0]] = answer

            filler = fill(seen)
            queue = list(messages[BEFORE:])

            async def client() -> None:
                while queue:
                    message = queue.pop()
                    status, answer, headers = await post(session, url, message)
                    if status == 202:
                        assert answer["payload"]["status"] == "ACK"
                        receipts[message[0]] = answer
                        continue
                    # the signed NACK of PROTOCOL section 4: nothing was kept, retry
                    assert status == 503, (status, answer)
                    assert answer["payload"]["status"] == "NACK"
                    assert answer["payload"]["code"] == "UNAVAILABLE"
                    assert "Retry-After" in headers
                    refused.append(message)

            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            assert refused, "the disk never filled up: nothing was refused"
            # a full disk is not ready: the probe write fails
            status, ready = await readiness(server, pki)
            assert status == 503, ready
            assert ready["checks"]["store"] == FULL, ready

            filler.unlink()
            # ready again before any message is written: the probe write itself commits
            assert (await readiness(server, pki))[0] == 200
            # the partner tries again; until the checkpointer catches up, the WAL of the
            # retries can fill the disk again, and those are refused the same way
            async with asyncio.timeout(120):
                for message in refused:
                    status, answer, _ = await post(session, url, message)
                    for _ in range(1000):
                        if status != 503:
                            break
                        await asyncio.sleep(0.05)
                        status, answer, _ = await post(session, url, message)
                    assert status == 202, (status, answer)
                    receipts[message[0]] = answer
            # every message, whenever it was ACKed, is stored: a re-send is answered with the
            # receipt it got the first time
            for message in messages:
                status, answer, _ = await post(session, url, message)
                assert (status, answer) == (200, receipts[message[0]])

        # SQLite resolves the /proc/PID/root link, so the store is read from inside the
        # server's namespace: the real backup command checks it and copies it out
        copy = tmp_path / "copy.db"
        backup = await asyncio.create_subprocess_exec(
            *enter_mounts_of(server.proc.pid),
            str(Path(sys.executable).parent / "c2c-gateway"),
            "store",
            "backup",
            "--config",
            str(config.source),
            str(copy),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said = (await backup.communicate())[0].decode()
        assert backup.returncode == 0, said
        assert f"OK {copy}:" in said, said
        database = sqlite3.connect(copy)
        try:
            stored = database.execute(
                "SELECT message_id FROM inbound_messages WHERE sender = 'MX-ANAM'"
            ).fetchall()
        finally:
            database.close()
        assert sorted(m for (m,) in stored) == sorted(m[0] for m in messages)
    finally:
        code = await server.stop()
    assert code == 0, server.stderr_log.decode()[-3000:]
    # the operator hears of it once when writes start failing and once when they recover
    events = [
        json.loads(line)
        for line in server.stderr_log.splitlines()
        if line.startswith(b"{") and b"sqlite_write" in line
    ]
    assert events, "no sqlite_write_failed log"
    for failed, recovered in zip(events[::2], events[1::2], strict=True):
        assert failed["event"] == "sqlite_write_failed"
        assert failed["error"] == "OperationalError: database or disk is full"
        assert recovered["event"] == "sqlite_writes_recovered"
        assert recovered["failed_transactions"] >= 1


@pytest.mark.rabbitmq
async def test_full_disk_holds_amqp_deliveries_instead_of_dead_lettering_them(
    tmp_path: Path, rabbit_vhost: RabbitVhost
) -> None:
    """Over AMQP a full disk is an outage, not a poison message: the deliveries in hand are
    held and tried again (none counted against the delivery limit and dead-lettered), and each
    is stored and ACKed once space is freed."""
    source = write_config(tmp_path, amqp_url=rabbit_vhost.url(), delivery_limit=3)
    disk = tmp_path / "disk"
    disk.mkdir()
    edit_toml(source, 'store_url = "sqlite:///c2c.db"', 'store_url = "sqlite:///disk/c2c.db"')
    messages = signed_messages(
        tmp_path / "certs",
        sender=AMQP_PARTNER,
        recipient=GATEWAY,
        count=AMQP_BEFORE + AMQP_DURING,
        message_type="shipment.advance_data",
    )
    server = ServeProcess(source, prefix=(*private_tmpfs(disk, DISK_SIZE), str(disk)))
    await server.start()
    assert server.proc is not None
    seen = Path(f"/proc/{server.proc.pid}/root") / disk.relative_to("/")
    try:
        await preload(rabbit_vhost, messages[:AMQP_BEFORE], message_type="shipment.advance_data")
        await asyncio.wait_for(depth_at_least(rabbit_vhost, OUT_QUEUE, AMQP_BEFORE), 30)

        filler = fill(seen)
        await preload(rabbit_vhost, messages[AMQP_BEFORE:], message_type="shipment.advance_data")
        # the WAL's space already taken takes some more; then a delivery refused as a
        # processing failure would be tried delivery_limit + 1 times in well under a second,
        # then dead-lettered; held, it waits for the disk
        await asyncio.sleep(4)
        assert await queue_depth(rabbit_vhost, f"{IN_EXCHANGE}.dead") == 0
        assert await queue_depth(rabbit_vhost, OUT_QUEUE) < len(messages), "the disk never filled"
        status, ready = await readiness(server, tmp_path / "certs")
        assert (status, ready["checks"]["store"]) == (503, FULL), ready

        filler.unlink()
        await asyncio.wait_for(depth_at_least(rabbit_vhost, OUT_QUEUE, len(messages)), 60)
        assert (await readiness(server, tmp_path / "certs"))[0] == 200
        assert await queue_depth(rabbit_vhost, f"{IN_EXCHANGE}.dead") == 0
        assert await queue_depth(rabbit_vhost, IN_EXCHANGE) == 0
    finally:
        code = await server.stop()
    assert code == 0, server.stderr_log.decode()[-3000:]
    connection = await aio_pika.connect(rabbit_vhost.url())
    try:
        channel = await connection.channel()
        out = await channel.declare_queue(OUT_QUEUE, passive=True)
        answered: list[str] = []
        while (message := await out.get(no_ack=True, fail=False)) is not None:
            receipt = json.loads(message.body)["payload"]
            assert receipt["status"] == "ACK", receipt
            answered.append(receipt["ref_message_id"])
    finally:
        await connection.close()
    assert sorted(answered) == sorted(message_id for message_id, _, _ in messages)
    logged = [
        json.loads(line)["event"]
        for line in server.stderr_log.splitlines()
        if line.startswith(b"{") and b'"amqp_processing_failed"' in line
    ]
    assert not logged, f"{len(logged)} deliveries counted as processing failures"
