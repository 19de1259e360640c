"""``c2c-gateway pki init``: the development PKI for the gateway party and every partner folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from gateway import DEFAULT_PARTY
from gateway.crypto.keys import ALGORITHMS, Alg
from gateway.crypto.pki import DEFAULT_HOSTS, PkiError, ensure_signing_key_files, init_dev_pki
from gateway.model import is_party_id


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def partner_folders(partners_dir: Path) -> list[str]:
    """Party ids of the partner folders (hidden and ``_`` folders and plain files skipped)."""
    if not partners_dir.is_dir():
        _fail(f"{partners_dir}: partners directory not found (see --partners-dir)")
    ids = []
    for entry in sorted(partners_dir.iterdir()):
        if entry.name.startswith((".", "_")) or not entry.is_dir():
            continue
        if not is_party_id(entry.name):
            _fail(f"{entry}: (folder): folder name {entry.name!r} is not a party id")
        ids.append(entry.name)
    return ids


@click.group()
def pki() -> None:
    """Development PKI (never for production keys)."""


@pki.command("init")
@click.option(
    "--dir",
    "pki_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs/dev"),
    show_default=True,
    help="Where the PKI is written (git-ignored).",
)
@click.option("--party", default=DEFAULT_PARTY, show_default=True, help="This gateway's party id.")
@click.option(
    "--partners-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("partners"),
    show_default=True,
    help="Every folder in it gets keys and a certificate.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    default=DEFAULT_HOSTS,
    show_default=True,
    help="Subject alternative names of the TLS certificates (repeat for several).",
)
@click.option(
    "--alg",
    type=click.Choice(ALGORITHMS),
    default="EdDSA",
    show_default=True,
    help="ES256 also makes a P-256 signing key for every party (P/sign-es256.key, .pub, "
    ".kid), for partners whose sign_with is ES256.",
)
def init_command(
    pki_dir: Path, party: str, partners_dir: Path, hosts: tuple[str, ...], alg: Alg
) -> None:
    """Create the dev CA, TLS certificates (client and server) and Ed25519 signing keys
    (and P-256 ones with --alg ES256).

    Idempotent: existing files are kept, only missing ones are made. Prints what it made.
    """
    if not is_party_id(party):
        _fail(f"--party: {party!r} is not a party id")
    parties = [party, *(p for p in partner_folders(partners_dir) if p != party)]
    try:
        created = init_dev_pki(pki_dir, parties, hosts=hosts, gateway_party=party)
        if alg != "EdDSA":
            for each in parties:
                made = ensure_signing_key_files(pki_dir / each, alg)
                created += [path.relative_to(pki_dir).as_posix() for path in made]
    except (PkiError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or pki_dir}: {exc.strerror or exc}")
    for path in created:
        click.echo(f"created {pki_dir / path}")
    if not created:
        click.echo(f"nothing to do: {pki_dir} is complete for {', '.join(parties)}")
