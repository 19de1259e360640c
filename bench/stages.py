"""CPU per message of the inbound path's in-process stages, each beside its raw building block.

    .venv/bin/python -m bench --only stages

No sockets, no store: one process times each stage on the benchmark's pre-signed
``shipment.advance_data`` envelopes (2.1 KB), and the library call that stage is built on,
alternating them in rounds so that a noisy neighbour slows both. The figures say what each
stage adds to its building block (strictness, checks, bookkeeping), which the end-to-end
benchmarks cannot separate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.common import HOME, MESSAGE_TYPE, PARTNER, Table, prepare, scaled, sign_messages
from gateway.config import load_config
from gateway.crypto.jws import raw_sign, verify_detached
from gateway.crypto.keys import load_signing_key
from gateway.envelope import body_digest, parse_envelope
from gateway.receipts import ReceiptSigner
from gateway.runtime import load_own_signing_keys, load_partner_keys
from gateway.schemas.registry import SchemaRegistry

#: rounds of alternated baseline/gateway timing; the median round is reported
ROUNDS = 7


def _per_call_us(fn: Callable[[int], object], calls: int) -> float:
    started = time.process_time()
    for i in range(calls):
        fn(i)
    return (time.process_time() - started) / calls * 1e6


def _pair(
    table: Table, metric: str, raw: Callable[[int], object], gw: Callable[[int], object], n: int
) -> tuple[float, float]:
    raw(0), gw(0)  # warm caches and lazily built state
    rounds = [(_per_call_us(raw, n), _per_call_us(gw, n)) for _ in range(ROUNDS)]
    base = statistics.median(r for r, _ in rounds)
    mine = statistics.median(g for _, g in rounds)
    table.add(metric, base, mine, "us")
    return base, mine


async def stages(root: Path) -> Table:
    config = load_config(prepare(root))
    lines = sign_messages(root, root / "stages.jsonl", count=500)
    signed = [orjson.loads(line) for line in lines.read_bytes().splitlines()]
    bodies: list[bytes] = [item["b"].encode() for item in signed]
    jws: list[str] = [item["s"] for item in signed]
    count = len(bodies)
    keyring = load_partner_keys(config)
    registry = SchemaRegistry.load_builtin()
    signer = ReceiptSigner(party=HOME, keys=load_own_signing_keys(config), clock=_Clock())
    envelopes = [parse_envelope(b, max_bytes=1 << 20) for b in bodies]
    payloads: list[dict[str, Any]] = [e.payload for e in envelopes]
    validator = registry._entry(MESSAGE_TYPE, "1.0").validator  # the raw block
    # the partner's Ed25519 key that signed the envelopes, and ours that signs receipts
    theirs = load_signing_key(root / PARTNER / "sign.key", party=PARTNER, alg="EdDSA")
    their_public = theirs.verification_key().public_key
    raw_signatures = [raw_sign(theirs, b) for b in bodies]
    ours = signer.current_key()
    n = int(scaled(2000, 300))

    table = Table("Inbound stages in-process, CPU per message (raw building block vs stage)")
    total_raw = total_gw = 0.0
    steps: list[tuple[str, Callable[[int], object], Callable[[int], object]]] = [
        (
            "parse: orjson.loads vs parse_envelope (strict JSON, header checks)",
            lambda i: orjson.loads(bodies[i % count]),
            lambda i: parse_envelope(
                bodies[i % count], max_bytes=1 << 20, is_known_type=registry.is_known
            ),
        ),
        (
            "signature: Ed25519 verify of the body vs verify_detached (JWS form, kid, b64url)",
            lambda i: their_public.verify(raw_signatures[i % count], bodies[i % count]),
            lambda i: verify_detached(
                jws[i % count],
                bodies[i % count],
                keyring=keyring,
                party=PARTNER,
                at=None,
                accepted_typs=("c2c+json",),
                any_party=True,
            ),
        ),
        (
            "schema: jsonschema-rs validate vs registry.validate (+ cross-field rules)",
            lambda i: validator.validate(payloads[i % count]),
            lambda i: registry.validate(MESSAGE_TYPE, "1.0", payloads[i % count]),
        ),
        (
            "receipt: our key signs 600 bytes vs ReceiptSigner.sign (envelope, JWS)",
            lambda i: raw_sign(ours, bodies[i % count][:600]),
            lambda i: signer.sign(
                recipient=PARTNER,
                ref_message_id=envelopes[i % count].header.message_id,
                ref_digest=body_digest(bodies[i % count]),
                received_at=_NOW,
                status="ACK",
            ),
        ),
    ]
    for metric, raw, gw in steps:
        base, mine = _pair(table, metric, raw, gw, n)
        total_raw += base
        total_gw += mine
    table.add("sum of the stages above", total_raw, total_gw, "us")
    table.notes += [
        f"median of {ROUNDS} alternated rounds of {n:,} calls each, process CPU time",
        "the end-to-end c=32 server CPU per message (section 1) includes these, TLS, HTTP,"
        " the store's transaction and the audit append",
    ]
    return table


_NOW = datetime.now(UTC)


class _Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()
