"""Partners' signing keys taken in again while serving (gateway.reload, SIGHUP with `serve`):
a key revoked or rotated in partner.toml takes effect from the next message; a configuration
that does not load changes nothing; every change is audited."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from https_env import MX, Env, make_message, post, running_gateway

from gateway.crypto.keys import SigningKey, jwk_thumbprint, load_signing_key
from gateway.store.base import AuditFilter


def partner_toml(env: Env) -> Path:
    return env.root / "partners" / MX / "partner.toml"


def edit(env: Env, old: str, new: str) -> None:
    path = partner_toml(env)
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


async def status_of(env: Env, key: SigningKey | None = None) -> tuple[int, str]:
    """Send one message from MX-ANAM, signed with ``key`` (default: its configured key)."""
    if key is not None:
        env.keys[MX] = key
    _, body = make_message(env)
    answer = await post(env, body)
    payload = answer.json().get("payload", {})
    return answer.status, payload.get("code") or payload.get("status") or ""


async def key_changes(env: Env) -> list[dict[str, str]]:
    rows = await env.gateway.store.audit_entries(AuditFilter(event="key_change"))
    return [json.loads(row.entry) for row in rows]


def kid_of(env: Env) -> str:
    return env.keys[MX].kid


async def test_a_revoked_key_is_refused_after_reload(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        assert await status_of(env) == (202, "ACK")
        kid = kid_of(env)
        edit(env, 'alg = "EdDSA"\n', 'alg = "EdDSA"\nnot_after = 2020-01-01T00:00:00Z\n')
        # nothing changes until the reload
        assert await status_of(env) == (202, "ACK")
        assert await env.gateway.reload_partner_keys(actor="cli:security-officer")
        assert await status_of(env) == (401, "UNKNOWN_KEY")
        [entry] = await key_changes(env)
        assert (entry["outcome"], entry["actor"]) == (
            "partner_keys_reloaded",
            "cli:security-officer",
        )
        assert entry["reason"] == (
            f"{MX}: key {kid} now valid - to 2020-01-01T00:00:00.000Z (was valid - to -)"
        )


async def test_a_key_listed_again_with_a_second_window_is_audited_with_both(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path) as env:
        kid = kid_of(env)
        edit(
            env,
            'alg = "EdDSA"\n',
            'alg = "EdDSA"\nnot_after = 2020-12-31T00:00:00Z\n\n[[keys]]\n'
            f'path = "../../pki/{MX}/sign.pub"\nalg = "EdDSA"\n'
            "not_before = 2021-01-01T00:00:00Z\n",
        )
        assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert await status_of(env) == (202, "ACK")  # valid now through its second entry
        [entry] = await key_changes(env)
        assert entry["reason"] == (
            f"{MX}: key {kid} now valid - to 2020-12-31T00:00:00.000Z and valid"
            " 2021-01-01T00:00:00.000Z to - (was valid - to -)"
        )


async def test_a_partner_key_rotated_without_a_restart(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        old_key = env.keys[MX]
        new_private = Ed25519PrivateKey.generate()
        folder = tmp_path / "pki" / MX
        (folder / "sign2.key").write_bytes(
            new_private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (folder / "sign2.pub").write_bytes(
            new_private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        new_key = load_signing_key(folder / "sign2.key", party=MX, alg="EdDSA")
        assert await status_of(env, new_key) == (401, "UNKNOWN_KEY")
        edit(env, f"../../pki/{MX}/sign.pub", f"../../pki/{MX}/sign2.pub")
        assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert await status_of(env, new_key) == (202, "ACK")
        assert await status_of(env, old_key) == (401, "UNKNOWN_KEY")
        [entry] = await key_changes(env)
        new_kid = jwk_thumbprint(new_private.public_key())
        lines = {
            new_kid: f"{MX}: key {new_kid} added (valid - to -)",
            old_key.kid: f"{MX}: key {old_key.kid} removed",
        }
        assert entry["reason"] == "; ".join(lines[kid] for kid in sorted(lines))


async def test_a_configuration_that_does_not_load_changes_nothing(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        edit(env, 'alg = "EdDSA"\n', 'alg = "EdDSA"\nnot_after = "tomorrow"\n')
        assert not await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert await status_of(env) == (202, "ACK")
        [entry] = await key_changes(env)
        assert entry["outcome"] == "partner_keys_reload_refused"
        assert entry["reason"].startswith(f"{partner_toml(env)}: keys[0].not_after: ")
        # nothing to take in: no entry
        edit(env, 'not_after = "tomorrow"\n', "")
        assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert len(await key_changes(env)) == 1
