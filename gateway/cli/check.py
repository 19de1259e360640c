"""``c2c-gateway check``: what a configuration ``serve`` accepts should not have in production.

First the configuration goes through what ``serve`` refuses at start, by ``serve``'s own code:
it is loaded and self-checked, the gateway is built from it (keys, certificates, CRLs,
adapters, the API's token keys, the store URL), our signing keys are asked for one valid
now, and our TLS identity is taken in as it starts (the pair, its validity period). Nothing
is opened, bound or connected: the store, the broker and a listener's address are not tried.

Exit codes: 0 nothing found, 1 something found (each printed), 2 ``serve`` would refuse to
start (the error it would stop with).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from gateway.cli.params import config_option
from gateway.cli.serve import build_gateway
from gateway.deploycheck import deployment_findings
from gateway.errors import ConfigError, GatewayError
from gateway.runtime import Gateway
from gateway.selfcheck import SelfCheckError


async def _as_serve_starts(config_path: Path) -> Gateway:
    """The gateway ``serve`` would build from ``config_path``, taken through the checks its
    start makes in the order it makes them, short of the store, the broker and the
    listeners; the first refusal is raised as ``serve`` raises it."""
    # in the event loop, as serve builds it
    gateway, _ = build_gateway(config_path)
    gateway.check_signing_keys()
    # our certificate in its validity period and a pair with our key: checked when the TLS
    # identity starts, after the store opens, so not by building alone
    await gateway.tls_identity.start()
    await gateway.tls_identity.stop()
    return gateway


@click.command("check")
@config_option
def check(config_path: Path) -> None:
    """Check gateway.toml for production: first what serve would refuse at start (exit 2),
    then the development PKI, no revocation check, the API token signing key, a reserved
    audit origin, partner networks on loopback or wider than a VPN's, passwords inline, open
    key files, a partner with no signing key valid now, the broker's shared default vhost,
    no partners (exit 1)."""
    try:
        gateway = asyncio.run(_as_serve_starts(config_path))
    except (ConfigError, SelfCheckError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (OSError, GatewayError) as exc:
        # what serve would stop at too (an unreadable file past the configuration's checks):
        # not a finding, so not exit 1
        click.echo(f"error: cannot serve: {exc}", err=True)
        sys.exit(2)
    config = gateway.config
    findings = deployment_findings(config, now=gateway.clock.now())
    for finding in findings:
        click.echo(f"  {finding}")
    if findings:
        click.echo(f"{config.source}: {len(findings)} setting(s) not fit for production")
        sys.exit(1)
    click.echo(f"{config.source}: nothing found unfit for production")
