"""``c2c-gateway sig``: sign a body, or check a detached JWS the way the gateway checks it.

This is the tool a partner's engineer runs when the gateway refuses their signatures, so a
refusal prints the gateway's exact reason, not a generic "invalid signature".
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import click

from gateway.crypto import (
    DEFAULT_TYP,
    KeyRing,
    load_signing_key,
    load_verification_key,
    sign_detached,
    verify_detached,
)
from gateway.crypto.jws import parse_detached, verify_signature
from gateway.crypto.keys import (
    VerificationKey,
    alg_for_key,
    read_private_key,
    read_public_key,
)
from gateway.errors import ConfigError, GatewayError, UnknownKey

# The tool checks one key against one signature; which party owns the key is not in question.
_TOOL_PARTY = "LOCAL"


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _read_body(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"{path}: cannot read body: {exc.strerror or exc}")


@click.group()
def sig() -> None:
    """Sign message bodies and verify detached JWS signatures (PROTOCOL section 3)."""


@sig.command("sign")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Private key, PEM (Ed25519 or P-256).",
)
@click.option(
    "--body",
    "body_path",
    required=True,
    type=click.Path(path_type=Path),
    help="File holding the exact body bytes to sign.",
)
@click.option(
    "--kid", default=None, help="kid to announce (default: the key's RFC 7638 thumbprint)."
)
@click.option("--typ", default=DEFAULT_TYP, show_default=True, help="JWS typ; empty for none.")
@click.option(
    "--alg",
    type=click.Choice(["EdDSA", "ES256"]),
    default=None,
    help="Algorithm (default: the one the key type allows).",
)
def sign_command(
    key_path: Path, body_path: Path, kid: str | None, typ: str, alg: str | None
) -> None:
    """Print the detached compact JWS (header..signature) of BODY."""
    try:
        chosen = alg if alg is not None else alg_for_key(read_private_key(key_path))
        key = load_signing_key(key_path, party=_TOOL_PARTY, alg=chosen)
    except ConfigError as exc:
        _fail(str(exc))
    if kid is not None:
        key = replace(key, kid=kid)
    body = _read_body(body_path)
    click.echo(sign_detached(body, key, typ=typ or None))


@sig.command("verify")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The signer's public key, PEM (SubjectPublicKeyInfo).",
)
@click.option(
    "--body",
    "body_path",
    required=True,
    type=click.Path(path_type=Path),
    help="File holding the exact body bytes that were signed.",
)
@click.option("--jws", required=True, help="The detached JWS (header..signature).")
@click.option(
    "--typ",
    "typs",
    multiple=True,
    default=(DEFAULT_TYP,),
    show_default=True,
    help="Accepted typ (repeatable).",
)
def verify_command(key_path: Path, body_path: Path, jws: str, typs: tuple[str, ...]) -> None:
    """Exit 0 and print OK when JWS verifies over BODY with KEY as a gateway would take it;
    else print why and exit 1 (2: KEY or BODY cannot be read)."""
    try:
        key = load_verification_key(
            key_path, party=_TOOL_PARTY, alg=alg_for_key(read_public_key(key_path))
        )
    except ConfigError as exc:
        _fail(str(exc))
    body = _read_body(body_path)
    try:
        verified = verify_detached(
            jws, body, keyring=KeyRing([key]), party=None, at=None, accepted_typs=typs
        )
    except GatewayError as exc:
        click.echo(f"{exc.code}: {exc.reason}", err=True)
        if isinstance(exc, UnknownKey):
            click.echo(
                f"hint: the kid must be the RFC 7638 thumbprint of the signing key; "
                f"for {key_path} it is {key.kid}",
                err=True,
            )
        elif _holds_without_kid(jws, body, key):
            # a JWS made elsewhere (the RFC examples have no kid): say that only the kid fails
            click.echo(
                f"hint: the signature itself verifies with {key_path}; a gateway still refuses"
                f" it without a kid: set kid to {key.kid}",
                err=True,
            )
        sys.exit(1)
    click.echo(f"OK kid={verified.kid} alg={verified.alg}")


def _holds_without_kid(jws: str, body: bytes, key: VerificationKey) -> bool:
    """Whether ``jws`` has no kid and its signature holds over ``body`` with ``key``."""
    try:
        parsed = parse_detached(jws)
        if parsed.kid is not None:
            return False
        verify_signature(parsed, body, key)
    except GatewayError:
        return False
    return True
