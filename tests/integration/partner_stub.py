"""A scriptable partner endpoint over real mutual TLS, for the dispatcher's fault tests.

Each request takes the next behaviour from a script (the last one repeats) and is recorded
with its exact body and signature, so tests can check that every retry sent identical bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web

from gateway.clock import SystemClock
from gateway.config import TlsConfig
from gateway.crypto.keys import load_signing_key
from gateway.envelope import body_digest
from gateway.errors import NackCode
from gateway.receipts import ReceiptSigner
from gateway.transports.tls import server_context


@dataclass(frozen=True)
class Seen:
    body: bytes
    signature: str | None
    at: float


@dataclass
class PartnerStub:
    pki: Path
    party: str = "MX-ANAM"
    behaviours: list[str] = field(default_factory=lambda: ["ack"])
    seen: list[Seen] = field(default_factory=list)
    slow_s: float = 2.0
    _runner: web.AppRunner | None = None
    port: int = 0

    def _signer(self, key_party: str) -> ReceiptSigner:
        key = load_signing_key(self.pki / key_party / "sign.key", party=self.party, alg="EdDSA")
        return ReceiptSigner(party=self.party, keys=[key], clock=SystemClock())

    def _receipt(
        self,
        body: bytes,
        *,
        status: str = "ACK",
        code: NackCode | None = None,
        key_party: str | None = None,
        digest: str | None = None,
        http: int = 202,
    ) -> web.Response:
        envelope = orjson.loads(body)
        receipt = self._signer(key_party or self.party).sign(
            recipient=envelope["header"]["sender"],
            ref_message_id=envelope["header"]["message_id"],
            ref_digest=digest or body_digest(body),
            received_at=SystemClock().now(),
            status="ACK" if status == "ACK" else "NACK",
            code=code,
            detail=None if code is None else "refused by the stub",
        )
        return web.Response(
            status=http,
            body=receipt.body,
            content_type="application/json",
            headers={"C2C-Signature": receipt.signature},
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(
                body=body,
                signature=request.headers.get("C2C-Signature"),
                at=asyncio.get_running_loop().time(),
            )
        )
        index = min(len(self.seen) - 1, len(self.behaviours) - 1)
        behaviour = self.behaviours[index]
        actions: dict[str, Callable[[], web.StreamResponse]] = {
            "ack": lambda: self._receipt(body),
            "nack": lambda: self._receipt(
                body, status="NACK", code=NackCode.SCHEMA_INVALID, http=400
            ),
            "nack_unavailable": lambda: self._receipt(
                body, status="NACK", code=NackCode.UNAVAILABLE, http=503
            ),
            "nack_stale": lambda: self._receipt(body, status="NACK", code=NackCode.STALE, http=422),
            "ack_wrong_key": lambda: self._receipt(body, key_party="CA-CBSA"),
            "ack_wrong_digest": lambda: self._receipt(body, digest=body_digest(b"other bytes")),
            "503": lambda: web.Response(status=503, text="busy"),
            "429": lambda: web.Response(status=429, headers={"Retry-After": "120"}),
            "400": lambda: web.Response(status=400, text="bad"),
            "200_empty": lambda: web.Response(status=200),
            "302": lambda: web.Response(
                status=302, headers={"Location": "https://127.0.0.1:9/elsewhere"}
            ),
        }
        if behaviour == "slow":
            await asyncio.sleep(self.slow_s)
            return self._receipt(body)
        return actions[behaviour]()

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_post("/c2c/v1/messages", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        tls = TlsConfig(
            cert=self.pki / self.party / "tls.pem",
            key=self.pki / self.party / "tls.key",
            ca=self.pki / "ca.pem",
        )
        site = web.TCPSite(runner, host, port, ssl_context=server_context(tls, []))
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return f"https://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
