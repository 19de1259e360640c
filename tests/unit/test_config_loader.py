"""Config loader: the shipped samples load into the frozen dataclasses, and every kind of bad
file fails with the exact file, dotted key and reason."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from config_files import edit_once

from gateway.cli.main import cli
from gateway.config import (
    PROTOCOL_MESSAGE_TYPES,
    GatewayConfig,
    load_config,
    load_partner_config,
)
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_sample_config_round_trip(tree: Path) -> None:
    config = load_config(tree / "gateway.toml", environ={})
    assert isinstance(config, GatewayConfig)
    assert config.source == tree / "gateway.toml"
    assert config.party == "US-CBP"
    assert (config.partner_listen.host, config.partner_listen.port) == ("127.0.0.1", 8443)
    assert config.api_listen.port == 8080
    certs = (tree / "certs" / "dev").resolve()
    assert config.tls.cert == certs / "US-CBP" / "tls.pem"
    assert config.tls.ca == certs / "ca.pem"
    assert [k.path for k in config.signing_keys] == [certs / "US-CBP" / "sign.key"]
    assert config.signing_keys[0].not_before == datetime(2025, 1, 1, tzinfo=UTC)
    assert config.store_url == f"sqlite:///{tree / 'var' / 'c2c.db'}"
    assert config.amqp.url is None
    assert config.api_auth.public_keys == (certs / "US-CBP" / "api-token.pub",)
    assert config.audit.key == certs / "US-CBP" / "audit.key"
    assert (config.limits.replay_window_s, config.limits.max_skew_s) == (900, 120)
    assert config.limits.store_timeout_s == 30.0
    assert config.limits.handshakes_per_second == 50.0
    assert config.limits.ipv6_source_prefix == 64
    assert config.relay.lease_s == 10.0
    assert sorted(config.partners) == ["CA-CBSA", "MX-ANAM"]

    mx = config.partners["MX-ANAM"]
    assert mx.directory == tree / "partners" / "MX-ANAM"
    assert [k.path for k in mx.keys] == [certs / "MX-ANAM" / "sign.pub"]
    assert mx.keys[0].alg == "EdDSA"
    assert mx.inbound_types == PROTOCOL_MESSAGE_TYPES == mx.outbound_types
    assert mx.audit is not None
    assert mx.audit.public_key == certs / "MX-ANAM" / "audit.pub"
    assert mx.audit.origin == "dev.c2c-gateway.invalid/MX-ANAM"
    assert mx.max_body_bytes == 2_097_152
    assert (mx.rate.per_second, mx.rate.burst) == (200.0, 400)
    assert mx.https.url == "https://127.0.0.1:9444/c2c/v1/messages"
    assert mx.https.ca == certs / "ca.pem"
    assert mx.https.client_cert_subjects == ("MX-ANAM",)
    assert (mx.amqp.enabled, mx.amqp.broker_user) == (False, "mx-anam")
    assert (mx.adapter, mx.typ) == ("canonical", "c2c+json")
    assert mx.legal_basis == "US-MX CMAA (Mexico City, 1976)"

    ca = config.partners["CA-CBSA"]
    # No max_body_bytes in the file: the gateway-wide limit applies.
    assert ca.max_body_bytes == config.limits.max_body_bytes
    assert ca.https.client_cert_subjects == ("CA-CBSA",)


def test_config_objects_are_frozen(tree: Path) -> None:
    config = load_config(tree / "gateway.toml", environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.party = "MX-ANAM"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.partners["GB-HMRC"] = config.partners["MX-ANAM"]  # type: ignore[index]


def test_secret_urls_come_from_the_environment_and_never_show_in_repr(tree: Path) -> None:
    edit_once(tree / "gateway.toml", '# url_env = "C2C_AMQP_URL"', 'url_env = "C2C_AMQP_URL"')
    edit_once(
        tree / "gateway.toml",
        'store_url = "sqlite:///var/c2c.db"',
        'store_url_env = "C2C_STORE_URL"',
    )
    env = {
        "C2C_AMQP_URL": "amqp://gw:s3cret-amqp@127.0.0.1:5672/c2c",
        "C2C_STORE_URL": "postgresql://gw:s3cret-pg@127.0.0.1/c2c",
    }
    config = load_config(tree / "gateway.toml", environ=env)
    assert config.amqp.url == env["C2C_AMQP_URL"]
    assert config.store_url == env["C2C_STORE_URL"]
    assert "s3cret" not in repr(config)


G = "gateway.toml"
MX = "partners/MX-ANAM/partner.toml"
BRACKETS = "not a valid URL: '[' and ']' must enclose an IPv6 address, e.g. [::1]"
PORT = "not a valid URL: the port must be a number from 1 to 65535"
NO_DATABASE = (
    "the URL names no database (e.g. postgresql://user@host:5432/c2c); without one the"
    " server's default, named after the user, would get the gateway's tables"
)
SQLITE_QUERY = (
    "a sqlite:/// URL takes no query or fragment ('?', '#'): its path is the database file's"
    " name, and SQLite options are not read from it"
)

# (file edited, old text, new text, file named in the error, dotted key, exact reason)
# fmt: off
BAD_FILES: list[tuple[str, str, str, str, str, str]] = [
    (G, 'party = "US-CBP"', 'party = "us-cbp"', G, "party",
     "'us-cbp' is not a party id (^[A-Z]{2}-[A-Z0-9]{2,16}$)"),
    (G, 'party = "US-CBP"', 'party = "US-CBP"\ncolour = "blue"', G, "colour", "unknown key"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nmax_body = 5", G, "limits.max_body",
     "unknown key"),
    (G, "port = 8443", 'port = "8443"', G, "partner_listen.port",
     "expected an integer, got a string"),
    (G, "port = 8443", "port = 70000", G, "partner_listen.port", "must be <= 65535, got 70000"),
    (G, "max_body_bytes = 1048576", "max_body_bytes = -1", G, "limits.max_body_bytes",
     "must be >= 1, got -1"),
    (G, "max_skew_s = 120", "max_skew_s = 1000", G, "limits.max_skew_s",
     "skew (1000 s) larger than the replay window (900 s)"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nstore_timeout_s = 0", G, "limits.store_timeout_s",
     "must be > 0, got 0"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nhandshakes_per_second = 0", G,
     "limits.handshakes_per_second", "must be from 0.1 to 1000000, got 0"),
    (G, "# lease_s = 10", "lease_s = 0.5", G, "relay.lease_s", "must be >= 1, got 0.5"),
    (G, "# lease_s = 10", "lease = 10", G, "relay.lease", "unknown key"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nipv6_source_prefix = 16", G,
     "limits.ipv6_source_prefix", "must be >= 32, got 16"),
    (G, "max_skew_s = 120", "max_skew_s = 120\nipv6_source_prefix = 129", G,
     "limits.ipv6_source_prefix", "must be <= 128, got 129"),
    (G, "replay_window_s = 900", "replay_window_s = 86400", G, "limits.replay_window_s",
     "replay_window_s + max_skew_s = 86520 s exceeds 86400 s (one day)"),
    (G, 'alg = "EdDSA"', 'alg = "RS256"', G, "signing_keys[0].alg",
     "unsupported algorithm 'RS256': only EdDSA or ES256"),
    (G, "not_before = 2025-01-01T00:00:00Z",
     "not_before = 2025-01-01T00:00:00Z\nnot_after = 2024-01-01T00:00:00Z", G,
     "signing_keys[0].not_before", "not_before is after not_after"),
    (G, "not_before = 2025-01-01T00:00:00Z", "not_before = 2025-01-01T00:00:00", G,
     "signing_keys[0].not_before",
     "date-time needs a UTC offset, e.g. 2026-01-01T00:00:00Z (got a local time)"),
    (G, "prefetch = 50", "prefetch = true", G, "amqp.prefetch",
     "expected an integer, got a boolean"),
    # out-of-range numbers that loaded and then failed at run time with a traceback
    (G, "prefetch = 50", "prefetch = 65536", G, "amqp.prefetch", "must be <= 65535, got 65536"),
    (G, "delivery_limit = 5", "delivery_limit = 9223372036854775808", G, "amqp.delivery_limit",
     "must be <= 9223372036854775807, got 9223372036854775808"),
    (G, "default_ttl_s = 86400", "default_ttl_s = 1000000000000", G, "outbox.default_ttl_s",
     "must be <= 2592000, got 1000000000000"),
    (G, "max_delay_s = 900", "max_delay_s = 1e12", G, "outbox.max_delay_s",
     "must be <= 2592000, got 1000000000000.0"),
    (G, "# send_timeout_s = 30", "send_timeout_s = 1e12", G, "outbox.send_timeout_s",
     "must be <= 2592000, got 1000000000000.0"),
    (G, "# lease_s = 10", "lease_s = 1e12", G, "relay.lease_s",
     "must be <= 2592000, got 1000000000000.0"),
    (G, "# ocsp_max_age_s = 3600", "ocsp_max_age_s = 1e12", G, "tls.ocsp_max_age_s",
     "must be <= 2592000, got 1000000000000.0"),
    # beyond PostgreSQL's lock_timeout range (3/4 of it, in ms, is sent to each session)
    (G, "# store_timeout_s = 30", "store_timeout_s = 1e7", G, "limits.store_timeout_s",
     "must be <= 86400, got 10000000.0"),
    (G, "# store_timeout_s = 30", "request_timeout_s = 100000", G, "limits.request_timeout_s",
     "must be from 0.5 to 86400, got 100000"),
    # an integer float() cannot hold
    (G, "# store_timeout_s = 30", "store_timeout_s = " + "9" * 400, G, "limits.store_timeout_s",
     "must be a finite number"),
    (G, "# [retention]\n# body_retention_days = 365",
     "[retention]\nbody_retention_days = 1000000", G, "retention.body_retention_days",
     "must be <= 36500, got 1000000"),
    (G, "# [retention]\n# body_retention_days = 365", "[retention]\nbody_retention_days = 0",
     G, "retention.body_retention_days", "must be >= 1, got 0"),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "mysql://u:pw@db/c2c"', G,
     "store_url", "unsupported store URL scheme 'mysql': expected a sqlite:/// or postgresql://"
     " URL"),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "postgresql://gw:hunter2@[::1/c2c"',
     G, "store_url", BRACKETS),
    (G, 'store_url = "sqlite:///var/c2c.db"',
     'store_url = "postgresql://gw:hunter2@127.0.0.1:abc/c2c"', G, "store_url", PORT),
    (G, 'store_url = "sqlite:///var/c2c.db"',
     'store_url = "postgresql://gw:hunter2@127.0.0.1:99999/c2c"', G, "store_url", PORT),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "postgresql://"', G, "store_url",
     NO_DATABASE),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "postgresql://gw:hunter2@db:5432/"',
     G, "store_url", NO_DATABASE),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "postgresql://gw:hunter2@/c2c"', G,
     "store_url", "not a valid URL: it names no host (a Unix socket's folder goes"
     " percent-encoded in its place, e.g. postgresql://%2Frun%2Fpostgresql/c2c)"),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "sqlite:///var/c2c.db?mode=ro"', G,
     "store_url", SQLITE_QUERY),
    (G, 'store_url = "sqlite:///var/c2c.db"', 'store_url = "sqlite:///var/c2c.db#frag"', G,
     "store_url", SQLITE_QUERY),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "amqp://gw:hunter2@[::1/c2c"', G, "amqp.url",
     BRACKETS),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "amqp://gw:hunter2@127.0.0.1:abc/"', G,
     "amqp.url", PORT),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "amqps://gw:hunter2@127.0.0.1:0/"', G,
     "amqp.url", PORT),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "amqp://gw:hunter2@/c2c"', G, "amqp.url",
     "not a valid URL: it names no host"),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "amqp://gw:hunter2@127.0.0.1/c2c#x"', G,
     "amqp.url", "not a valid URL: a server URL has no fragment ('#...')"),
    (G, '# url_env = "C2C_AMQP_URL"', 'url_env = "C2C_TEST_UNSET_URL"', G, "amqp.url_env",
     "environment variable C2C_TEST_UNSET_URL is not set"),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "amqp://x"\nurl_env = "C2C_AMQP_URL"', G,
     "amqp.url_env", "give url or url_env, not both"),
    (G, '# url_env = "C2C_AMQP_URL"', 'url = "http://gw:hunter2@127.0.0.1/"', G, "amqp.url",
     "expected an amqp:// or amqps:// URL"),
    (G, 'algorithms = ["EdDSA"]', 'algorithms = ["EdDSA", "HS256"]', G,
     "api_auth.algorithms[1]", "unsupported algorithm 'HS256': only EdDSA or ES256"),
    (G, "[audit]", "[audit_log]", G, "audit", "required table is missing"),
    (G, 'origin = "dev.c2c-gateway.invalid/US-CBP"', 'origin = ""', G, "audit.origin",
     "must not be empty"),
    (G, 'partners_dir = "partners"', 'partners_dir = "nowhere"', G, "partners_dir",
     "directory not found: {root}/nowhere"),
    (G, 'cert = "certs/dev/US-CBP/tls.pem"', 'cert = "certs/dev/US-CBP/missing.pem"', G,
     "tls.cert", "file not found: {root}/certs/dev/US-CBP/missing.pem"),
    (G, "port = 8443", "port = 8443 8444", G, "(toml)",
     "Expected newline or end of document after a statement (at line 14, column 13)"),
    (MX, 'id = "MX-ANAM"', 'id = "CA-CBSA"', MX, "id",
     "'CA-CBSA' differs from the folder name 'MX-ANAM'"),
    (MX, 'id = "MX-ANAM"', 'id = "../../etc"', MX, "id",
     "'../../etc' is not a party id (^[A-Z]{2}-[A-Z0-9]{2,16}$)"),
    (MX, "inbound_types = [\n", 'inbound_types = [\n    "shipment.manifesto",\n',
     MX, "inbound_types[0]",
     "unknown message type 'shipment.manifesto'"),
    (MX, "outbound_types = [\n", 'outbound_types = [\n    "receipt",\n',
     MX, "outbound_types[14]", "duplicate entry 'receipt'"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"http://127.0.0.1:9444/"',
     MX, "https.url", "'http://127.0.0.1:9444/' is not an https:// URL"),
    # the user and password of a URL refused are not shown
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"https://svc:hunter2@127.0.0.1:94444/"',
     MX, "https.url", "'https://***@127.0.0.1:94444/' is not a valid URL"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"http://svc:hunter2@127.0.0.1/"',
     MX, "https.url", "'http://***@127.0.0.1/' is not an https:// URL"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"https://mx:hun/ter#2@127.0.0.1/x"',
     MX, "https.url", "'https://***@127.0.0.1/x' is not a valid URL"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"https:mx:hunter2@127.0.0.1/x"',
     MX, "https.url", "'https:***@127.0.0.1/x' is not an https:// URL"),
    (MX, 'allowed_networks = ["127.0.0.1/32"]', "", MX, "https.url",
     "127.0.0.1 is a loopback address; a partner URL must lead to a public address unless"
     " allowed_networks lists its network"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"https://169.254.169.254/latest/"',
     MX, "https.url", "169.254.169.254 is a link-local address; a partner URL must lead to"
     " a public address unless allowed_networks lists its network"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"https://[::ffff:10.0.0.1]:9444/"',
     MX, "https.url", "10.0.0.1 is a private address; a partner URL must lead to"
     " a public address unless allowed_networks lists its network"),
    (MX, '"https://127.0.0.1:9444/c2c/v1/messages"', '"https://10.20.0.5/"',
     MX, "https.url", "10.20.0.5 is a private address; a partner URL must lead to"
     " a public address unless allowed_networks lists its network"),
    (MX, '["127.0.0.1/32"]', '["127.0.0.1/8"]', MX, "https.allowed_networks[0]",
     "127.0.0.1/8 has host bits set"),
    (MX, '["127.0.0.1/32"]', '["loopback"]', MX, "https.allowed_networks[0]",
     "'loopback' does not appear to be an IPv4 or IPv6 network"),
    (MX, 'alg = "EdDSA"', 'alg = "HS256"', MX, "keys[0].alg",
     "unsupported algorithm 'HS256': only EdDSA or ES256"),
    (MX, 'path = "../../certs/dev/MX-ANAM/sign.pub"',
     'path = "../../certs/dev/MX-ANAM/old.pub"', MX, "keys[0].path",
     "file not found: {root}/certs/dev/MX-ANAM/old.pub"),
    (MX, "max_body_bytes = 2097152", "max_body_bytes = 0", MX, "max_body_bytes",
     "must be >= 1, got 0"),
    (MX, "per_second = 200.0", "per_second = 0", MX, "rate.per_second",
     "must be from 0.001 to 1000000, got 0"),
    (MX, "burst = 400", "burst = 1" + "0" * 400, MX, "rate.burst",
     "must be <= 9223372036854775807, got 1" + "0" * 400),
    (MX, "client_cert_fingerprints = []", 'client_cert_fingerprints = ["AB:CD"]', MX,
     "https.client_cert_fingerprints[0]", "expected a SHA-256 fingerprint (64 hex digits)"),
    (MX, 'broker_user = "mx-anam"', 'broker_user = "mx-anam"\nvhost = "/"', MX, "amqp.vhost",
     "unknown key"),
    (MX, 'adapter = "canonical"', 'adapter = "../../gateway/evil.py"', MX, "adapter",
     "must be 'canonical' or a .py file inside the partner folder"),
    (MX, 'typ = "c2c+json"', 'typ = "JWT"', MX, "typ", "'JWT' is not a c2c+<format> JWS type"),
    (MX, 'ca = "../../certs/dev/ca.pem"\n', "", MX, "https.ca",
     "required when the partner uses HTTPS (url or client_cert_*)"),
    (MX, "[[keys]]", "[[old_keys]]", MX, "keys", "required key is missing"),
    (MX, 'public_key = "../../certs/dev/MX-ANAM/audit.pub"',
     'public_key = "../../certs/dev/MX-ANAM/gone.pub"', MX, "audit.public_key",
     "file not found: {root}/certs/dev/MX-ANAM/gone.pub"),
    (MX, 'origin = "dev.c2c-gateway.invalid/MX-ANAM"', 'origin = "MX ANAM log"', MX,
     "audit.origin", "must be one printable line without spaces or '+'"),
    (MX, 'origin = "dev.c2c-gateway.invalid/MX-ANAM"', 'origin = "dev.c2c-gateway.invalid/US-CBP"',
     MX, "audit.origin", "'dev.c2c-gateway.invalid/US-CBP' is this gateway's own audit origin"),
    (MX, 'origin = "dev.c2c-gateway.invalid/MX-ANAM"', 'origin = "dev.c2c-gateway.invalid/CA-CBSA"',
     MX, "audit.origin", "'dev.c2c-gateway.invalid/CA-CBSA' is also the audit origin of CA-CBSA"),
    (MX, 'origin = "dev.c2c-gateway.invalid/MX-ANAM"', "", MX, "audit.origin",
     "required key is missing"),
]
# fmt: on


@pytest.mark.parametrize(
    ("edited", "old", "new", "file", "key", "reason"),
    BAD_FILES,
    ids=[f"{case[4]}:{case[5][:40]}" for case in BAD_FILES],
)
def test_bad_file_names_file_key_and_reason(
    tree: Path, edited: str, old: str, new: str, file: str, key: str, reason: str
) -> None:
    edit_once(tree / edited, old, new)
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={"C2C_AMQP_URL": "amqp://127.0.0.1/"})
    error = caught.value
    assert (error.file, error.key, error.reason) == (
        str(tree / file),
        key,
        reason.replace("{root}", str(tree.resolve())),
    )
    assert "hunter2" not in str(error)


def test_missing_gateway_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "gateway.toml")
    assert (caught.value.key, caught.value.reason) == ("(file)", "file not found")


def test_partner_folder_with_a_bad_name_is_refused(tree: Path) -> None:
    shutil.copytree(tree / "partners" / "MX-ANAM", tree / "partners" / "mx anam")
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={})
    assert (caught.value.file, caught.value.key, caught.value.reason) == (
        str(tree / "partners" / "mx anam"),
        "(folder)",
        "folder name 'mx anam' is not a party id",
    )


def test_partner_folder_without_partner_toml(tree: Path) -> None:
    (tree / "partners" / "GB-HMRC").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml", environ={})
    assert (caught.value.file, caught.value.key, caught.value.reason) == (
        str(tree / "partners" / "GB-HMRC" / "partner.toml"),
        "(file)",
        "file not found",
    )


def test_hidden_folders_and_files_in_partners_are_ignored(tree: Path) -> None:
    (tree / "partners" / ".git").mkdir()
    (tree / "partners" / "__pycache__").mkdir()
    (tree / "partners" / "README.md").write_text("partners\n", encoding="utf-8")
    assert sorted(load_config(tree / "gateway.toml", environ={}).partners) == [
        "CA-CBSA",
        "MX-ANAM",
    ]


def test_partner_cannot_be_the_gateway_itself(tree: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_partner_config(tree / "partners" / "MX-ANAM", own_party="MX-ANAM")
    assert (caught.value.key, caught.value.reason) == (
        "id",
        "'MX-ANAM' is this gateway's own party",
    )


def test_fingerprints_are_normalised(tree: Path) -> None:
    fingerprint = "AB:" * 31 + "CD"
    edit_once(
        tree / MX,
        "client_cert_fingerprints = []",
        f'client_cert_fingerprints = ["{fingerprint}"]',
    )
    partner = load_partner_config(tree / "partners" / "MX-ANAM", own_party="US-CBP")
    assert partner.https.client_cert_fingerprints == ("ab" * 31 + "cd",)


def test_partner_without_any_transport_is_refused(tree: Path) -> None:
    text = (tree / MX).read_text(encoding="utf-8")
    head = text[: text.index("[https]")]
    (tree / MX).write_text(head, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_partner_config(tree / "partners" / "MX-ANAM", own_party="US-CBP")
    assert (caught.value.key, caught.value.reason) == (
        "https",
        "the partner has no transport: configure [https] or [amqp]",
    )


def test_a_bad_url_from_the_environment_names_the_env_key(tree: Path) -> None:
    edit_once(tree / G, '# url_env = "C2C_AMQP_URL"', 'url_env = "C2C_AMQP_URL"')
    edit_once(tree / G, 'store_url = "sqlite:///var/c2c.db"', 'store_url_env = "C2C_STORE_URL"')
    good = {"C2C_AMQP_URL": "amqps://gw:pw@[::1]:5671/c2c?heartbeat=30"}
    with pytest.raises(ConfigError) as caught:
        load_config(tree / G, environ={**good, "C2C_STORE_URL": "postgresql://gw:hunter2@db"})
    assert (caught.value.key, caught.value.reason) == ("store_url_env", NO_DATABASE)
    with pytest.raises(ConfigError) as caught:
        load_config(
            tree / G,
            environ={
                "C2C_AMQP_URL": "amqp://gw:hunter2@127.0.0.1:5672x/",
                "C2C_STORE_URL": "postgresql://gw:pw@db1,db2:5433/c2c?sslmode=require",
            },
        )
    assert (caught.value.key, caught.value.reason) == ("amqp.url_env", PORT)
    assert "hunter2" not in str(caught.value)
    config = load_config(
        tree / G, environ={**good, "C2C_STORE_URL": "postgresql://%2Frun%2Fpostgresql/c2c"}
    )
    assert config.store_url == "postgresql://%2Frun%2Fpostgresql/c2c"


STORE = 'store_url = "sqlite:///var/c2c.db"'
AMQP = '# url_env = "C2C_AMQP_URL"'


@pytest.mark.parametrize(
    ("old", "new", "command", "key", "reason"),
    [
        (STORE, 'store_url = "postgresql://[::1/test"', "messages", "store_url", BRACKETS),
        (STORE, 'store_url = "postgresql://127.0.0.1:abc/test"', "messages", "store_url", PORT),
        (STORE, 'store_url = "postgresql://127.0.0.1:99999/test"', "messages", "store_url", PORT),
        (STORE, 'store_url = "postgresql://"', "messages", "store_url", NO_DATABASE),
        (
            STORE,
            'store_url = "sqlite:///var/c2c.db?mode=ro"',
            "messages",
            "store_url",
            SQLITE_QUERY,
        ),
        (STORE, 'store_url = "sqlite:///var/c2c.db#frag"', "messages", "store_url", SQLITE_QUERY),
        (AMQP, 'url = "amqp://[::1/x"', "partners", "amqp.url", BRACKETS),
        (AMQP, 'url = "amqp://guest:guest@127.0.0.1:abc/"', "partners", "amqp.url", PORT),
    ],
)
def test_the_cli_refuses_a_malformed_url_as_a_bad_config(
    tree: Path, old: str, new: str, command: str, key: str, reason: str
) -> None:
    """The reviewer's cases: exit 2 and one line naming the file and setting, no traceback,
    and no SQLite file named after the URL's query or fragment."""
    (tree / "var").mkdir()
    edit_once(tree / G, old, new)
    result = CliRunner().invoke(cli, [command, "list", "--config", str(tree / G)])
    assert isinstance(result.exception, SystemExit)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"error: {tree / G}: {key}: {reason}\n"
    assert list((tree / "var").iterdir()) == []


def test_send_refuses_an_out_of_range_default_ttl_as_a_bad_config(tree: Path) -> None:
    """The reviewer's case: the default TTL loaded, then every submission crashed computing
    its expiry (OverflowError). Now the same one line as any bad setting, exit 2."""
    edit_once(tree / G, "default_ttl_s = 86400", "default_ttl_s = 1000000000000")
    payload = tree / "payload.json"
    payload.write_text('{"reference": "R-1"}')
    result = CliRunner().invoke(
        cli,
        [
            "send",
            "--config",
            str(tree / G),
            "--to",
            "MX-ANAM",
            "--type",
            "query.shipment_lookup",
            "--payload",
            str(payload),
        ],
    )
    assert isinstance(result.exception, SystemExit)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: {tree / G}: outbox.default_ttl_s: must be <= 2592000, got 1000000000000\n"
    )
    assert not (tree / "var").exists()


def _as_trusted(pem: bytes) -> bytes:
    """A certificate block under the label ``openssl x509 -trustout`` writes (the loader looks
    for the label; tests/integration/test_cli_check.py uses the real command)."""
    return pem.replace(b"BEGIN CERTIFICATE", b"BEGIN TRUSTED CERTIFICATE").replace(
        b"END CERTIFICATE", b"END TRUSTED CERTIFICATE"
    )


@pytest.mark.parametrize("mixed", [False, True], ids=["alone", "beside-a-certificate"])
@pytest.mark.parametrize(
    ("toml", "key", "line"),
    [
        ("gateway.toml", "tls.ca", 'ca = "certs/dev/ca.pem"'),
        ("partners/MX-ANAM/partner.toml", "https.ca", 'ca = "../../certs/dev/ca.pem"'),
    ],
)
def test_a_ca_file_with_a_trusted_certificate_block_is_refused(
    tree: Path, toml: str, key: str, line: str, mixed: bool
) -> None:
    """OpenSSL would trust such a block in the handshake; the partner identification and
    the revocation check, which read the file with cryptography, would not see it."""
    ca = tree / "certs" / "dev" / "ca.pem"
    trusted = tree / "certs" / "trusted-ca.pem"
    trusted.write_bytes((ca.read_bytes() if mixed else b"") + _as_trusted(ca.read_bytes()))
    edit_once(tree / toml, line, f'ca = "{trusted}"')
    with pytest.raises(ConfigError) as caught:
        load_config(tree / "gateway.toml")
    assert (caught.value.file, caught.value.key, caught.value.reason) == (
        str(tree / toml),
        key,
        f"{trusted} holds a TRUSTED CERTIFICATE block (openssl x509 -trustout): the gateway"
        " reads CA certificates from CERTIFICATE blocks only; write each certificate without"
        " -trustout (openssl x509 -in FILE -out NEW.pem)",
    )
