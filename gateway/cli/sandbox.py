"""``c2c-gateway sandbox``: the conformance sandbox of PROTOCOL.md section 8.

It prepares DIR (dev PKI, partner folders, gateway.toml; kept across runs, and a
configuration file someone else wrote or changed is served as it is: gateway.devenv), writes
``DIR/api.token`` (a JWT with every internal-API scope), serves the US-CBP gateway, prints
exactly one JSON ready line to stdout with the resolved URLs, logs to stderr, and stops
cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
import orjson
import structlog

from gateway import DEFAULT_PARTY
from gateway.api.auth import ALL_SCOPES
from gateway.cli.serve import build_gateway, fail, run
from gateway.config import GatewayConfig, load_config
from gateway.crypto.keys import ALGORITHMS, Alg, load_signing_key
from gateway.crypto.pki import PkiError
from gateway.crypto.tokens import issue_token
from gateway.devenv import DEFAULT_HOST, KEPT_HINT, make_dev_environment
from gateway.errors import ConfigError
from gateway.logging import configure_logging
from gateway.runtime import Gateway

BEARER_FILE = "api.token"
#: long enough for a partner's test campaign; the token is rewritten at every start
TOKEN_TTL_S = 30 * 86_400


def write_api_token(config: GatewayConfig, path: Path) -> None:
    """A JWT for the internal API with every scope, signed with the dev token key."""
    auth = config.api_auth
    if auth.signing_key is None:
        fail(
            f"{config.source}: api_auth.signing_key: the sandbox needs the key that signs "
            f"{BEARER_FILE}: add it, or remove the file to let the sandbox write its own"
        )
    key = load_signing_key(auth.signing_key, party=config.party, alg=auth.algorithms[0])
    token = issue_token(
        key,
        issuer=auth.issuer,
        audience=auth.audience,
        subject="sandbox",
        scopes=ALL_SCOPES,
        ttl_s=TOKEN_TTL_S,
        now=datetime.now(UTC),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(token + "\n")


def _port(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 65_535:
        raise click.BadParameter(f"{value} is not a TCP port (0 picks a free one)")
    return value


@click.command("sandbox")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where the PKI, configuration, token and database live (created if absent).",
)
@click.option("--host", help=f"Address to listen on.  [default: {DEFAULT_HOST}]")
@click.option("--port", type=int, callback=_port, help="Partner endpoint port.  [default: 0]")
@click.option("--api-port", type=int, callback=_port, help="Internal API port.  [default: 0]")
@click.option("--amqp-url", default=None, help="RabbitMQ URL (and vhost) for the AMQP queues.")
@click.option(
    "--alg",
    type=click.Choice(ALGORITHMS),
    default=None,
    help="Algorithm the partners sign with and the gateway signs toward them: ES256 adds "
    "P-256 keys (DIR/P/sign-es256.key, .pub, .kid) for every party.  [default: EdDSA]",
)
def sandbox(
    directory: Path,
    host: str | None,
    port: int | None,
    api_port: int | None,
    amqp_url: str | None,
    alg: Alg | None,
) -> None:
    """Serve a US-CBP gateway for conformance tests (PROTOCOL.md section 8).

    A DIR/gateway.toml or partner file the sandbox did not write, or that was changed since
    (by `keys rotate`, say), is served as it is: the options given must then agree with it.
    """
    configure_logging()
    log = structlog.get_logger("gateway.sandbox")
    directory = directory.absolute()
    try:
        env = make_dev_environment(
            directory,
            host=host,
            partner_port=port,
            api_port=api_port,
            amqp_url=amqp_url,
            alg=alg,
        )
        config_path = env.config_path
        for path in env.kept:
            log.warning("sandbox_file_kept", file=str(path), detail=KEPT_HINT)
        write_api_token(load_config(config_path), directory / BEARER_FILE)
    except (ConfigError, PkiError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or directory}: {exc.strerror or exc}")
    audit_pub = directory / DEFAULT_PARTY / "audit.pub"
    if not audit_pub.is_file():
        fail(f"{audit_pub}: the audit public key is missing")

    def build() -> tuple[Gateway, Callable[[], None]]:
        gateway, api = build_gateway(config_path)

        def ready() -> None:
            line = {
                "ready": True,
                "party": gateway.config.party,
                "partner_url": gateway.partner_url,
                "api_url": api.url,
                "dir": str(directory),
            }
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()
            log.info("sandbox_ready", **line)

        return gateway, ready

    run(build)
