"""Partners' signing keys taken in again while serving (gateway.reload, SIGHUP with `serve`):
a key revoked or rotated in partner.toml takes effect from the next message; a configuration
that does not load changes nothing; every change is audited."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from https_env import CA, GB, MX, Env, make_message, post, running_gateway
from structlog.testing import capture_logs

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


def reloads(env: Env) -> dict[str, int]:
    """``c2c_partner_key_reloads_total`` by outcome, as /metrics shows it."""
    found = re.findall(
        rb'^c2c_partner_key_reloads_total\{outcome="([a-z_]+)"\} ([0-9.]+)$',
        env.gateway.metrics.render(),
        re.MULTILINE,
    )
    return {outcome.decode(): int(float(value)) for outcome, value in found}


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
        assert reloads(env) == {"partner_keys_reload_refused": 0, "partner_keys_reloaded": 1}


async def test_a_configuration_that_does_not_load_changes_nothing(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        edit(env, 'alg = "EdDSA"\n', 'alg = "EdDSA"\nnot_after = "tomorrow"\n')
        assert not await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert await status_of(env) == (202, "ACK")
        [entry] = await key_changes(env)
        assert entry["outcome"] == "partner_keys_reload_refused"
        assert entry["reason"].startswith(f"{partner_toml(env)}: keys[0].not_after: ")
        # counted, for the alert: an operator revoking a key whose edit does not load keeps
        # the key in force, and a SIGHUP answers nothing
        assert reloads(env) == {"partner_keys_reload_refused": 1, "partner_keys_reloaded": 0}
        # nothing to take in: no entry
        edit(env, 'not_after = "tomorrow"\n', "")
        assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert len(await key_changes(env)) == 1
        assert reloads(env) == {"partner_keys_reload_refused": 1, "partner_keys_reloaded": 0}


async def test_gateway_toml_changes_are_named_and_wait_for_a_restart(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, "max_body_bytes = 1048576\n") as env:
        path = env.root / "gateway.toml"
        with capture_logs() as logs:
            assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        assert not [e for e in logs if e["event"].endswith("_need_restart")]  # nothing changed
        text = path.read_text()
        path.write_text(
            text.replace("max_body_bytes = 1048576", "max_body_bytes = 2048").replace(
                'origin = "test.invalid/US-CBP"', 'origin = "test.invalid/US-CBP-2"'
            )
            + "\n[outbox]\nbreaker_failures = 9\n"
        )
        with capture_logs() as logs:
            assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        [warning] = [e for e in logs if e["event"] == "gateway_changes_need_restart"]
        assert warning["log_level"] == "warning"
        assert warning["file"] == str(path)
        assert warning["settings"] == [  # GatewayConfig's order
            "audit.origin",
            "limits.max_body_bytes",
            "outbox.breaker_failures",
        ]
        # not taken in
        assert env.gateway.config.limits.max_body_bytes == 1048576
        assert env.gateway.config.outbox.breaker_failures == 5


async def test_a_store_url_change_is_named_without_its_value(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as env:
        path = env.root / "gateway.toml"
        text = path.read_text()
        path.write_text(text.replace("gw.db", "other.db"))
        with capture_logs() as logs:
            assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        [warning] = [e for e in logs if e["event"] == "gateway_changes_need_restart"]
        assert warning["settings"] == ["store_url"]
        assert "other.db" not in repr(warning)


async def test_a_partner_removed_loses_its_keys_at_once_and_one_added_waits(
    tmp_path: Path,
) -> None:
    aside = tmp_path / "aside"

    def hold_back_ca(root: Path) -> None:
        aside.mkdir()
        (root / "partners" / CA).rename(aside / CA)

    async with running_gateway(tmp_path, prepare=hold_back_ca) as env:
        assert CA not in env.gateway.config.partners
        # CA-CBSA comes, GB-HMRC goes
        (aside / CA).rename(env.root / "partners" / CA)
        (env.root / "partners" / GB).rename(aside / GB)
        with capture_logs() as logs:
            assert await env.gateway.reload_partner_keys(actor="signal:SIGHUP")
        [warning] = [e for e in logs if e["event"] == "partner_changes_need_restart"]
        assert warning["partners"] == [
            f"{CA} added: served, its keys with it, after a restart",
            f"{GB} removed: its keys no longer accepted, the rest after a restart",
        ]
        parties = {key.party for key in env.gateway.keyring}
        assert parties == {MX}
        [entry] = await key_changes(env)
        assert entry["reason"] == f"{GB}: key {env.keys[GB].kid} removed"
        assert CA not in entry["reason"]
        assert await status_of(env) == (202, "ACK")  # the others are served as before
