"""Development PKI: layout of PROTOCOL section 8, certificates that really do mutual TLS,
keys and thumbprints that other code (and jwcrypto) agree on, and idempotence."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from jwcrypto import jwk  # type: ignore[import-untyped]

from gateway.cli.main import cli
from gateway.crypto.keys import load_signing_key, load_verification_key
from gateway.crypto.pki import PkiError, init_dev_pki
from gateway.crypto.x509 import cert_fingerprint, cert_subject_cn, load_certificate

PARTIES = ["US-CBP", "MX-ANAM", "CA-CBSA"]
PARTY_FILES = ["tls.key", "tls.pem", "sign.key", "sign.pub", "sign.kid", "audit.key", "audit.pub"]
GATEWAY_FILES = ["api-token.key", "api-token.pub"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("pki") / "dev"
    return root, init_dev_pki(root, PARTIES)


def test_layout_and_what_it_reports(pki: tuple[Path, list[str]]) -> None:
    root, created = pki
    expected = ["ca.key", "ca.pem"]
    for party in PARTIES:
        expected += [f"{party}/{name}" for name in PARTY_FILES]
        if party == "US-CBP":
            expected += [f"US-CBP/{name}" for name in GATEWAY_FILES]
    assert created == expected
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted(expected)


def test_private_keys_are_owner_only(pki: tuple[Path, list[str]]) -> None:
    root, created = pki
    for name in created:
        mode = stat.S_IMODE((root / name).stat().st_mode)
        if name.endswith(".key"):
            assert mode == 0o600, name
        else:
            assert mode & 0o077 != 0o077, name


def test_second_run_creates_nothing_and_changes_nothing(pki: tuple[Path, list[str]]) -> None:
    root, created = pki
    before = {name: (root / name).read_bytes() for name in created}
    assert init_dev_pki(root, PARTIES) == []
    assert {name: (root / name).read_bytes() for name in created} == before


@pytest.mark.parametrize("party", PARTIES)
def test_tls_certificate_chains_to_the_ca_for_server_and_client_use(
    pki: tuple[Path, list[str]], party: str
) -> None:
    root, _ = pki
    ca = load_certificate(root / "ca.pem")
    leaf = load_certificate(root / party / "tls.pem")
    assert cert_subject_cn(leaf) == party
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    policy = PolicyBuilder().store(Store([ca]))
    server_chain = policy.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    assert server_chain[-1] == ca
    client = policy.build_client_verifier().verify(leaf, [])
    assert client.chain[-1] == ca
    assert cert_fingerprint(leaf) == cert_fingerprint((root / party / "tls.pem").read_bytes())
    assert len(cert_fingerprint(leaf)) == 64


async def test_certificates_do_mutual_tls_on_loopback(pki: tuple[Path, list[str]]) -> None:
    root, _ = pki
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=root / "ca.pem")
    server_ctx.load_cert_chain(root / "US-CBP" / "tls.pem", root / "US-CBP" / "tls.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=root / "ca.pem")
    client_ctx.load_cert_chain(root / "MX-ANAM" / "tls.pem", root / "MX-ANAM" / "tls.key")
    peer_names: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        peer_names.append(cert_subject_cn(x509.load_der_x509_certificate(der)))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        for host in ("127.0.0.1", "localhost"):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=host
            )
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
            writer.close()
            await writer.wait_closed()
    assert peer_names == ["MX-ANAM", "MX-ANAM"]


@pytest.mark.parametrize("party", PARTIES)
def test_signing_keys_and_kid(pki: tuple[Path, list[str]], party: str) -> None:
    root, _ = pki
    signing = load_signing_key(root / party / "sign.key", party=party, alg="EdDSA")
    verifying = load_verification_key(root / party / "sign.pub", party=party, alg="EdDSA")
    kid = (root / party / "sign.kid").read_text(encoding="ascii")
    assert kid.endswith("\n")
    assert kid.count("\n") == 1
    assert kid.strip() == signing.kid == verifying.kid
    assert (root / party / "sign.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (root / party / "sign.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    independent = jwk.JWK.from_pem((root / party / "sign.pub").read_bytes())
    assert independent.thumbprint() == kid.strip()


def test_gateway_party_keys_are_distinct_ed25519_pairs(pki: tuple[Path, list[str]]) -> None:
    root, _ = pki
    kids = {
        load_verification_key(root / "US-CBP" / f"{name}.pub", party="US-CBP", alg="EdDSA").kid
        for name in ("sign", "audit", "api-token")
    }
    assert len(kids) == 3
    for name in ("audit", "api-token"):
        key = load_signing_key(root / "US-CBP" / f"{name}.key", party="US-CBP", alg="EdDSA")
        assert isinstance(key.private_key, Ed25519PrivateKey)
    assert (root / "MX-ANAM" / "audit.pub").read_bytes() != (
        root / "US-CBP" / "audit.pub"
    ).read_bytes()
    assert not (root / "MX-ANAM" / "api-token.key").exists()


def test_only_missing_files_are_made(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"])
    key_before = (tmp_path / "MX-ANAM" / "tls.key").read_bytes()
    sign_before = (tmp_path / "MX-ANAM" / "sign.key").read_bytes()
    (tmp_path / "MX-ANAM" / "tls.pem").unlink()
    (tmp_path / "MX-ANAM" / "sign.kid").unlink()
    (tmp_path / "MX-ANAM" / "sign.pub").unlink()
    assert init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"]) == [
        "MX-ANAM/tls.pem",
        "MX-ANAM/sign.pub",
        "MX-ANAM/sign.kid",
    ]
    assert (tmp_path / "MX-ANAM" / "tls.key").read_bytes() == key_before
    assert (tmp_path / "MX-ANAM" / "sign.key").read_bytes() == sign_before
    new_cert = load_certificate(tmp_path / "MX-ANAM" / "tls.pem")
    key = load_signing_key(tmp_path / "MX-ANAM" / "sign.key", party="MX-ANAM", alg="EdDSA")
    assert (tmp_path / "MX-ANAM" / "sign.kid").read_text(encoding="ascii").strip() == key.kid
    assert cert_subject_cn(new_cert) == "MX-ANAM"


def test_a_new_party_joins_an_existing_pki(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP"])
    assert init_dev_pki(tmp_path, ["US-CBP", "GB-HMRC"]) == [
        f"GB-HMRC/{name}" for name in PARTY_FILES
    ]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "MX-ANAM" / "sign.key").unlink(), "sign.pub exists without sign.key"),
        (lambda root: (root / "MX-ANAM" / "tls.key").unlink(), "tls.pem exists without tls.key"),
        (
            lambda root: (root / "MX-ANAM" / "sign.kid").write_text("not-it\n"),
            "sign.kid is not the thumbprint of sign.pub",
        ),
        (
            lambda root: (root / "MX-ANAM" / "sign.pub").write_bytes(
                (root / "US-CBP" / "sign.pub").read_bytes()
            ),
            "sign.pub does not match sign.key",
        ),
    ],
)
def test_inconsistent_directories_are_refused(tmp_path: Path, damage: object, message: str) -> None:
    init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"])
    assert callable(damage)
    damage(tmp_path)
    with pytest.raises(PkiError, match=message):
        init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"])


def test_no_certificate_without_the_ca_key(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP"])
    (tmp_path / "ca.key").unlink()
    assert init_dev_pki(tmp_path, ["US-CBP"]) == []
    with pytest.raises(PkiError, match=r"ca.pem exists without ca.key: cannot issue .* GB-HMRC"):
        init_dev_pki(tmp_path, ["US-CBP", "GB-HMRC"])


@pytest.mark.parametrize("party", ["../etc", "us-cbp", "US-CBP/..", "", "X" * 40])
def test_bad_party_ids_never_become_paths(tmp_path: Path, party: str) -> None:
    with pytest.raises(ValueError, match="not a party id"):
        init_dev_pki(tmp_path / "pki", ["US-CBP", party])
    assert not (tmp_path / "pki").exists()


def _write_partners(root: Path, *names: str) -> Path:
    partners = root / "partners"
    for name in names:
        (partners / name).mkdir(parents=True)
    (partners / "README.md").write_text("not a partner\n", encoding="utf-8")
    return partners


def test_cli_pki_init_prints_what_it_made_then_nothing_to_do(tmp_path: Path) -> None:
    partners = _write_partners(tmp_path, "MX-ANAM", "CA-CBSA")
    args = ["pki", "init", "--dir", str(tmp_path / "dev"), "--partners-dir", str(partners)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert lines[0] == f"created {tmp_path / 'dev' / 'ca.key'}"
    assert f"created {tmp_path / 'dev' / 'CA-CBSA' / 'sign.kid'}" in lines
    assert f"created {tmp_path / 'dev' / 'US-CBP' / 'audit.key'}" in lines
    assert len(lines) == 2 + 3 * len(PARTY_FILES) + len(GATEWAY_FILES)
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0
    assert second.output == (
        f"nothing to do: {tmp_path / 'dev'} is complete for US-CBP, CA-CBSA, MX-ANAM\n"
    )


def test_cli_pki_init_refuses_a_partner_folder_that_is_not_a_party_id(tmp_path: Path) -> None:
    partners = _write_partners(tmp_path, "MX-ANAM", "mx_anam")
    result = CliRunner().invoke(
        cli, ["pki", "init", "--dir", str(tmp_path / "dev"), "--partners-dir", str(partners)]
    )
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {partners / 'mx_anam'}: (folder): folder name 'mx_anam' is not a party id\n"
    )
    assert not (tmp_path / "dev").exists()


def test_cli_pki_init_reports_an_inconsistent_directory(tmp_path: Path) -> None:
    partners = _write_partners(tmp_path, "MX-ANAM")
    init_dev_pki(tmp_path / "dev", ["US-CBP", "MX-ANAM"])
    (tmp_path / "dev" / "MX-ANAM" / "tls.key").unlink()
    result = CliRunner().invoke(
        cli, ["pki", "init", "--dir", str(tmp_path / "dev"), "--partners-dir", str(partners)]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "tls.pem exists without tls.key" in result.stderr
    assert "Traceback" not in result.output


def _verifies_for(root: Path, party: str, host: str) -> bool:
    ca = load_certificate(root / "ca.pem")
    leaf = load_certificate(root / party / "tls.pem")
    policy = PolicyBuilder().store(Store([ca]))
    name = x509.IPAddress(ipaddress.ip_address(host))
    try:
        policy.build_server_verifier(name).verify(leaf, [])
    except VerificationError:
        return False
    return True


def test_a_certificate_is_reissued_for_hosts_it_does_not_cover(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"])
    keys = {p: p.read_bytes() for p in tmp_path.rglob("*.key")}
    assert not _verifies_for(tmp_path, "US-CBP", "127.0.0.2")
    hosts = ["127.0.0.1", "localhost", "127.0.0.2"]
    assert init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"], hosts=hosts) == [
        "US-CBP/tls.pem",
        "MX-ANAM/tls.pem",
    ]
    assert _verifies_for(tmp_path, "US-CBP", "127.0.0.2")
    assert _verifies_for(tmp_path, "MX-ANAM", "127.0.0.1")
    # Same keys; a certificate covering more than asked is kept.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.key")} == keys
    assert init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"]) == []


def test_certificates_of_a_former_ca_are_reissued(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"])
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.key").unlink()
    assert init_dev_pki(tmp_path, ["US-CBP", "MX-ANAM"]) == [
        "ca.key",
        "ca.pem",
        "US-CBP/tls.pem",
        "MX-ANAM/tls.pem",
    ]
    assert _verifies_for(tmp_path, "US-CBP", "127.0.0.1")
    assert _verifies_for(tmp_path, "MX-ANAM", "127.0.0.1")


def test_a_certificate_from_another_ca_is_never_replaced(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP"])
    # Another administration's CA: same key type, another issuer name.
    foreign = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "US-CBP")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Agency CA")]))
        .public_key(load_certificate(tmp_path / "US-CBP" / "tls.pem").public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    pem = foreign.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "US-CBP" / "tls.pem").write_bytes(pem)
    with pytest.raises(PkiError, match=r"not issued by ca\.pem and .*no development CA"):
        init_dev_pki(tmp_path, ["US-CBP"])
    assert (tmp_path / "US-CBP" / "tls.pem").read_bytes() == pem


def test_no_reissue_without_the_ca_key(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, ["US-CBP"])
    (tmp_path / "ca.key").unlink()
    before = (tmp_path / "US-CBP" / "tls.pem").read_bytes()
    with pytest.raises(PkiError, match=r"does not cover 127.0.0.2, and ca.pem exists without ca"):
        init_dev_pki(tmp_path, ["US-CBP"], hosts=["127.0.0.2"])
    assert (tmp_path / "US-CBP" / "tls.pem").read_bytes() == before
