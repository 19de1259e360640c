"""``c2c-gateway check``: what a configuration ``serve`` accepts should not have in production
(the real CLI, in a subprocess, on a copy of the repository's configuration)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from config_files import edit_once
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from gateway.crypto.pki import init_dev_pki

G = "gateway.toml"
MX = "partners/MX-ANAM/partner.toml"
CA = "partners/CA-CBSA/partner.toml"
DEV = "certs/dev"


def _cli(command: str, tree: Path, env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    """The real CLI's ``command --config gateway.toml`` in ``tree``, to its end."""
    cli = [sys.executable, "-c", "from gateway.cli.main import main; main()"]
    return subprocess.run(
        [*cli, command, "--config", str(tree / G)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _check(tree: Path, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    done = _cli("check", tree, env)
    return done.returncode, done.stdout.splitlines(), done.stderr


def _where(lines: list[str]) -> list[str]:
    """The setting each finding names (the lines before the summary): its key, after the
    partner file that holds it, if any."""
    names = []
    for line in lines[:-1]:
        head, _, rest = line.strip().partition(": ")
        names.append(f"{head}: {rest.partition(': ')[0]}" if head.endswith(".toml") else head)
    return names


def _production(tree: Path) -> None:
    """The copy made fit for production: a CA of the administration's own (not the
    development PKI's) for our certificate and the partners', OCSP, no token signing key
    (nor its private key beside the public one), real audit origins."""
    ca = trustme.CA(organization_name="U.S. Customs and Border Protection")
    leaf = ca.issue_cert("US-CBP", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tree / DEV / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tree / DEV / "US-CBP" / "tls.pem"))
    leaf.private_key_pem.write_to_path(str(tree / DEV / "US-CBP" / "tls.key"))
    (tree / DEV / "US-CBP" / "tls.key").chmod(0o600)
    edit_once(tree / G, "[tls]\n", "[tls]\nocsp = true\n")
    edit_once(tree / G, 'signing_key = "certs/dev/US-CBP/api-token.key"\n', "")
    (tree / DEV / "US-CBP" / "api-token.key").unlink()
    edit_once(tree / G, '"dev.c2c-gateway.invalid/US-CBP"', '"c2c.cbp.dhs.gov/US-CBP"')
    for partner, origin in ((MX, "c2c.anam.gob.mx/MX-ANAM"), (CA, "c2c.cbsa-asfc.gc.ca/CA-CBSA")):
        edit_once(
            tree / partner, f'"dev.c2c-gateway.invalid/{origin.rsplit("/")[-1]}"', f'"{origin}"'
        )
    # the partners at their own hosts, MX-ANAM's over a VPN, not on this host's loopback
    edit_once(tree / MX, '"https://127.0.0.1:9444/', '"https://c2c.anam.gob.mx/')
    edit_once(tree / MX, '["127.0.0.1/32"]', '["10.44.0.0/16", "fd44:c2c::/48"]')
    edit_once(tree / CA, '"https://127.0.0.1:9445/', '"https://c2c.cbsa-asfc.gc.ca/')
    edit_once(tree / CA, '["127.0.0.1/32"]', "[]")


def test_the_development_configuration_is_not_fit_for_production(tree: Path) -> None:
    code, out, err = _check(tree)
    assert (code, err) == (1, ""), out
    assert _where(out) == [
        "tls.crls, tls.ocsp",
        "tls.cert",
        "tls.ca",
        f"{CA}: https.ca",
        f"{MX}: https.ca",
        "api_auth.signing_key",
        "audit.origin",
        f"{CA}: audit.origin",
        f"{MX}: audit.origin",
        f"{CA}: https.allowed_networks[0]",
        f"{MX}: https.allowed_networks[0]",
    ]
    assert out[0] == (
        "  tls.crls, tls.ocsp: no revocation check: a partner certificate its CA revoked is"
        " accepted until it expires (give the partner CAs' CRLs, or ocsp = true)"
    )
    assert out[-1] == f"{tree / G}: 11 setting(s) not fit for production"


def test_a_production_configuration_has_nothing_to_say(tree: Path) -> None:
    _production(tree)
    assert _check(tree) == (0, [f"{tree / G}: nothing found unfit for production"], "")


def test_passwords_written_into_gateway_toml_are_named_and_not_shown(tree: Path) -> None:
    _production(tree)
    edit_once(
        tree / G,
        'store_url = "sqlite:///var/c2c.db"',
        'store_url = "postgresql://gw:hunter2@127.0.0.1:5432/c2c"',
    )
    edit_once(tree / G, "[amqp]\n", '[amqp]\nurl = "amqp://gw:s3cret@127.0.0.1:5672/c2c"\n')
    code, out, err = _check(tree)
    assert (code, err) == (1, "")
    assert _where(out) == ["store_url", "amqp.url"]
    assert "hunter2" not in "\n".join(out)
    assert "s3cret" not in "\n".join(out)
    # from the environment, as the comments in gateway.toml advise: nothing to say
    edit_once(tree / G, 'store_url = "postgresql://gw:hunter2@127.0.0.1:5432/c2c"', "")
    edit_once(tree / G, 'url = "amqp://gw:s3cret@127.0.0.1:5672/c2c"', 'url_env = "C2C_AMQP"')
    env = {"C2C_AMQP": "amqp://gw:s3cret@127.0.0.1:5672/c2c"}
    assert _check(tree, env)[:2] == (0, [f"{tree / G}: nothing found unfit for production"])


def test_a_private_key_file_others_may_read_is_named_with_its_mode(tree: Path) -> None:
    _production(tree)
    key = tree / DEV / "US-CBP" / "tls.key"
    key.chmod(0o640)  # its group alone
    code, out, _ = _check(tree)
    assert code == 1
    assert out[:-1] == [
        f"  tls.key: {key.resolve()} is mode 0640: its group or others may read it (chmod 600)"
    ]
    key.chmod(0o710)  # its group may run it, which reads nothing
    assert _check(tree)[0] == 0


def test_a_configuration_that_does_not_load_is_the_error_serve_gives(tree: Path) -> None:
    edit_once(tree / G, 'party = "US-CBP"', 'party = ""')
    code, out, err = _check(tree)
    assert (code, out) == (2, [])
    assert err.startswith(f"error: {tree / G}: party: "), err


def test_a_password_in_the_query_string_is_a_password(tree: Path) -> None:
    _production(tree)
    sqlite = 'store_url = "sqlite:///var/c2c.db"'
    for url in (
        "postgresql://gw@127.0.0.1:5432/c2c?password=hunter2",
        "postgresql://gw@127.0.0.1:5432/c2c?sslmode=verify-full&sslpassword=hunter2",
    ):
        edit_once(tree / G, sqlite, f'store_url = "{url}"')
        code, out, _ = _check(tree)
        assert (code, _where(out)) == (1, ["store_url"]), url
        assert "hunter2" not in "\n".join(out)
        edit_once(tree / G, f'store_url = "{url}"', sqlite)


def test_reserved_origins_are_found_however_they_are_spelt(tree: Path) -> None:
    _production(tree)
    now = '"c2c.cbp.dhs.gov/US-CBP"'
    for origin in (
        "DEV.C2C-gateway.INVALID/US-CBP",
        "dev.c2c-gateway.invalid:443/US-CBP",
        "dev.c2c-gateway.invalid./US-CBP",
        "https://dev.c2c-gateway.invalid/US-CBP",
        "c2c.example.org/US-CBP",
        "example.com/US-CBP",
        "localhost/US-CBP",
    ):
        edit_once(tree / G, now, f'"{origin}"')
        code, out, _ = _check(tree)
        assert (code, _where(out)) == (1, ["audit.origin"]), origin
        now = f'"{origin}"'
    edit_once(tree / G, now, '"c2c.cbp.dhs.gov:8443/US-CBP"')
    assert _check(tree)[0] == 0


def test_a_token_key_whose_private_half_lies_beside_it(tree: Path) -> None:
    """pki init leaves api-token.key beside api-token.pub: with signing_key removed, whoever
    reads it still issues tokens the gateway takes."""
    _production(tree)
    made = tree / "made"
    init_dev_pki(made, ["US-CBP"])
    for name in ("api-token.key", "api-token.pub"):
        shutil.copy(made / "US-CBP" / name, tree / DEV / "US-CBP" / name)
    code, out, _ = _check(tree)
    public = (tree / DEV / "US-CBP" / "api-token.pub").resolve()
    assert (code, out[:-1]) == (
        1,
        [
            f"  api_auth.public_keys[0]: the private key of {public} lies beside it"
            f" ({public.with_suffix('.key')}, as pki init leaves it): whoever reads it can"
            " issue tokens of any scope"
        ],
    )


#: DER of the organisation "QQQQ" (a UTF8String) and of the P-256 curve's OID
_ORGANISATION = b"\x0c\x04QQQQ"
_P256 = b"\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"
#: what cryptography cannot parse in their place, though OpenSSL may take it: a T61String of
#: bytes no decoder takes; the prime192v2 curve, which it does not support
_ODD = {
    "name": (_ORGANISATION, b"\x14\x04\xff\xfe\xfd\xfc"),
    "curve": (_P256, b"\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x02"),
}


def _ca_cryptography_cannot_parse(odd: str) -> bytes:
    """A P-256 CA certificate (PEM) with one part replaced by what cryptography cannot
    parse (its signature no longer matches: only its parsing matters here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "QQQQ"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Odd CA"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    part, replacement = _ODD[odd]
    assert len(part) == len(replacement)
    odd_der = der.replace(part, replacement)
    assert odd_der != der
    body = base64.encodebytes(odd_der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    pem = ["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----", ""]
    return "\n".join(pem).encode()


@pytest.mark.parametrize("odd", sorted(_ODD))
def test_a_ca_file_holding_what_cryptography_cannot_parse(tree: Path, odd: str) -> None:
    """OpenSSL takes such a file; the check and the configuration's cross-checks (the CA
    file is ours and the partners') go on."""
    _production(tree)
    ca = tree / DEV / "ca.pem"
    ca.write_bytes(ca.read_bytes() + _ca_cryptography_cannot_parse(odd))
    assert _check(tree) == (0, [f"{tree / G}: nothing found unfit for production"], "")


def test_a_certificate_file_that_cannot_be_read_is_serve_s_error(tree: Path) -> None:
    """serve refuses it at start: check says so as serve does (exit 2), not as a finding."""
    _production(tree)
    (tree / DEV / "US-CBP" / "tls.pem").write_text("not a certificate\n")
    code, out, err = _check(tree)
    assert (code, out) == (2, [])
    assert err.startswith(
        f"error: {(tree / DEV / 'US-CBP' / 'tls.pem').resolve()}: tls.cert: holds no PEM"
        " certificate: "
    ), err


# -- a CA file in OpenSSL's TRUSTED CERTIFICATE form (openssl x509 -trustout)


def _trustout(pem: Path, out: Path) -> None:
    """``pem``'s certificate written to ``out`` as ``openssl x509 -trustout`` writes it: a
    TRUSTED CERTIFICATE block, the certificate followed by OpenSSL's trust settings."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command (Debian package openssl) is needed"
    done = subprocess.run(
        [openssl, "x509", "-in", str(pem), "-trustout"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert done.stdout.startswith(b"-----BEGIN TRUSTED CERTIFICATE-----\n"), done.stdout
    out.write_bytes(done.stdout)


def test_a_ca_file_in_trusted_certificate_form_stops_the_check_as_it_stops_serve(
    tree: Path,
) -> None:
    """OpenSSL trusts the development CA written by openssl x509 -trustout beside a
    production CA, but the gateway's own readers pass over it: the configuration is refused,
    by serve and by check alike (exit 2, serve's error)."""
    dev = tree / "dev-ca.trusted.pem"
    _trustout(tree / DEV / "ca.pem", dev)
    _production(tree)
    ca = (tree / DEV / "ca.pem").resolve()
    ca.write_bytes(ca.read_bytes() + dev.read_bytes())
    code, out, err = _check(tree)
    assert (code, out) == (2, []), err
    assert f"{tree / G}: tls.ca: {ca} holds a TRUSTED CERTIFICATE block" in err, err


# -- a partner's allowed_networks


@pytest.mark.parametrize(
    "network", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "64.0.0.0/2", "10.0.0.0/7", "::/1", "fc00::/6"]
)
def test_a_partner_network_wider_than_any_private_one(tree: Path, network: str) -> None:
    _production(tree)
    edit_once(tree / MX, '"fd44:c2c::/48"]', f'"fd44:c2c::/48", "{network}"]')
    code, out, _ = _check(tree)
    assert (code, _where(out)) == (1, [f"{MX}: https.allowed_networks[2]"]), out
    assert "the gateway connects wherever the partner's URL leads" in out[0], out


def _check_with_ca_network(tree: Path, network: str) -> tuple[int, list[str]]:
    """The check of the production-like configuration with CA-CBSA allowing ``network``."""
    _production(tree)
    edit_once(tree / CA, "allowed_networks = []", f'allowed_networks = ["{network}"]')
    code, out, _ = _check(tree)
    return code, out


@pytest.mark.parametrize(
    "network", ["127.0.0.1/32", "127.0.0.0/8", "::1/128", "0.0.0.0/8", "0.0.0.0/32", "::/128"]
)
def test_a_partner_network_on_this_host_is_a_development_setting(tree: Path, network: str) -> None:
    code, out = _check_with_ca_network(tree, network)
    assert (code, _where(out)) == (1, [f"{CA}: https.allowed_networks[0]"]), out
    assert f"{network} admits addresses of this host (loopback, or the unspecified" in out[0]


@pytest.mark.parametrize("network", ["169.254.0.0/16", "169.254.169.254/32", "fe80::/10"])
def test_a_partner_network_on_link_local_addresses_is_a_finding(tree: Path, network: str) -> None:
    code, out = _check_with_ca_network(tree, network)
    assert (code, _where(out)) == (1, [f"{CA}: https.allowed_networks[0]"]), out
    assert f"{network} admits link-local addresses, the cloud metadata service" in out[0]


@pytest.mark.parametrize("network", ["10.0.0.0/8", "100.64.0.0/10", "192.168.7.0/24", "fc00::/7"])
def test_a_partner_network_a_vpn_may_have_is_not_a_finding(tree: Path, network: str) -> None:
    code, out = _check_with_ca_network(tree, network)
    assert (code, out) == (0, [f"{tree / G}: nothing found unfit for production"])


# -- what serve refuses at start: check refuses it too, with serve's error (exit 2)


def _serve(tree: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``serve``'s exit status and its last line on stderr (its error), for a configuration
    it must refuse before it serves."""
    done = _cli("serve", tree, env)
    return done.returncode, done.stderr.strip().splitlines()[-1]


#: the one part of a refusal that is not the same twice: when it was asked
_ASKED_AT = re.compile(r"valid at \S+")


def _refused_as_serve_refuses(tree: Path, env: dict[str, str] | None = None) -> str:
    """check's error for a configuration serve refuses at start, which must be serve's; the
    listeners on ports of their own (0), should serve start after all."""
    for port in ("port = 8443", "port = 8080"):
        edit_once(tree / G, port, "port = 0")
    code, out, err = _check(tree, env)
    assert (code, out) == (2, []), err
    served = _serve(tree, env)
    assert (served[0], _ASKED_AT.sub("valid at T", served[1])) == (
        2,
        _ASKED_AT.sub("valid at T", err.strip()),
    )
    return err.strip()


def test_a_certificate_not_of_our_key_is_refused_as_serve_refuses_it(tree: Path) -> None:
    ours = tree / DEV / "US-CBP"
    shutil.copy(tree / DEV / "MX-ANAM" / "tls.pem", ours / "tls.pem")
    assert _refused_as_serve_refuses(tree) == (
        f"error: {(ours / 'tls.pem').resolve()}: tls.cert: is not the certificate of the key in"
        f" {(ours / 'tls.key').resolve()} (tls.key): the two are not a usable pair"
        " (KEY_VALUES_MISMATCH)"
    )


def _our_certificate(tree: Path, not_before: datetime, not_after: datetime) -> bytes:
    """Our TLS key, certified by the development CA for the period given."""
    ca_cert = x509.load_pem_x509_certificate((tree / DEV / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tree / DEV / "ca.key").read_bytes(), None)
    key = serialization.load_pem_private_key((tree / DEV / "US-CBP" / "tls.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "US-CBP")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("when", ["expired", "not yet valid"])
def test_a_certificate_out_of_its_validity_period_is_refused_as_serve_refuses_it(
    tree: Path, when: str
) -> None:
    """Checked when serve's TLS identity starts, after the store is open: not by loading the
    configuration, nor by building the gateway."""
    now = datetime.now(UTC).replace(microsecond=0)
    if when == "expired":
        start, end = now - timedelta(days=30), now - timedelta(days=1)
        reason = f"expired at {end:%Y-%m-%dT%H:%M:%S}.000Z"
    else:
        start, end = now + timedelta(days=1), now + timedelta(days=30)
        reason = f"is not valid before {start:%Y-%m-%dT%H:%M:%S}.000Z"
    cert = tree / DEV / "US-CBP" / "tls.pem"
    cert.write_bytes(_our_certificate(tree, start, end))
    assert _refused_as_serve_refuses(tree) == f"error: {cert.resolve()}: tls.cert: {reason}"


def _toml_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("when", ["expired", "not yet valid"])
def test_our_only_signing_key_out_of_its_window_is_refused_as_serve_refuses_it(
    tree: Path, when: str
) -> None:
    now = datetime.now(UTC)
    window = (
        f"not_before = 2025-01-01T00:00:00Z\nnot_after = {_toml_time(now - timedelta(days=1))}"
        if when == "expired"
        else f"not_before = {_toml_time(now + timedelta(days=1))}"
    )
    edit_once(tree / G, "not_before = 2025-01-01T00:00:00Z", window)
    assert _refused_as_serve_refuses(tree).startswith(
        f"error: {tree / G}: signing_keys: no signing key of US-CBP is valid at "
    )


def test_a_token_key_the_api_does_not_allow_is_refused_as_serve_refuses_it(tree: Path) -> None:
    """A refusal of serve's while it builds the internal API: check builds what serve builds."""
    edit_once(tree / G, 'algorithms = ["EdDSA"]', 'algorithms = ["ES256"]')
    assert _refused_as_serve_refuses(tree) == (
        f"error: {tree / G}: api_auth.public_keys[0]: api-token.pub is an EdDSA key but"
        " api_auth.algorithms allows only ES256"
    )


def test_the_startup_self_test_is_checked_as_serve_checks_it(tree: Path) -> None:
    assert _refused_as_serve_refuses(tree, {"AIOHTTP_NO_EXTENSIONS": "1"}) == (
        "error: startup self-test failed: AIOHTTP_NO_EXTENSIONS is set: unset it, the C HTTP"
        " parser is required"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listen(tree: Path, partner: str, api: str, port: int) -> None:
    """Both listeners on ``port``, at the hosts given."""
    text = (tree / G).read_text(encoding="utf-8")
    for table, host in (("partner_listen", partner), ("api_listen", api)):
        text, count = re.subn(
            rf'\[{table}\]\nhost = "[^"]*"\nport = \d+',
            f'[{table}]\nhost = "{host}"\nport = {port}',
            text,
        )
        assert count == 1, table
    (tree / G).write_text(text, encoding="utf-8")


def test_both_listeners_on_one_address_are_refused_by_serve_and_check(tree: Path) -> None:
    """serve stopped with asyncio's bind error after the API listened (exit 1, naming neither
    key nor file): the configuration is refused at load now, and only where the two would
    share an address."""
    _production(tree)
    port = _free_port()
    _listen(tree, "127.0.0.1", "127.0.0.1", port)
    code, out, err = _check(tree)
    refusal = (
        f"error: {tree / G}: api_listen.port: the same address as partner_listen ('127.0.0.1'"
        f" port {port}): the internal API and the partner endpoint cannot both listen there;"
        " give api_listen a port of its own (8080 when it sets none)"
    )
    assert (code, out, err.strip()) == (2, [], refusal)
    assert _serve(tree) == (2, refusal)
    for partner, api, other_port in (
        ("127.0.0.1", "127.0.0.1", 0),  # a free port each
        ("127.0.0.1", "127.0.0.2", port),
        ("0.0.0.0", "::", port),  # asyncio binds IPv6 listeners IPv6-only
    ):
        _listen(tree, partner, api, other_port)
        assert _check(tree)[:2] == (0, [f"{tree / G}: nothing found unfit for production"])


@pytest.mark.parametrize(
    ("partner", "api", "shown"),
    [
        ("0.0.0.0", "127.0.0.1", "'127.0.0.1' port {port}, which '0.0.0.0' takes too"),
        ("::1", "::", "'::1' port {port}, which '::' takes too"),
        ("localhost", "LOCALHOST", "'LOCALHOST' port {port}"),
        ("::1", "0:0::1", "'0:0::1' port {port}, which is '::1'"),
    ],
)
def test_listeners_sharing_an_address_however_written_are_refused(
    tree: Path, partner: str, api: str, shown: str
) -> None:
    _listen(tree, partner, api, 18943)
    code, out, err = _check(tree)
    assert (code, out) == (2, [])
    assert err.startswith(
        f"error: {tree / G}: api_listen.port: the same address as partner_listen"
        f" ({shown.format(port=18943)}"
    ), err


# -- what serve takes without a word, though it does not work as meant (exit 1)


def _key_window(tree: Path, window: str) -> None:
    """MX-ANAM's one signing key given ``window`` (TOML lines) instead of its own."""
    edit_once(tree / MX, "not_before = 2025-01-01T00:00:00Z", window)


def _add_key_valid_now(tree: Path) -> None:
    """A new signing key of MX-ANAM's, valid since yesterday: a rotation."""
    new = tree / DEV / "MX-ANAM" / "sign-new.pub"
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    new.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    since = _toml_time(datetime.now(UTC) - timedelta(days=1))
    with (tree / MX).open("a", encoding="utf-8") as toml:
        toml.write(
            f'\n[[keys]]\npath = "../../certs/dev/MX-ANAM/sign-new.pub"\nalg = "EdDSA"\n'
            f"not_before = {since}\n"
        )


@pytest.mark.parametrize("when", ["expired", "not yet valid"])
def test_a_partner_none_of_whose_keys_is_valid_now_is_named(tree: Path, when: str) -> None:
    _production(tree)
    now = datetime.now(UTC)
    if when == "expired":
        end = _toml_time(now - timedelta(days=1))
        _key_window(tree, f"not_before = 2025-01-01T00:00:00Z\nnot_after = {end}")
        missed = f"expired at {end[:-1]}.000Z"
    else:
        start = _toml_time(now + timedelta(days=1))
        _key_window(tree, f"not_before = {start}")
        missed = f"is not valid before {start[:-1]}.000Z"
    code, out, _ = _check(tree)
    assert (code, _where(out)) == (1, [f"{MX}: keys"]), out
    head, _, tail = out[0].partition(" is valid now (")
    assert head == f"  {MX}: keys: none of MX-ANAM's signing keys"
    assert tail.partition("): ")[2] == (
        f"keys[0] {missed}; every message it signs now is refused (UNKNOWN_KEY). Add"
        " the key it signs with now (a [[keys]] entry with its not_before), or correct the"
        " window that is wrong, then send serve a SIGHUP"
    )
    # one key valid now is enough
    _add_key_valid_now(tree)
    assert _check(tree)[:2] == (0, [f"{tree / G}: nothing found unfit for production"])


_NO_VHOST = (
    "names no vhost, so the gateway declares its exchanges and queues in the broker's default"
    ' vhost "/", shared with whatever else uses the broker: name one of its own at the end of'
    " the URL (amqp://user@host/VHOST; c2c-gateway amqp setup makes it), or end it with /%2F"
    ' to choose "/"'
)


@pytest.mark.parametrize("url", ["amqp://gw@127.0.0.1:5672", "amqp://gw@127.0.0.1:5672/"])
def test_a_broker_url_naming_no_vhost_is_named(tree: Path, url: str) -> None:
    _production(tree)
    edit_once(tree / G, "[amqp]\n", f'[amqp]\nurl = "{url}"\n')
    code, out, _ = _check(tree)
    assert (code, out[:-1]) == (1, [f"  amqp.url: {_NO_VHOST}"])
    # from the environment: the key that names it
    edit_once(tree / G, f'url = "{url}"', 'url_env = "C2C_AMQP"')
    code, out, _ = _check(tree, {"C2C_AMQP": url})
    assert (code, out[:-1]) == (1, [f"  amqp.url_env: {_NO_VHOST}"])
    # a vhost named: the gateway's own, or "/" chosen (%2F)
    for path in ("/c2c", "/%2F", "/%2f"):
        named = {"C2C_AMQP": url.rstrip("/") + path}
        assert _check(tree, named)[:2] == (
            0,
            [f"{tree / G}: nothing found unfit for production"],
        ), path


@pytest.mark.parametrize("holding", ["nothing", "a file"])
def test_a_partners_dir_holding_no_partner_is_named(tree: Path, holding: str) -> None:
    _production(tree)
    folder = tree / "partners-new"
    folder.mkdir()
    if holding == "a file":
        (folder / "README.md").write_text("the partners' folders go here\n")
    edit_once(tree / G, 'partners_dir = "partners"', 'partners_dir = "partners-new"')
    code, out, err = _check(tree)
    assert (code, err) == (1, "")
    assert out == [
        f"  partners_dir: {folder} holds no partner (a folder with a partner.toml): the gateway"
        " would exchange with no one; set partners_dir, relative to gateway.toml, to the folder"
        " holding the partners' folders",
        f"{tree / G}: 1 setting(s) not fit for production",
    ]
