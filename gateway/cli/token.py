"""``c2c-gateway token issue``: a development JWT for the internal API.

Signed with ``api_auth.signing_key`` of the configuration (development only: production
tokens come from the administration's identity provider).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from gateway.api.auth import ALL_SCOPES
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.crypto.keys import load_signing_key
from gateway.crypto.tokens import issue_token, subject_ok
from gateway.errors import ConfigError


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _subject(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not subject_ok(value):
        # the API would refuse the token: it names the caller in the audit log (api:<sub>)
        raise click.BadParameter("must not be empty: it names the caller in the audit log")
    return value


@click.group()
def token() -> None:
    """Internal API tokens (development)."""


@token.command("issue")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("gateway.toml"),
    show_default=True,
)
@click.option(
    "--subject",
    default="dev",
    show_default=True,
    callback=_subject,
    help="The token's sub claim: who calls (audited as api:<subject>).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(ALL_SCOPES),
    help="Repeat for several; default: every scope.",
)
@click.option(
    "--ttl", "ttl_s", type=click.IntRange(1, 30 * 86_400), default=3600, show_default=True
)
def issue(config_path: Path, subject: str, scopes: tuple[str, ...], ttl_s: int) -> None:
    """Print a signed JWT for the internal API to stdout."""
    try:
        config = load_config(config_path)
        auth = config.api_auth
        if auth.signing_key is None:
            raise ConfigError(
                str(config.source), "api_auth.signing_key", "not set: cannot issue tokens here"
            )
        key = load_signing_key(auth.signing_key, party="api", alg=auth.algorithms[0])
    except ConfigError as exc:
        _fail(f"{exc.file}: {exc.key}: {exc.reason}")
    click.echo(
        issue_token(
            key,
            issuer=auth.issuer,
            audience=auth.audience,
            subject=subject,
            scopes=scopes or ALL_SCOPES,
            ttl_s=ttl_s,
            now=SystemClock().now(),
        )
    )
