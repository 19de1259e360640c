"""``c2c-gateway demo``: three customs gateways on loopback, exchanging every message type.

Nothing needs configuring: a temporary directory gets a development PKI and one gateway per
party (US-CBP, MX-ANAM, CA-CBSA), each with the others as partners, embedded SQLite and the
in-process bus, talking real mutual TLS. Then:

- US-CBP sends MX-ANAM one message of every one-way type (schema ``examples`` as payloads),
  an assistance request (MX-ANAM's demo responder answers it with an assistance response)
  and both queries (answered with query.response, correlated by ``in_reply_to``);
- MX-ANAM does the same the other way, and US-CBP sends CA-CBSA a risk alert;
- a tampered message is refused as SIGNATURE_INVALID, an old message replayed after the
  window as STALE, and an exact re-send is answered with its original receipt;
- every gateway offers its signed audit checkpoint to its partners (``audit.checkpoint``),
  which witness and cosign it (``audit.cosignature``); each cosignature is verified and stored.

Every message goes through the internal API (JWT bearer) and the dispatcher, every receipt
is verified by its sender. The result is a summary table; anything unexpected makes the
run fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.api.auth import ALL_SCOPES
from gateway.audit.witnessing import WitnessingService, attach_witnessing
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, OutboxConfig, load_config
from gateway.crypto.jws import sign_detached
from gateway.crypto.keys import load_signing_key
from gateway.crypto.tokens import issue_token
from gateway.devenv import prepare_dev_environment
from gateway.envelope import body_digest, encode_envelope, new_message_id
from gateway.errors import GatewayError
from gateway.model import Header
from gateway.outbound.service import attach_outbound
from gateway.outbound.transport import Delivery, PartnerReply
from gateway.receipts import verify_receipt
from gateway.runtime import Gateway
from gateway.store.base import InboundRecord, OutboundState
from gateway.transports.https_client import HttpsTransport

HOME = "US-CBP"
PARTIES = ("US-CBP", "MX-ANAM", "CA-CBSA")
ONE_WAY_TYPES = (
    "shipment.advance_data",
    "shipment.manifest",
    "shipment.export_declaration",
    "shipment.status",
    "enforcement.risk_alert",
    "enforcement.seizure_report",
)
REQUEST_TYPE = "enforcement.assistance_request"
RESPONSE_TYPE = "enforcement.assistance_response"
QUERY_TYPES = ("query.shipment_lookup", "query.trader_lookup")
QUERY_RESPONSE = "query.response"
FINAL = frozenset({OutboundState.ACKNOWLEDGED, OutboundState.REJECTED, OutboundState.DEAD})
DEMO_OUTBOX = OutboxConfig(
    max_attempts=5,
    base_delay_s=0.2,
    max_delay_s=1.0,
    default_ttl_s=3600,
    send_timeout_s=5.0,
    breaker_failures=5,
    breaker_reset_s=2.0,
    poll_interval_s=0.05,
)


class DemoFailure(Exception):
    """Something the demo expected did not happen."""


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One running gateway and an internal-API client for it."""

    party: str
    gateway: Gateway
    api_url: str
    token: str
    ssl_context: ssl.SSLContext
    session: aiohttp.ClientSession
    witnessing: WitnessingService
    answered: list[str] = field(default_factory=list)

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.config

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.api_url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            ssl=self.ssl_context,
        ) as response:
            return response.status, await response.json(content_type=None)

    async def send(
        self,
        recipient: str,
        message_type: str,
        payload: dict[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        if payload is None:
            payload = self.gateway.registry.examples(message_type, "1.0")[0]
        status, body = await self.call(
            "POST",
            "/api/v1/messages",
            {"recipient": recipient, "message_type": message_type, "payload": payload, **extra},
        )
        if status != 202:
            raise DemoFailure(f"{self.party} could not submit {message_type}: {status} {body}")
        return str(body["message_id"])


@dataclass
class Tally:
    sent: int = 0
    receipted: int = 0
    rejected: int = 0


@dataclass
class Report:
    rows: dict[tuple[str, str], Tally] = field(default_factory=dict)
    checks: list[tuple[str, str, bool]] = field(default_factory=list)

    def row(self, direction: str, message_type: str) -> Tally:
        return self.rows.setdefault((direction, message_type), Tally())

    def check(self, what: str, outcome: str, ok: bool) -> None:
        self.checks.append((what, outcome, ok))

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.checks) and all(
            t.sent == t.receipted and t.rejected == 0 for t in self.rows.values()
        )

    def render(self) -> str:
        lines = [
            f"{'direction':<18} {'message type':<34} {'sent':>5} {'receipted':>10} {'rejected':>9}",
            "-" * 80,
        ]
        directions = list(dict.fromkeys(direction for direction, _ in self.rows))
        for (direction, message_type), t in sorted(
            self.rows.items(), key=lambda item: (directions.index(item[0][0]), item[0][1])
        ):
            lines.append(
                f"{direction:<18} {message_type:<34} {t.sent:>5} {t.receipted:>10} {t.rejected:>9}"
            )
        total = Tally(
            sent=sum(t.sent for t in self.rows.values()),
            receipted=sum(t.receipted for t in self.rows.values()),
            rejected=sum(t.rejected for t in self.rows.values()),
        )
        lines += [
            "-" * 80,
            f"{'total':<18} {'':<34} {total.sent:>5} {total.receipted:>10} {total.rejected:>9}",
            "",
            f"{'check':<54} {'outcome':<22} result",
            "-" * 80,
        ]
        for what, outcome, ok in self.checks:
            lines.append(f"{what:<54} {outcome:<22} {'ok' if ok else 'FAILED'}")
        return "\n".join(lines)


def _configs(root: Path, host: str) -> dict[str, GatewayConfig]:
    ports = {party: _free_port(host) for party in PARTIES}
    configs = {}
    for party in PARTIES:
        peers = {other: f"https://{host}:{port}" for other, port in ports.items() if other != party}
        path = prepare_dev_environment(
            root / party,
            party=party,
            pki_dir=root / "pki",
            host=host,
            partner_port=ports[party],
            peers=peers,
        )
        configs[party] = dataclasses.replace(load_config(path), outbox=DEMO_OUTBOX)
    return configs


def _responder(node: Node, tasks: set[asyncio.Task[None]]) -> Callable[[InboundRecord], Any]:
    """The partner-side demo system: answers assistance requests and queries via its API."""

    async def answer(record: InboundRecord) -> None:
        reply_type = RESPONSE_TYPE if record.message_type == REQUEST_TYPE else QUERY_RESPONSE
        assert record.body is not None  # just received: retention purges only old bodies
        request = orjson.loads(record.body)["payload"]
        message_id = await node.send(
            record.sender,
            reply_type,
            node.gateway.registry.answer_example(reply_type, "1.0", request),
            in_reply_to=record.message_id,
            correlation_id=record.correlation_id,
        )
        node.answered.append(message_id)

    async def on_inbound(record: InboundRecord) -> None:
        if record.message_type == REQUEST_TYPE or record.message_type in QUERY_TYPES:
            # Answer off the relay's path: the bus delivery must not wait for our round trip.
            task = asyncio.create_task(answer(record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return on_inbound


async def _wait_final(node: Node, message_ids: Sequence[str], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(message_ids)
    while pending:
        record = await node.gateway.store.get_outbound(pending[0])
        if record is not None and record.state in FINAL:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            state = record.state.value if record is not None else "missing"
            raise DemoFailure(
                f"{node.party}: message {pending[0]} still {state} after {timeout_s}s"
            )
        await asyncio.sleep(0.05)


async def _tally(node: Node, recipient: str, ids: Sequence[str], report: Report) -> None:
    for message_id in ids:
        record = await node.gateway.store.get_outbound(message_id)
        assert record is not None
        tally = report.row(f"{node.party} -> {recipient}", record.message_type)
        tally.sent += 1
        if record.state is OutboundState.ACKNOWLEDGED:
            tally.receipted += 1
        else:
            tally.rejected += 1


async def _wait_reply(
    node: Node, message_id: str, *, partner: str, timeout_s: float
) -> InboundRecord | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = await node.gateway.store.find_inbound_reply(message_id, sender=partner)
        if reply is not None:
            return reply
        await asyncio.sleep(0.05)
    return None


async def _exchange(sender: Node, recipient: Node, report: Report) -> None:
    """Every type from ``sender`` to ``recipient``; requests and queries answered back."""
    ids = [await sender.send(recipient.party, message_type) for message_type in ONE_WAY_TYPES]
    request_id = await sender.send(recipient.party, REQUEST_TYPE)
    ids.append(request_id)
    for query_type in QUERY_TYPES:
        status, body = await sender.call(
            "POST",
            "/api/v1/queries",
            {
                "partner": recipient.party,
                "message_type": query_type,
                "params": sender.gateway.registry.examples(query_type, "1.0")[0],
                "timeout_s": 20,
            },
        )
        response = body.get("response") if status == 200 else None
        answered = (
            response is not None
            and response["message_type"] == QUERY_RESPONSE
            and response["in_reply_to"] == body["query_id"]
        )
        report.check(
            f"{sender.party} {query_type}: answer in_reply_to it",
            "200 query.response" if answered else f"HTTP {status}",
            answered,
        )
        ids.append(str(body["query_id"]))
    await _wait_final(sender, ids, timeout_s=20)
    await _tally(sender, recipient.party, ids, report)
    reply = await _wait_reply(sender, request_id, partner=recipient.party, timeout_s=20)
    report.check(
        f"{sender.party} assistance_request: answered",
        reply.message_type.split(".")[1] if reply else "no answer",
        reply is not None and reply.message_type == RESPONSE_TYPE,
    )
    answers = list(recipient.answered)
    recipient.answered.clear()
    await _wait_final(recipient, answers, timeout_s=20)
    await _tally(recipient, sender.party, answers, report)


async def _post_as(
    node: Node, recipient: GatewayConfig, body: bytes, signature: str
) -> PartnerReply:
    """Send raw bytes to ``recipient``'s partner endpoint as ``node`` (its mTLS identity)."""
    transport = HttpsTransport(node.config.tls, timeout_s=10.0)
    try:
        partner = node.config.partners[recipient.party]
        reply = await transport.send(
            Delivery(
                partner=partner,
                sender=node.party,
                message_id=str(orjson.loads(body)["header"]["message_id"]),
                message_type="demo",
                body=body,
                signature=signature,
            )
        )
    finally:
        await transport.aclose()
    assert isinstance(reply, PartnerReply)
    return reply


def _nack_code(node: Node, reply: PartnerReply, body: bytes, recipient: str) -> str:
    """The verified receipt's outcome (``ACK`` or the NACK code), or why it did not verify."""
    if reply.signature is None:
        return f"HTTP {reply.status}, no receipt"
    try:
        receipt = verify_receipt(
            reply.body,
            reply.signature,
            node.gateway.keyring,
            recipient,
            str(orjson.loads(body)["header"]["message_id"]),
            body_digest(body),
        )
    except GatewayError as exc:
        return f"bad receipt: {exc.code}"
    return receipt.code.value if receipt.code is not None else receipt.status


def _signed(
    node: Node, recipient: str, message_type: str, *, age_s: float = 0
) -> tuple[bytes, str]:
    now = SystemClock().now() - timedelta(seconds=age_s)
    header = Header(
        message_id=new_message_id(),
        message_type=message_type,
        schema_version="1.0",
        sender=node.party,
        recipient=recipient,
        created_at=now,
        expires_at=now + timedelta(days=7),
    )
    body = encode_envelope(header, node.gateway.registry.examples(message_type, "1.0")[0])
    return body, sign_detached(body, node.gateway.signing_keys[0])


async def _attacks(partner: Node, home: Node, report: Report) -> None:
    """What an attacker or a confused peer does, and how the home gateway answers."""
    body, signature = _signed(partner, home.party, "shipment.status")
    tampered = body.replace(b'"payload":{', b'"payload":{"x":0,', 1)
    reply = await _post_as(partner, home.config, tampered, signature)
    outcome = _nack_code(partner, reply, tampered, home.party)
    report.check(
        "tampered message (payload changed after signing)",
        f"{reply.status} {outcome}",
        (reply.status, outcome) == (401, "SIGNATURE_INVALID"),
    )

    window_s = home.config.limits.replay_window_s
    old_body, old_signature = _signed(partner, home.party, "shipment.status", age_s=window_s + 60)
    reply = await _post_as(partner, home.config, old_body, old_signature)
    outcome = _nack_code(partner, reply, old_body, home.party)
    report.check(
        f"old message replayed after the {window_s // 60} min window",
        f"{reply.status} {outcome}",
        (reply.status, outcome) == (422, "STALE"),
    )

    body, signature = _signed(partner, home.party, "enforcement.risk_alert")
    first = await _post_as(partner, home.config, body, signature)
    again = await _post_as(partner, home.config, body, signature)
    outcome = _nack_code(partner, again, body, home.party)
    same = (first.body, first.signature) == (again.body, again.signature)
    report.check(
        "exact re-send of an accepted message",
        f"{again.status} {'original receipt' if same else 'new receipt'}",
        first.status == 202 and again.status == 200 and same and outcome == "ACK",
    )


async def _witnessing(nodes: Sequence[Node], report: Report, *, timeout_s: float) -> None:
    """Each gateway offers its checkpoint; each partner must cosign exactly that tree."""
    offered: dict[str, int] = {}
    for node in nodes:
        await node.witnessing.send_checkpoints(force=True)
        latest = await node.gateway.store.latest_checkpoint()
        assert latest is not None
        offered[node.party] = latest.size
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        size = offered[node.party]
        for partner in sorted(node.witnessing.peers):
            cosigned = False
            while not cosigned and time.monotonic() < deadline:
                rows = await node.gateway.store.cosignatures(size)
                cosigned = any(row.partner == partner for row in rows)
                if not cosigned:
                    await asyncio.sleep(0.05)
            report.check(
                f"{node.party} checkpoint (size {size}) cosigned by {partner}",
                "cosignature verified" if cosigned else "no cosignature",
                cosigned,
            )


async def _start(config: GatewayConfig, tasks: set[asyncio.Task[None]]) -> Node:
    gateway = Gateway(config)
    dispatcher, api = attach_outbound(gateway)
    assert api is not None
    witnessing = attach_witnessing(gateway, wake=dispatcher.dispatcher.wake)
    await gateway.start()
    auth = config.api_auth
    assert auth.signing_key is not None
    key = load_signing_key(auth.signing_key, party="api", alg=auth.algorithms[0])
    token = issue_token(
        key,
        issuer=auth.issuer,
        audience=auth.audience,
        subject="demo",
        scopes=ALL_SCOPES,
        ttl_s=600,
        now=SystemClock().now(),
    )
    node = Node(
        party=config.party,
        gateway=gateway,
        api_url=api.url,
        token=token,
        ssl_context=ssl.create_default_context(cafile=str(config.tls.ca)),
        session=aiohttp.ClientSession(),
        witnessing=witnessing,
    )
    gateway.bus.subscribe(_responder(node, tasks))
    return node


async def run_demo(*, root: Path | None = None, echo: Callable[[str], None] = print) -> Report:
    """Run the whole demo in ``root`` (a temporary directory when None); return its report."""
    with tempfile.TemporaryDirectory(prefix="c2c-demo-") as scratch:
        base = root if root is not None else Path(scratch)
        configs = _configs(base, "127.0.0.1")
        tasks: set[asyncio.Task[None]] = set()
        nodes: dict[str, Node] = {}
        report = Report()
        try:
            for party in PARTIES:
                nodes[party] = await _start(configs[party], tasks)
                echo(
                    f"started {party:<8} partner endpoint {nodes[party].gateway.partner_url}"
                    f"  internal API {nodes[party].api_url}"
                )
            home, mexico, canada = (nodes[party] for party in PARTIES)
            echo(f"\n{HOME} <-> {mexico.party}: every message type, both ways (mutual TLS)...")
            await _exchange(home, mexico, report)
            await _exchange(mexico, home, report)
            echo(f"{HOME} -> {canada.party}: a risk alert...")
            alert = await home.send(canada.party, "enforcement.risk_alert")
            await _wait_final(home, [alert], timeout_s=20)
            await _tally(home, canada.party, [alert], report)
            echo(f"{mexico.party} as a careless or hostile peer: tampering, replay, re-send...")
            await _attacks(mexico, home, report)
            echo("mutual witnessing: every gateway's audit checkpoint cosigned by its partners...")
            await _witnessing(list(nodes.values()), report, timeout_s=20)
        finally:
            for node in nodes.values():
                await node.session.close()
            for task in list(tasks):
                task.cancel()
            for node in reversed(list(nodes.values())):
                await node.gateway.stop()
        return report
