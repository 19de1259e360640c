"""``c2c-gateway demo``: three gateways on loopback exchange every message type (gateway.demo)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import click

from gateway.demo import DemoFailure, run_demo
from gateway.logging import configure_logging


@click.command()
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the gateways' PKI, configuration and databases here (default: a temporary"
    " directory, removed afterwards).",
)
@click.option("--verbose", is_flag=True, help="Show the gateways' logs on stderr.")
def demo(root: Path | None, verbose: bool) -> None:
    """Run US-CBP, MX-ANAM and CA-CBSA gateways and exchange every message type."""
    configure_logging(logging.INFO if verbose else logging.CRITICAL)
    started = time.monotonic()
    try:
        report = asyncio.run(run_demo(root=root, echo=click.echo))
    except DemoFailure as exc:
        click.echo(f"error: demo failed: {exc}", err=True)
        sys.exit(1)
    click.echo("")
    click.echo(report.render())
    elapsed = time.monotonic() - started
    if not report.ok:
        click.echo(f"\ndemo FAILED ({elapsed:.1f} s): see the rows above", err=True)
        sys.exit(1)
    click.echo(f"\nall exchanges receipted and verified, all checks passed ({elapsed:.1f} s)")
