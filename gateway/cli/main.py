"""The one entry point: ``c2c-gateway``. Each command group lives in its own module."""

from __future__ import annotations

import logging

import click

from gateway import __version__
from gateway.cli.amqp import amqp
from gateway.cli.audit import audit
from gateway.cli.check import check
from gateway.cli.demo import demo
from gateway.cli.keys import keys
from gateway.cli.messages import messages
from gateway.cli.partners import partners
from gateway.cli.pki import pki
from gateway.cli.query import query
from gateway.cli.sandbox import sandbox
from gateway.cli.send import send
from gateway.cli.serve import serve
from gateway.cli.sig import sig
from gateway.cli.store import store
from gateway.cli.token import token
from gateway.logging import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="c2c-gateway")
def cli() -> None:
    """Cross-border customs data-exchange gateway."""
    # commands print their results on stdout; logs (warnings and worse) go to stderr.
    # serve, sandbox and demo configure their own level.
    configure_logging(logging.WARNING, cache=False)


cli.add_command(sig)
cli.add_command(amqp)
cli.add_command(pki)
cli.add_command(serve)
cli.add_command(sandbox)
cli.add_command(partners)
cli.add_command(audit)
cli.add_command(messages)
cli.add_command(token)
cli.add_command(demo)
cli.add_command(keys)
cli.add_command(send)
cli.add_command(query)
cli.add_command(store)
cli.add_command(check)


def main() -> None:
    cli()
