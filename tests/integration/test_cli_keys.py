"""``c2c-gateway keys rotate``: new key, edited gateway.toml, audit event, verification windows."""

from __future__ import annotations

import asyncio
import getpass
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from outbound_env import gateway_config

from gateway.audit.events import EventKind
from gateway.cli.main import cli
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.crypto.jws import sign_detached, verify_detached
from gateway.crypto.keys import KeyRing, load_verification_key
from gateway.devenv import prepare_dev_environment
from gateway.errors import UnknownKey
from gateway.outbound.submission import current_signing_key
from gateway.runtime import load_own_signing_keys
from gateway.store import open_store
from gateway.store.base import AuditFilter

NOTE = "# operator note: the HSM migration is tracked in CHG-1234\n"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture
def config(tmp_path: Path) -> GatewayConfig:
    config = gateway_config(tmp_path, "US-CBP")
    text = config.source.read_text(encoding="utf-8")
    config.source.write_text(text.replace("[[signing_keys]]\n", NOTE + "[[signing_keys]]\n"))
    return config


def toml_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


async def key_changes(config: GatewayConfig) -> list[dict[str, str]]:
    store = open_store(config.store_url, clock=SystemClock())
    await store.open()
    try:
        rows = await store.audit_entries(AuditFilter(), limit=100)
    finally:
        await store.close()
    entries = [json.loads(row.entry) for row in rows]
    return [entry for entry in entries if entry["event"] == EventKind.KEY_CHANGE]


async def test_rotate_adds_a_key_with_overlap_keeps_comments_and_audits(
    config: GatewayConfig,
) -> None:
    not_before = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    old_key = load_own_signing_keys(config)[0]
    result = await asyncio.to_thread(
        run, "keys", "rotate", "--config", config.source,
        "--not-before", toml_time(not_before), "--overlap-days", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = config.source.read_text(encoding="utf-8")
    assert NOTE in text
    assert "# added by c2c-gateway keys rotate" in text

    rotated = load_config(config.source)
    old_entry, new_entry = rotated.signing_keys
    assert old_entry.path == config.signing_keys[0].path
    assert old_entry.not_after == not_before + timedelta(days=3)
    assert new_entry.not_before == not_before
    assert new_entry.path.parent == old_entry.path.parent
    assert new_entry.path.stat().st_mode & 0o777 == 0o600
    new_pub = new_entry.path.with_suffix(".pub")
    new_key = load_own_signing_keys(rotated)[1]
    assert f"new signing key  kid {new_key.kid}" in result.stdout
    assert f"the public key {new_pub} and its kid {new_key.kid}" in result.stdout
    assert f"old signing key  kid {old_key.kid} valid until" in result.stdout

    [event] = await key_changes(config)
    assert event["actor"] == f"cli:{getpass.getuser()}"
    assert event["sender"] == "US-CBP"
    assert new_key.kid in event["reason"]
    assert old_key.kid in event["reason"]

    # Which key signs when: the old one until not_before, then the newest valid one.
    keys = load_own_signing_keys(rotated)
    assert current_signing_key(keys, not_before - timedelta(seconds=1)).kid == old_key.kid
    assert current_signing_key(keys, not_before).kid == new_key.kid

    # A partner configured with both public keys and the same windows.
    partner_keys = KeyRing(
        [
            load_verification_key(
                old_entry.path.with_suffix(".pub"),
                party="US-CBP",
                alg="EdDSA",
                not_after=old_entry.not_after,
            ),
            load_verification_key(new_pub, party="US-CBP", alg="EdDSA", not_before=not_before),
        ]
    )
    body = b'{"header":{},"payload":{}}'
    in_overlap = not_before + timedelta(days=1)
    signed_new = sign_detached(body, new_key)
    ok = verify_detached(signed_new, body, keyring=partner_keys, party="US-CBP", at=in_overlap)
    assert ok.kid == new_key.kid
    signed_old = sign_detached(body, keys[0])
    ok = verify_detached(signed_old, body, keyring=partner_keys, party="US-CBP", at=in_overlap)
    assert ok.kid == old_key.kid
    after_overlap = not_before + timedelta(days=3, seconds=1)
    with pytest.raises(UnknownKey):
        verify_detached(signed_old, body, keyring=partner_keys, party="US-CBP", at=after_overlap)
    ok = verify_detached(signed_new, body, keyring=partner_keys, party="US-CBP", at=after_overlap)
    assert ok.kid == new_key.kid
    with pytest.raises(UnknownKey):
        verify_detached(
            signed_new, body, keyring=partner_keys, party="US-CBP", at=not_before - timedelta(1)
        )


async def test_a_second_rotation_shortens_only_the_current_key(config: GatewayConfig) -> None:
    first = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    second = first + timedelta(days=30)
    for at in (first, second):
        result = await asyncio.to_thread(
            run, "keys", "rotate", "--config", config.source,
            "--not-before", toml_time(at), "--overlap-days", "7",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    keys = load_config(config.source).signing_keys
    assert [(k.not_before, k.not_after) for k in keys] == [
        (None, first + timedelta(days=7)),
        (first, second + timedelta(days=7)),
        (second, None),
    ]
    assert len(await key_changes(config)) == 2


async def test_rotating_one_algorithm_leaves_the_other_alone(tmp_path: Path) -> None:
    """fix-alg's gap: with an Ed25519 and a P-256 key held (partners on ``sign_with``), a
    rotation used to make an Ed25519 key and expire both, so after the overlap no ES256 key
    was valid and every ES256 partner was cut off. ``--alg`` rotates the keys of one."""
    path = prepare_dev_environment(tmp_path / "US-CBP", pki_dir=tmp_path / "pki", alg="ES256")
    config = load_config(path)
    assert [k.alg for k in config.signing_keys] == ["EdDSA", "ES256"]
    not_before = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    result = await asyncio.to_thread(
        run, "keys", "rotate", "--config", config.source, "--alg", "ES256",
        "--not-before", toml_time(not_before), "--overlap-days", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert 'alg = "ES256"' in result.stdout
    rotated = load_config(config.source)
    eddsa, old_es, new_es = rotated.signing_keys
    assert (eddsa.alg, eddsa.not_after) == ("EdDSA", None)  # left alone
    assert (old_es.alg, old_es.not_after) == ("ES256", not_before + timedelta(days=2))
    assert (new_es.alg, new_es.not_before) == ("ES256", not_before)
    keys = load_own_signing_keys(rotated)
    assert keys[2].private_key.curve.name == "secp256r1"  # type: ignore[union-attr]
    later = not_before + timedelta(days=3)
    assert current_signing_key(keys, later, "ES256").kid == keys[2].kid
    assert current_signing_key(keys, later, "EdDSA").kid == keys[0].kid
    [event] = await key_changes(config)
    assert f"new signing key {keys[2].kid} (ES256)" in event["reason"]
    assert keys[0].kid not in event["reason"]

    # the default rotates the Ed25519 key only
    result = await asyncio.to_thread(
        run, "keys", "rotate", "--config", config.source,
        "--not-before", toml_time(not_before), "--overlap-days", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    after = load_config(config.source).signing_keys
    assert [(k.alg, k.not_after is None) for k in after] == [
        ("EdDSA", False),
        ("ES256", False),
        ("ES256", True),
        ("EdDSA", True),
    ]


def test_a_pending_rotation_or_past_time_is_refused_and_nothing_changes(
    config: GatewayConfig,
) -> None:
    later = (datetime.now(UTC) + timedelta(days=5)).replace(microsecond=0)
    scheduled = run("keys", "rotate", "--config", config.source, "--not-before", toml_time(later))
    assert scheduled.exit_code == 0, scheduled.output
    before = config.source.read_bytes()
    files = sorted(config.signing_keys[0].path.parent.iterdir())

    pending = run("keys", "rotate", "--config", config.source)
    assert pending.exit_code == 2
    assert "a rotation is already pending" in pending.stderr
    past = run("keys", "rotate", "--config", config.source, "--not-before", "2020-01-01T00:00:00Z")
    assert (past.exit_code, past.stderr) == (
        2,
        "error: --not-before: 2020-01-01T00:00:00Z is in the past\n",
    )
    assert config.source.read_bytes() == before
    assert sorted(config.signing_keys[0].path.parent.iterdir()) == files


def test_a_rotation_whose_overlap_ends_after_9999_is_refused(config: GatewayConfig) -> None:
    before = config.source.read_bytes()
    done = run("keys", "rotate", "--config", config.source, "--not-before", "9999-12-30T00:00:00Z")
    assert (done.exit_code, done.stderr) == (
        2,
        f"error: {config.source}: signing_keys: --not-before 9999-12-30T00:00:00Z plus the"
        " overlap is after the year 9999\n",
    )
    assert config.source.read_bytes() == before


def test_an_inline_key_array_is_refused_with_the_lines_to_add(config: GatewayConfig) -> None:
    text = config.source.read_text(encoding="utf-8")
    key_path = str(config.signing_keys[0].path)
    start = text.index("[[signing_keys]]")
    end = text.index("[", start + len("[[signing_keys]]"))
    inline = f'signing_keys = [{{ path = "{key_path}", alg = "EdDSA" }}]\n'
    edited = inline + text[:start] + text[end:]
    config.source.write_text(edited, encoding="utf-8")
    assert load_config(config.source).signing_keys[0].path == config.signing_keys[0].path
    files = sorted(config.signing_keys[0].path.parent.iterdir())

    result = run("keys", "rotate", "--config", config.source)
    assert result.exit_code == 2
    assert "is not written as [[signing_keys]] tables" in result.stderr
    assert "[[signing_keys]]\n# added by c2c-gateway keys rotate\npath = " in result.stderr
    assert config.source.read_text(encoding="utf-8") == edited
    assert sorted(config.signing_keys[0].path.parent.iterdir()) == files


def test_an_unreachable_store_leaves_config_and_key_files_untouched(
    config: GatewayConfig,
) -> None:
    text = config.source.read_text(encoding="utf-8")
    (config.source.parent / "not-a-dir").write_text("")
    config.source.write_text(
        text.replace('store_url = "sqlite:///c2c.db"', 'store_url = "sqlite:///not-a-dir/c2c.db"')
    )
    before = config.source.read_bytes()
    files = sorted(config.signing_keys[0].path.parent.iterdir())
    result = run("keys", "rotate", "--config", config.source)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: store unavailable, nothing changed")
    assert config.source.read_bytes() == before
    assert sorted(config.signing_keys[0].path.parent.iterdir()) == files
    assert sorted(p.name for p in config.source.parent.iterdir() if p.name.startswith(".")) == []
