"""``c2c-gateway sandbox``: the conformance sandbox of PROTOCOL.md section 8.

It prepares DIR (dev PKI, partner folders, gateway.toml; kept across runs), writes
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
from gateway.crypto.keys import load_signing_key
from gateway.crypto.pki import PkiError
from gateway.crypto.tokens import issue_token
from gateway.devenv import prepare_dev_environment
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
        fail(f"{config.source}: api_auth.signing_key: the sandbox needs the dev token key")
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


def _port(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if not 0 <= value <= 65_535:
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
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, callback=_port, show_default=True, help="Partner endpoint port.")
@click.option("--api-port", default=0, callback=_port, show_default=True, help="Internal API port.")
@click.option("--amqp-url", default=None, help="RabbitMQ URL (and vhost) for the AMQP queues.")
def sandbox(directory: Path, host: str, port: int, api_port: int, amqp_url: str | None) -> None:
    """Serve a US-CBP gateway for conformance tests (PROTOCOL.md section 8)."""
    configure_logging()
    log = structlog.get_logger("gateway.sandbox")
    directory = directory.absolute()
    try:
        config_path = prepare_dev_environment(
            directory, host=host, partner_port=port, api_port=api_port, amqp_url=amqp_url
        )
        write_api_token(load_config(config_path), directory / BEARER_FILE)
    except (ConfigError, PkiError, ValueError) as exc:
        fail(str(exc))
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
