"""Real ``c2c-gateway serve`` processes for the crash, replica and restart tests: start one on
a dev environment, wait for its ready line, SIGKILL it, start it again on the same config."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config import GatewayConfig
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import load_signing_key
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.schemas.registry import SchemaRegistry


def partner_client_ssl(pki: Path, party: str = "MX-ANAM") -> ssl.SSLContext:
    """A partner's mutual-TLS client context from the dev PKI."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / party / "tls.pem"), str(pki / party / "tls.key"))
    return context


def edit_toml(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def raise_rate_limit(config: GatewayConfig, partner: str) -> None:
    """Crash tests send far faster than a sample partner's rate allows."""
    toml = config.source.parent / "partners" / partner / "partner.toml"
    text = toml.read_text(encoding="utf-8")
    rate = "[rate]\nper_second = 100000.0\nburst = 100000\n"
    if "[rate]" not in text:
        toml.write_text(text + "\n" + rate, encoding="utf-8")
        return
    start = text.index("[rate]")
    end = text.index("\n[", start + 1)
    toml.write_text(text[:start] + rate + text[end:], encoding="utf-8")


async def run_cli(*args: str) -> tuple[int, str, str]:
    """One real ``c2c-gateway`` command to its end: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "c2c-gateway"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class ServeProcess:
    """One ``c2c-gateway serve --config PATH``; ``start`` may be called again after a kill."""

    config_path: Path
    #: a command that runs the rest of the command line, e.g. ``unshare`` with a mount
    prefix: tuple[str, ...] = ()
    #: the process's whole environment; None: this process's own
    env: dict[str, str] | None = None
    proc: asyncio.subprocess.Process | None = None
    partner_url: str = ""
    api_url: str = ""
    #: what the process wrote to stderr after its ready line (its JSON log lines), growing
    #: while it runs and kept after it ended
    stderr_log: bytearray = field(default_factory=bytearray, repr=False)
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self, *, may_die: bool = False) -> bool:
        """Start the process and wait for its ready line. With ``may_die``, a process that
        ends before it is ready (a crash test) is no failure: False, its lines kept in
        ``stderr_log`` and ``wait`` gives its exit status."""
        proc = await asyncio.create_subprocess_exec(
            *self.prefix,
            str(Path(sys.executable).parent / "c2c-gateway"),
            "serve",
            "--config",
            str(self.config_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        self.proc = proc
        assert proc.stderr is not None
        before_ready = bytearray()
        async with asyncio.timeout(60):
            while True:
                line = await proc.stderr.readline()
                if not line and may_die:
                    self.stderr_log += before_ready
                    return False
                assert line, "serve exited before it was ready"
                before_ready += line
                if line.startswith(b"{") and json.loads(line).get("event") == "serving":
                    ready = json.loads(line)
                    self.partner_url, self.api_url = ready["partner_url"], ready["api_url"]
                    break
        # keep reading so a chatty log never blocks the process on a full pipe
        self._drain = asyncio.create_task(self._collect(proc.stderr))
        return True

    async def _collect(self, stderr: asyncio.StreamReader) -> None:
        while chunk := await stderr.read(1 << 16):
            self.stderr_log += chunk

    async def kill(self) -> None:
        """SIGKILL: no graceful anything, like a power cut of the process."""
        proc, self.proc = self.proc, None
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await self._finish_drain()

    async def wait(self) -> int:
        """Wait for the process to end by itself (a crash); returns its exit status."""
        proc, self.proc = self.proc, None
        assert proc is not None
        code = await proc.wait()
        await self._finish_drain()
        return code

    async def stop(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await proc.wait()
        await self._finish_drain()
        return code

    async def _finish_drain(self) -> None:
        task, self._drain = self._drain, None
        if task is not None:
            await task


def signed_messages(
    pki: Path,
    *,
    sender: str,
    recipient: str,
    count: int,
    message_type: str,
    payload: dict[str, Any] | None = None,
) -> list[tuple[str, bytes, str]]:
    """``count`` distinct signed messages ``(message_id, body, signature)`` from ``sender``,
    each with ``payload`` (by default the message type's first example)."""
    key = load_signing_key(pki / sender / "sign.key", party=sender, alg="EdDSA")
    if payload is None:
        payload = SchemaRegistry.load_builtin().examples(message_type, "1.0")[0]
    out = []
    for _ in range(count):
        header = Header(
            message_id=new_message_id(),
            message_type=message_type,
            schema_version="1.0",
            sender=sender,
            recipient=recipient,
            created_at=dt.datetime.now(dt.UTC),
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=7),
        )
        body = encode_envelope(header, payload)
        out.append((header.message_id, body, sign_detached(body, key)))
    return out


async def send_until_receipt(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    signature: str,
    *,
    retried: tuple[int, ...] = (503,),
) -> tuple[int, bytes, str]:
    """POST a signed message until it is receipted (200 or 202), as a partner does across a
    gateway's restarts: a connection error, or an answer in ``retried`` (503 while the process
    starts or stops), is tried again after 50 ms; any other answer fails the test. Returns
    the status, the receipt and its signature."""
    headers = {"Content-Type": "application/json", "C2C-Signature": signature}
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                if response.status in (200, 202):
                    return response.status, answer, response.headers["C2C-Signature"]
                assert response.status in retried, (response.status, answer)
        await asyncio.sleep(0.05)


async def readiness(server: ServeProcess, pki: Path) -> tuple[int, dict[str, Any]]:
    """``GET /readyz`` on the internal API: its status and JSON body."""
    ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.api_url + "/readyz", ssl=ca) as response,
    ):
        return response.status, await response.json()
