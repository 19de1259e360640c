"""A partner administration whose client certificates come from an intermediate CA under its
root. Its partner file's ``https.ca`` holds the root and the issuing intermediate; with the
root alone, the chain verifies but the certificate identifies no partner, and the refusal says
which issuer to add."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from https_env import MX, Env, make_message, rejections, running_gateway

from gateway.crypto.jws import sign_detached
from gateway.errors import NackCode

NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    issuer_name = issuer[0].subject if issuer else _name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def mx_pki(root: Path, *, list_intermediate: bool) -> None:
    """MX-ANAM gets its own root and an issuing intermediate, named in its partner file."""
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root_cert = _issue("ANAM Root CA", root_key, None, ca=True)
    inter_cert = _issue("ANAM Issuing CA 1", inter_key, (root_cert, root_key), ca=True)
    leaf_cert = _issue(MX, leaf_key, (inter_cert, inter_key), ca=False)
    folder = root / "anam-pki"
    folder.mkdir()
    anchors = (root_cert, inter_cert) if list_intermediate else (root_cert,)
    (folder / "ca.pem").write_bytes(_pem(*anchors))
    (folder / "chain.pem").write_bytes(_pem(leaf_cert, inter_cert))
    (folder / "leaf-only.pem").write_bytes(_pem(leaf_cert))
    (folder / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    partner = root / "partners" / MX / "partner.toml"
    text = partner.read_text(encoding="utf-8")
    assert 'ca = "../../pki/ca.pem"' in text
    partner.write_text(text.replace('ca = "../../pki/ca.pem"', 'ca = "../../anam-pki/ca.pem"'))


async def post_as_anam(env: Env, cert_file: str) -> int:
    client = ssl.create_default_context(cafile=str(env.root / "pki" / "ca.pem"))
    folder = env.root / "anam-pki"
    client.load_cert_chain(str(folder / cert_file), str(folder / "leaf.key"))
    _, body = make_message(env)
    headers = {
        "Content-Type": "application/json",
        "C2C-Signature": sign_detached(body, env.keys[MX]),
    }
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as session,
        session.post(env.url, data=body, headers=headers) as response,
    ):
        return response.status


async def test_certificates_of_a_listed_intermediate_ca_identify_the_partner(
    tmp_path: Path,
) -> None:
    async with running_gateway(
        tmp_path, prepare=lambda root: mx_pki(root, list_intermediate=True)
    ) as env:
        assert await post_as_anam(env, "chain.pem") == 202
        # The intermediate is a trust anchor here, so a client sending its leaf alone passes.
        assert await post_as_anam(env, "leaf-only.pem") == 202


async def test_an_unlisted_intermediate_is_named_in_the_refusal(tmp_path: Path) -> None:
    async with running_gateway(
        tmp_path, prepare=lambda root: mx_pki(root, list_intermediate=False)
    ) as env:
        assert await post_as_anam(env, "chain.pem") == 403
        [entry] = await rejections(env, NackCode.SENDER_MISMATCH)
        assert entry["reason"].endswith(
            "(CN 'MX-ANAM') matches partner MX-ANAM, but its issuer 'CN=ANAM Issuing CA 1' is"
            " not in that partner's https.ca file (list an issuing intermediate CA there)"
        )
        # Without the intermediate the chain cannot be built: refused at the handshake.
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await post_as_anam(env, "leaf-only.pem")
