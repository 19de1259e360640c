"""prepare_dev_environment: a loadable config over the PROTOCOL section 8 layout, for the
US-CBP sandbox and for a partner gateway of a multi-gateway demo."""

from __future__ import annotations

import re
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from gateway.config import load_config
from gateway.crypto.keys import load_signing_key, load_verification_key
from gateway.crypto.x509 import load_certificate
from gateway.devenv import (
    GENERATED_MARK,
    GENERATED_RECORD,
    default_partners_src,
    dump_toml,
    make_dev_environment,
    prepare_dev_environment,
)
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SECTION_8_FILES = ["tls.pem", "tls.key", "sign.key", "sign.pub", "sign.kid"]


def test_sandbox_environment_loads_and_follows_the_layout(tmp_path: Path) -> None:
    path = prepare_dev_environment(tmp_path)
    assert path == tmp_path / "gateway.toml"
    config = load_config(path, environ={})
    assert config.party == "US-CBP"
    assert sorted(config.partners) == ["CA-CBSA", "MX-ANAM"]
    assert (tmp_path / "ca.pem").is_file()
    for party in ("US-CBP", "MX-ANAM", "CA-CBSA"):
        for name in SECTION_8_FILES:
            assert (tmp_path / party / name).is_file(), f"{party}/{name}"
    assert (tmp_path / "US-CBP" / "audit.pub").is_file()
    assert config.store_url == f"sqlite:///{tmp_path / 'c2c.db'}"
    assert config.tls.cert == tmp_path / "US-CBP" / "tls.pem"
    assert config.tls.ca == tmp_path / "ca.pem"
    assert config.signing_keys[0].path == tmp_path / "US-CBP" / "sign.key"
    assert config.audit.key == tmp_path / "US-CBP" / "audit.key"
    assert config.api_auth.public_keys == (tmp_path / "US-CBP" / "api-token.pub",)
    assert config.api_auth.signing_key == tmp_path / "US-CBP" / "api-token.key"
    assert (config.partner_listen.port, config.api_listen.port) == (0, 0)
    assert config.amqp.url is None
    for partner in config.partners.values():
        assert partner.directory == tmp_path / "partners" / partner.id
        assert [k.path for k in partner.keys] == [tmp_path / partner.id / "sign.pub"]
        assert (partner.keys[0].not_before, partner.keys[0].not_after) == (None, None)
        assert partner.https.ca == tmp_path / "ca.pem"
        assert partner.legal_basis is None
        assert partner.amqp.enabled is False
        kid = (tmp_path / partner.id / "sign.kid").read_text(encoding="ascii").strip()
        key = load_verification_key(partner.keys[0].path, party=partner.id, alg="EdDSA")
        assert key.kid == kid


def test_second_call_keeps_keys_and_writes_the_same_config(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path)
    keys = {p: p.read_bytes() for p in tmp_path.rglob("*.key")}
    configs = {p: p.read_bytes() for p in tmp_path.rglob("*.toml")}
    prepare_dev_environment(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.key")} == keys
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.toml")} == configs


def test_environment_can_be_moved(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    config = load_config(tmp_path / "b" / "gateway.toml", environ={})
    assert config.partners["MX-ANAM"].keys[0].path == tmp_path / "b" / "MX-ANAM" / "sign.pub"


def test_partner_gateway_of_a_two_gateway_demo(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    us = prepare_dev_environment(
        tmp_path / "us",
        pki_dir=pki,
        partner_port=9443,
        peers={"MX-ANAM": "https://127.0.0.1:9444"},
    )
    mx = prepare_dev_environment(
        tmp_path / "mx",
        party="MX-ANAM",
        pki_dir=pki,
        partner_port=9444,
        api_port=8081,
        peers={"US-CBP": "https://127.0.0.1:9443/"},
    )
    us_config = load_config(us, environ={})
    mx_config = load_config(mx, environ={})
    assert mx_config.party == "MX-ANAM"
    assert sorted(mx_config.partners) == ["CA-CBSA", "US-CBP"]
    assert mx_config.partner_listen.port == 9444
    assert mx_config.api_listen.port == 8081
    us_seen_by_mx = mx_config.partners["US-CBP"]
    assert us_seen_by_mx.https.url == "https://127.0.0.1:9443/c2c/v1/messages"
    assert us_seen_by_mx.https.client_cert_subjects == ("US-CBP",)
    assert us_config.partners["MX-ANAM"].https.url == "https://127.0.0.1:9444/c2c/v1/messages"
    # One CA for both gateways, and each verifies exactly the key the other signs with.
    assert us_config.tls.ca == mx_config.tls.ca == pki / "ca.pem"
    us_signing = load_signing_key(us_config.signing_keys[0].path, party="US-CBP", alg="EdDSA")
    mx_view = load_verification_key(us_seen_by_mx.keys[0].path, party="US-CBP", alg="EdDSA")
    assert us_signing.kid == mx_view.kid
    assert mx_config.audit.key == pki / "MX-ANAM" / "audit.key"
    # Each witnesses the other: its partner entry names the other's audit key and origin.
    assert us_seen_by_mx.audit is not None
    assert us_seen_by_mx.audit.public_key == pki / "US-CBP" / "audit.pub"
    assert us_seen_by_mx.audit.origin == us_config.audit.origin
    mx_seen_by_us = us_config.partners["MX-ANAM"].audit
    assert mx_seen_by_us is not None
    assert mx_seen_by_us.public_key == pki / "MX-ANAM" / "audit.pub"
    assert mx_seen_by_us.origin == mx_config.audit.origin
    assert not (tmp_path / "mx" / "MX-ANAM").exists()


def test_amqp_url_enables_every_partner_on_that_broker(tmp_path: Path) -> None:
    url = "amqp://sandbox:pw@127.0.0.1:5672/c2c"
    config = load_config(prepare_dev_environment(tmp_path, amqp_url=url), environ={})
    assert config.amqp.url == url
    for partner in config.partners.values():
        assert (partner.amqp.enabled, partner.amqp.broker_user) == (True, "sandbox")


def test_legal_basis_kept_on_request(tmp_path: Path) -> None:
    config = load_config(prepare_dev_environment(tmp_path, require_legal_basis=True), environ={})
    assert config.partners["MX-ANAM"].legal_basis == "US-MX CMAA (Mexico City, 1976)"


def test_peers_no_longer_named_are_removed(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path, peers={"GB-HMRC": "https://127.0.0.1:9446"})
    assert (tmp_path / "partners" / "GB-HMRC" / "partner.toml").is_file()
    config = load_config(prepare_dev_environment(tmp_path), environ={})
    assert sorted(config.partners) == ["CA-CBSA", "MX-ANAM"]
    assert not (tmp_path / "partners" / "GB-HMRC").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"party": "../x"}, "party: '../x' is not a party id"),
        ({"peers": {"mx": "https://127.0.0.1:1"}}, "peers: 'mx' is not a party id"),
        ({"peers": {"MX-ANAM": "http://127.0.0.1:1"}}, "is not an https://HOST:PORT base URL"),
        ({"peers": {"MX-ANAM": "https://h:1/c2c/v1"}}, "is not an https://HOST:PORT base URL"),
        ({"partner_port": 70000}, "partner_port: 70000 is not a TCP port"),
    ],
)
def test_bad_arguments_write_nothing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_dev_environment(tmp_path / "env", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "env").exists()


def test_sample_partners_are_shipped_with_the_package() -> None:
    shipped = default_partners_src()
    for partner in ("MX-ANAM", "CA-CBSA"):
        assert (shipped / partner / "partner.toml").read_bytes() == (
            REPO / "partners" / partner / "partner.toml"
        ).read_bytes()


def test_dump_toml_round_trips_awkward_strings() -> None:
    data = {
        "name": 'quote " backslash \\ tab \t newline \n del \x7f nul \x00 é 😀',
        "n": 3,
        "x": 2.5,
        "flag": False,
        "items": ["a", 'b"'],
        "one": ["only"],
        "table": {"key with space": "v", "nested": {"deep": 1}},
        "array": [{"a": 1}, {"a": 2}],
    }
    text = dump_toml(data, comment="test")
    assert text.startswith("# Generated by gateway.devenv: test\n")
    assert tomllib.loads(text) == data


# ---------------------------------------------------------------- files someone else wrote


def _append(path: Path, text: str) -> bytes:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
    return path.read_bytes()


def test_edited_files_are_kept_and_the_others_follow_the_arguments(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path, amqp_url="amqp://u:pw@127.0.0.1:5672/a")
    partner = tmp_path / "partners" / "MX-ANAM" / "partner.toml"
    fixture = tmp_path / "partners" / "MX-ANAM" / "fixtures" / "inbound"
    fixture = next(fixture.iterdir())
    edited = {
        partner: _append(partner, "# revoked by hand\n"),
        fixture: _append(fixture, "\n"),
    }
    # The kept partner file is on AMQP; the rewritten gateway.toml follows the new arguments
    # (no broker): the two disagree, and the kept file is named with what to do.
    with pytest.raises(ConfigError) as caught:
        make_dev_environment(tmp_path)
    assert caught.value.file == str(partner)
    assert caught.value.key == "amqp.enabled"
    assert "remove it to let the sandbox write its own" in caught.value.reason
    assert {path: path.read_bytes() for path in edited} == edited
    with (tmp_path / "gateway.toml").open("rb") as handle:
        assert "amqp" not in tomllib.load(handle)
    assert b"enabled = false" in (tmp_path / "partners" / "CA-CBSA" / "partner.toml").read_bytes()
    # With the broker asked again, the kept file and the others agree.
    env = make_dev_environment(tmp_path, amqp_url="amqp://u:pw@127.0.0.1:5672/a")
    assert {path: path.read_bytes() for path in edited} == edited
    assert set(env.kept) == set(edited)
    config = load_config(env.config_path, environ={})
    assert config.amqp.url is not None
    assert config.partners["MX-ANAM"].amqp.enabled is True


def test_a_hand_written_gateway_toml_is_served_as_it_is(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path / "model")
    own = (tmp_path / "model" / "gateway.toml").read_text(encoding="utf-8")
    own = own.replace("port = 0", "port = 0 # mine", 1).replace(GENERATED_MARK, "# mine", 1)
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "gateway.toml").write_text(own, encoding="utf-8")
    env = make_dev_environment(tmp_path / "env", host="127.0.0.1", partner_port=0)
    assert env.kept == (tmp_path / "env" / "gateway.toml",)
    assert (tmp_path / "env" / "gateway.toml").read_text(encoding="utf-8") == own


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"partner_port": 9000}, "partner_listen.port: the file says 0, 9000 was asked; kept"),
        ({"api_port": 9001}, "api_listen.port: the file says 0, 9001 was asked; kept"),
        ({"host": "127.0.0.2"}, "partner_listen.host: the file says '127.0.0.1', '127.0.0.2'"),
        (
            {"amqp_url": "amqp://u:secret@127.0.0.1/v"},
            "amqp.url: the file names no broker, one was asked; kept as it is",
        ),
    ],
)
def test_a_kept_gateway_toml_refuses_what_it_does_not_say(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    path = prepare_dev_environment(tmp_path)
    text = _append(path, "# edited\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        make_dev_environment(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"{path}: ")
    assert "remove it to let the sandbox write its own" in str(caught.value)
    assert "secret" not in str(caught.value)
    assert path.read_bytes() == text
    # What it does say, or nothing asked: served as it is.
    assert make_dev_environment(tmp_path, partner_port=0, host="127.0.0.1").kept == (path,)


def test_a_kept_file_that_does_not_load_says_what_to_do(tmp_path: Path) -> None:
    path = prepare_dev_environment(tmp_path)
    _append(path, 'store_url = "ftp://nowhere"\n')
    with pytest.raises(ConfigError, match="remove it to let the sandbox write its own"):
        prepare_dev_environment(tmp_path)


def test_an_unchanged_file_is_rewritten_and_written_owner_only(tmp_path: Path) -> None:
    path = prepare_dev_environment(tmp_path, partner_port=9000)
    path.chmod(0o644)  # as an older version wrote it
    prepare_dev_environment(tmp_path, partner_port=9000, amqp_url="amqp://u:pw@127.0.0.1/v")
    assert load_config(path, environ={}).partner_listen.port == 9000
    assert make_dev_environment(tmp_path, partner_port=9001).kept == ()
    assert load_config(path, environ={}).partner_listen.port == 9001
    for written in [path, tmp_path / GENERATED_RECORD, *tmp_path.rglob("partner.toml")]:
        assert stat.S_IMODE(written.stat().st_mode) == 0o600, written


def test_a_directory_without_record_rewrites_only_its_generated_files(tmp_path: Path) -> None:
    """A directory made before the record existed: the files that carry the generated mark
    are the sandbox's, rewritten from the options as the older version did; others are kept."""
    path = prepare_dev_environment(tmp_path)
    (tmp_path / GENERATED_RECORD).unlink()
    assert make_dev_environment(tmp_path, partner_port=9000).kept == ()
    assert load_config(path, environ={}).partner_listen.port == 9000
    (tmp_path / GENERATED_RECORD).unlink()
    partner = tmp_path / "partners" / "MX-ANAM" / "partner.toml"
    text = partner.read_text()
    partner.write_text(text.replace(GENERATED_MARK, "# written by hand"))
    assert make_dev_environment(tmp_path).kept == (partner,)
    assert not partner.read_text().startswith(GENERATED_MARK)


def test_a_damaged_record_is_refused(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path)
    (tmp_path / GENERATED_RECORD).write_text("[]\n")
    with pytest.raises(ConfigError, match=r"sandbox-generated\.json: \(file\): not the record"):
        prepare_dev_environment(tmp_path)


def test_a_folder_no_longer_named_is_kept_when_edited(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path, peers={"GB-HMRC": "https://127.0.0.1:9446"})
    folder = tmp_path / "partners" / "GB-HMRC"
    _append(folder / "partner.toml", "# mine now\n")
    assert make_dev_environment(tmp_path).kept == (folder,)
    assert (folder / "partner.toml").read_text().endswith("# mine now\n")


def test_the_certificates_cover_the_host_asked(tmp_path: Path) -> None:
    prepare_dev_environment(tmp_path)
    prepare_dev_environment(tmp_path, host="127.0.0.2")
    for party in ("US-CBP", "MX-ANAM"):
        leaf = load_certificate(tmp_path / party / "tls.pem")
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "127.0.0.2" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_the_certificates_cover_the_host_of_a_kept_gateway_toml(tmp_path: Path) -> None:
    path = prepare_dev_environment(tmp_path)
    path.write_text(path.read_text().replace('host = "127.0.0.1"', 'host = "127.0.0.3"'))
    assert make_dev_environment(tmp_path).kept == (path,)
    leaf = load_certificate(tmp_path / "US-CBP" / "tls.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.3" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
