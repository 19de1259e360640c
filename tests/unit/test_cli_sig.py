"""``c2c-gateway sig sign|verify`` through the real CLI entry point (click's CliRunner)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwcrypto import jwk as jwcrypto_jwk  # type: ignore[import-untyped]
from jwcrypto import jws as jwcrypto_jws

from gateway.cli.main import cli
from gateway.crypto import jwk_thumbprint

BODY = b'{"header":{"sender":"MX-ANAM"},"payload":{"hs_code":"847130"}}'


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _write_pair(folder: Path, private: object) -> tuple[Path, Path]:
    assert hasattr(private, "private_bytes")
    assert hasattr(private, "public_key")
    key_path = folder / "sign.key"
    pub_path = folder / "sign.pub"
    key_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


@pytest.fixture(params=["EdDSA", "ES256"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, Path, Path]:
    alg: str = request.param
    private = (
        Ed25519PrivateKey.generate() if alg == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    )
    key_path, pub_path = _write_pair(tmp_path, private)
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    return alg, key_path, pub_path, body


def _sign(key_path: Path, body: Path, *extra: str) -> str:
    result = run("sig", "sign", "--key", str(key_path), "--body", str(body), *extra)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout.strip()


def test_sign_then_verify(pair: tuple[str, Path, Path, Path]) -> None:
    alg, key_path, pub_path, body = pair
    jws = _sign(key_path, body)
    assert jws.count(".") == 2
    assert jws.split(".")[1] == ""
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", jws)
    assert result.exit_code == 0
    private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    assert result.stdout == f"OK kid={jwk_thumbprint(private)} alg={alg}\n"
    assert result.stderr == ""


def test_signed_output_verifies_with_jwcrypto(pair: tuple[str, Path, Path, Path]) -> None:
    alg, key_path, pub_path, body = pair
    head, _, signature = _sign(key_path, body).split(".")
    payload = base64.urlsafe_b64encode(BODY).rstrip(b"=").decode()
    token = jwcrypto_jws.JWS()
    token.deserialize(f"{head}.{payload}.{signature}")
    token.verify(jwcrypto_jwk.JWK.from_pem(pub_path.read_bytes()), alg=alg)
    assert token.payload == BODY


def test_changed_body_prints_the_exact_reason(pair: tuple[str, Path, Path, Path]) -> None:
    alg, key_path, pub_path, body = pair
    jws = _sign(key_path, body)
    body.write_bytes(BODY + b"\n")
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", jws)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"SIGNATURE_INVALID: signature does not verify with key {jws_kid(pub_path)} ({alg}) "
        f"over the {len(BODY) + 1}-byte body"
    )


def jws_kid(pub_path: Path) -> str:
    public = serialization.load_pem_public_key(pub_path.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey | Ed25519PublicKey)
    return jwk_thumbprint(public)


def test_wrong_kid_prints_unknown_key_and_the_expected_kid(
    pair: tuple[str, Path, Path, Path],
) -> None:
    _, key_path, pub_path, body = pair
    jws = _sign(key_path, body, "--kid", "partner-key-2026")
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", jws)
    assert result.exit_code == 1
    assert result.stderr == (
        'UNKNOWN_KEY: kid "partner-key-2026" names no key configured\n'
        "hint: the kid must be the RFC 7638 thumbprint of the signing key; "
        f"for {pub_path} it is {jws_kid(pub_path)}\n"
    )


def test_a_jws_without_kid_says_its_signature_holds(tmp_path: Path) -> None:
    """josepeer finding F3: RFC 8037's Ed25519 example has no kid. The tool still refuses it
    as a gateway would, and says the signature itself holds, so a vector or a library's
    output is not taken for a wrong signature."""
    vector = json.loads(
        (Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "jose-vectors"
         / "rfc8037_ed25519.json").read_text()
    )  # fmt: skip
    x = base64.urlsafe_b64decode(vector["public_jwk"]["x"] + "=")
    pub_path = tmp_path / "rfc8037.pub"
    pub_path.write_bytes(
        Ed25519PublicKey.from_public_bytes(x).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    body = tmp_path / "body"
    body.write_bytes(bytes.fromhex(vector["jws"]["payload_hex"]))
    jws = vector["jws"]["compact_detached"]
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", jws)
    assert result.exit_code == 1
    assert result.stderr == (
        "SIGNATURE_INVALID: protected header has no kid: set it to the RFC 7638 thumbprint of"
        " the signing key\n"
        f"hint: the signature itself verifies with {pub_path}; a gateway still refuses it"
        f" without a kid: set kid to {jws_kid(pub_path)}\n"
    )
    body.write_bytes(b"another body")
    changed = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", jws)
    assert "hint" not in changed.stderr


def test_typ_options(pair: tuple[str, Path, Path, Path]) -> None:
    _, key_path, pub_path, body = pair
    xml = _sign(key_path, body, "--typ", "c2c+xml")
    verify = ("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", xml)
    refused = run(*verify)
    assert refused.exit_code == 1
    assert refused.stderr == (
        'SIGNATURE_INVALID: typ "c2c+xml" is not accepted here (expected c2c+json)\n'
    )
    assert run(*verify, "--typ", "c2c+xml").exit_code == 0
    untyped = _sign(key_path, body, "--typ", "")
    assert (
        run(
            "sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", untyped
        ).exit_code
        == 0
    )


def test_der_es256_signature_gets_a_precise_reason(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    _, pub_path = _write_pair(tmp_path, private)
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    kid = jwk_thumbprint(private)
    head = (
        base64.urlsafe_b64encode(f'{{"alg":"ES256","kid":"{kid}"}}'.encode()).rstrip(b"=").decode()
    )
    payload = base64.urlsafe_b64encode(BODY).rstrip(b"=").decode()
    der = private.sign(f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    jws = f"{head}..{base64.urlsafe_b64encode(der).rstrip(b'=').decode()}"
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", jws)
    assert result.exit_code == 1
    assert result.stderr == (
        f"SIGNATURE_INVALID: ES256 signature must be 64 bytes, got {len(der)}; it looks "
        "DER-encoded: ES256 needs the raw r||s form (RFC 7518 section 3.4)\n"
    )


def test_attached_payload_gets_a_precise_reason(pair: tuple[str, Path, Path, Path]) -> None:
    _, key_path, pub_path, body = pair
    head, _, signature = _sign(key_path, body).split(".")
    payload = base64.urlsafe_b64encode(BODY).rstrip(b"=").decode()
    result = run(
        "sig",
        "verify",
        "--key",
        str(pub_path),
        "--body",
        str(body),
        "--jws",
        f"{head}.{payload}.{signature}",
    )
    assert result.exit_code == 1
    assert result.stderr == (
        "SIGNATURE_INVALID: payload segment must be empty (detached JWS, RFC 7515 Appendix F), "
        f"found {len(payload)} characters: remove the middle part, keep the two dots\n"
    )


def test_explicit_alg_must_fit_the_key(pair: tuple[str, Path, Path, Path]) -> None:
    alg, key_path, _, body = pair
    other = "ES256" if alg == "EdDSA" else "EdDSA"
    assert _sign(key_path, body, "--alg", alg)
    result = run("sig", "sign", "--key", str(key_path), "--body", str(body), "--alg", other)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {key_path}: private key: is an ")
    assert result.stderr.endswith(f"but is configured with alg {other}\n")


def test_unreadable_files_exit_2_with_a_clear_error(tmp_path: Path) -> None:
    key_path, pub_path = _write_pair(tmp_path, Ed25519PrivateKey.generate())
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    missing = tmp_path / "missing"
    result = run("sig", "sign", "--key", str(missing), "--body", str(body))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {missing}: private key: cannot read file: No such file or directory\n",
    )
    result = run("sig", "sign", "--key", str(key_path), "--body", str(missing))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {missing}: cannot read body: No such file or directory\n",
    )
    jws = _sign(key_path, body)
    result = run("sig", "verify", "--key", str(missing), "--body", str(body), "--jws", jws)
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {missing}: public key: cannot read file: No such file or directory\n",
    )
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(tmp_path), "--jws", jws)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path}: cannot read body: ")
    result = run("sig", "verify", "--key", str(key_path), "--body", str(body), "--jws", jws)
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {key_path}: public key: is not a PEM public key (SubjectPublicKeyInfo)\n",
    )


def test_rsa_key_is_refused(tmp_path: Path) -> None:
    key_path, pub_path = _write_pair(
        tmp_path, rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    result = run("sig", "sign", "--key", str(key_path), "--body", str(body))
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {key_path}: private key: is an RSA key; "
        "only Ed25519 (EdDSA) and P-256 (ES256) keys are accepted\n",
    )
    result = run("sig", "verify", "--key", str(pub_path), "--body", str(body), "--jws", "a..b")
    assert result.exit_code == 2
    assert "public key: is an RSA key" in result.stderr
