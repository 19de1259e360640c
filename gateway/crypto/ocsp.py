"""The cryptographic half of OCSP (RFC 6960) for ``gateway.transports.ocsp``: the request's
CertID and the check of an answer's signature."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp


def build_request(cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPRequest:
    """A request for one certificate, without a nonce (answers may be pre-produced and kept).
    The CertID hashes names and keys with SHA-1, the one every responder supports (RFC 5019
    2.1.1); it identifies the certificate, the answer's signature is what is trusted."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
    return builder.build()


def request_der(request: ocsp.OCSPRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.DER)


def cert_key(cert: x509.Certificate) -> bytes:
    """SHA-256 fingerprint: a certificate's key in maps."""
    return cert.fingerprint(hashes.SHA256())


def signed_by(response: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    """Whether ``signer``'s key made the answer's signature."""
    key = signer.public_key()
    data, signature = response.tbs_response_bytes, response.signature
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True
