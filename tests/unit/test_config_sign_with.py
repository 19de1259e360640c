"""``sign_with`` in partner.toml: the algorithm we sign with toward that partner. It must be
one of PROTOCOL section 3's allow-list, and our own ``[[signing_keys]]`` must hold a key of
that algorithm valid now; otherwise loading fails naming the partner file, ``sign_with`` and
what is missing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from config_files import edit_once

from gateway.config import load_config
from gateway.crypto.pki import ensure_signing_key_files
from gateway.errors import ConfigError

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MX_FILE = "partners/MX-ANAM/partner.toml"


def _sign_with(tree: Path, value: str) -> None:
    edit_once(tree / MX_FILE, 'typ = "c2c+json"\n', f'typ = "c2c+json"\nsign_with = {value}\n')


def _add_es256_key(tree: Path, window: str = "") -> Path:
    """A P-256 signing key of US-CBP next to its Ed25519 one, listed in gateway.toml."""
    ensure_signing_key_files(tree / "certs" / "dev" / "US-CBP", "ES256")
    edit_once(
        tree / "gateway.toml",
        "# RabbitMQ. Without url",
        '[[signing_keys]]\npath = "certs/dev/US-CBP/sign-es256.key"\nalg = "ES256"\n'
        f"{window}\n# RabbitMQ. Without url",
    )
    return tree / "certs" / "dev" / "US-CBP" / "sign-es256.key"


def test_without_sign_with_nothing_changes(tree: Path) -> None:
    config = load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert {partner.sign_with for partner in config.partners.values()} == {None}


def test_sign_with_a_held_algorithm_loads(tree: Path) -> None:
    _add_es256_key(tree)
    _sign_with(tree, '"ES256"')
    config = load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert config.partners["MX-ANAM"].sign_with == "ES256"
    assert config.partners["CA-CBSA"].sign_with is None
    edit_once(tree / MX_FILE, '\nsign_with = "ES256"', '\nsign_with = "EdDSA"')
    config = load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert config.partners["MX-ANAM"].sign_with == "EdDSA"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"RS256"', "unsupported algorithm 'RS256': only EdDSA or ES256"),
        ('"es256"', "unsupported algorithm 'es256': only EdDSA or ES256"),
        ('"none"', "unsupported algorithm 'none': only EdDSA or ES256"),
        ("256", "expected a string, got an integer"),
        ('""', "must not be empty"),
    ],
)
def test_sign_with_outside_the_allow_list_is_refused(tree: Path, value: str, reason: str) -> None:
    _sign_with(tree, value)
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert (caught.value.file, caught.value.key, caught.value.reason) == (
        str(tree / MX_FILE),
        "sign_with",
        reason,
    )


def test_sign_with_an_algorithm_we_hold_no_key_of_is_refused(tree: Path) -> None:
    _sign_with(tree, '"ES256"')
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert (caught.value.file, caught.value.key) == (str(tree / MX_FILE), "sign_with")
    assert caught.value.reason == (
        f"ES256: {tree / 'gateway.toml'} [[signing_keys]] holds no ES256 key; add one (a P-256"
        ' private key, alg = "ES256") or remove sign_with to sign with our current key'
    )


def test_sign_with_an_algorithm_whose_keys_are_not_valid_now_is_refused(tree: Path) -> None:
    _add_es256_key(tree, "not_before = 2027-01-01T00:00:00Z\n")
    _sign_with(tree, '"ES256"')
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert (caught.value.file, caught.value.key) == (str(tree / MX_FILE), "sign_with")
    assert caught.value.reason == (
        f"ES256: {tree / 'gateway.toml'} [[signing_keys]] holds no ES256 key valid at"
        " 2026-11-24T12:00:00Z (signing_keys[1] is valid from 2027-01-01T00:00:00Z); add one"
        " valid now, or remove sign_with to sign with our current key"
    )
    # valid by then: it loads
    load_config(tree / "gateway.toml", environ={}, now=datetime(2027, 1, 2, tzinfo=UTC))


def test_an_expired_key_of_the_algorithm_is_named(tree: Path) -> None:
    _add_es256_key(tree, "not_after = 2026-01-01T00:00:00Z\n")
    _sign_with(tree, '"ES256"')
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={}, now=NOW)
    assert "(signing_keys[1] is valid until 2026-01-01T00:00:00Z)" in caught.value.reason
