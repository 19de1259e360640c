"""A partner's rate holds across gateway replicas on one PostgreSQL store: two gateways, one
partner sending to both, and together they accept no more than its burst."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from https_env import MX, Env, make_message, post, write_environment

from gateway.config import load_config
from gateway.crypto.keys import KeyRing, load_signing_key
from gateway.runtime import Gateway
from gateway.transports.bus import MemoryBus

pytestmark = pytest.mark.postgres

BURST = 8


def shared_setup(root: Path, pg_dsn: str) -> None:
    write_environment(root)
    config = root / "gateway.toml"
    text = config.read_text(encoding="utf-8")
    start = text.index("store_url = ")
    end = text.index("\n", start)
    config.write_text(text[:start] + f'store_url = "{pg_dsn}"' + text[end:], encoding="utf-8")
    partner = root / "partners" / MX / "partner.toml"
    text = partner.read_text(encoding="utf-8")
    assert "per_second = 1000.0\nburst = 1000\n" in text
    # Next to no refill: what the two accept together is the burst.
    partner.write_text(
        text.replace("per_second = 1000.0\nburst = 1000\n", f"per_second = 0.01\nburst = {BURST}\n")
    )


async def test_two_replicas_share_one_partner_rate(tmp_path: Path, pg_dsn: str) -> None:
    shared_setup(tmp_path, pg_dsn)
    config = load_config(tmp_path / "gateway.toml")
    replicas = [Gateway(config, bus=MemoryBus()) for _ in range(2)]
    for gateway in replicas:
        await gateway.start()
    keys = {MX: load_signing_key(tmp_path / "pki" / MX / "sign.key", party=MX, alg="EdDSA")}
    try:
        envs = [
            Env(tmp_path, gateway, [], asyncio.Event(), keys, KeyRing([])) for gateway in replicas
        ]
        statuses: Counter[tuple[int, int]] = Counter()
        for i in range(3 * BURST):
            env = envs[i % 2]
            _, body = make_message(env)
            statuses[(i % 2, (await post(env, body)).status)] += 1
    finally:
        for gateway in replicas:
            await gateway.stop()
    accepted = statuses[(0, 202)] + statuses[(1, 202)]
    assert accepted == BURST, statuses
    # both replicas took part, and every other message was told to wait
    assert statuses[(0, 202)] > 0
    assert statuses[(1, 202)] > 0
    assert statuses[(0, 429)] + statuses[(1, 429)] == 2 * BURST
