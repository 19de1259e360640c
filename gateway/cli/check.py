"""``c2c-gateway check``: what a configuration ``serve`` accepts should not have in production.

Exit codes: 0 nothing found, 1 something found (each printed), 2 the configuration does not
load (the error ``serve`` would stop with).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gateway.cli.params import config_option
from gateway.config import load_config
from gateway.deploycheck import deployment_findings
from gateway.errors import ConfigError


@click.command("check")
@config_option
def check(config_path: Path) -> None:
    """Check gateway.toml for production: the development PKI, no revocation check, the
    API token signing key, a reserved audit origin, partner networks on loopback or wider
    than a VPN's, passwords inline, open key files."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    findings = deployment_findings(config)
    for finding in findings:
        click.echo(f"  {finding}")
    if findings:
        click.echo(f"{config.source}: {len(findings)} setting(s) not fit for production")
        sys.exit(1)
    click.echo(f"{config.source}: nothing found unfit for production")
