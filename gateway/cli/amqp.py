"""``c2c-gateway amqp setup``: the RabbitMQ vhost, users and permissions the gateway expects.

The broker is administered with ``rabbitmqctl`` (present wherever RabbitMQ runs; the management
plugin is not assumed). The vhost and the gateway's user come from ``[amqp] url``; each partner
with ``[amqp] enabled`` gets its ``broker_user``, allowed to publish only to its own inbound
exchange ``c2c.partner.<id>.in`` and to read only its own ``c2c.partner.<id>.out`` queue.
A new user's password is generated and written to a file (mode 0600), never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlsplit

import click

from gateway.config import GatewayConfig, PartnerConfig, load_config
from gateway.errors import ConfigError, Unavailable
from gateway.store.sqlite import make_private_folder
from gateway.transports.amqp import AmqpBroker, partner_in_queue, partner_out_queue

#: RabbitMQ user names we create: plain, so they are safe in a file name and a log line
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@dataclass(frozen=True, kw_only=True)
class Permissions:
    configure: str
    write: str
    read: str


def gateway_permissions() -> Permissions:
    # The gateway declares and uses every c2c.* resource and publishes to partners' .out
    # queues through the default exchange.
    return Permissions(configure=r"^c2c\..*$", write=r"^(c2c\..*|amq\.default)$", read=r"^c2c\..*$")


def partner_permissions(partner_id: str) -> Permissions:
    return Permissions(
        configure="^$",
        write=f"^{re.escape(partner_in_queue(partner_id))}$",
        read=f"^{re.escape(partner_out_queue(partner_id))}$",
    )


class Rabbitmqctl:
    def __init__(self, executable: str) -> None:
        found = shutil.which(executable)
        if found is None:
            _fail(f"--rabbitmqctl: {executable!r} not found (run setup where RabbitMQ runs)")
        self._exe = found

    def run(self, *args: str, stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [self._exe, "-q", *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _fail(f"rabbitmqctl {args[0]}: {exc}")
        if done.returncode != 0:
            _fail(f"rabbitmqctl {args[0]}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def names(self, *args: str, key: str) -> set[str]:
        rows = json.loads(self.run(*args, "--formatter", "json") or "[]")
        return {str(row[key]) for row in rows}


@click.group()
def amqp() -> None:
    """RabbitMQ administration for the gateway."""


@amqp.command("setup")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="gateway.toml; its [amqp] url names the vhost and the gateway's user.",
)
@click.option(
    "--secrets-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where new users' passwords are written [default: var/amqp-users next to the config].",
)
@click.option(
    "--rabbitmqctl",
    "rabbitmqctl_exe",
    default="rabbitmqctl",
    show_default=True,
    help="The rabbitmqctl executable.",
)
@click.option(
    "--declare/--no-declare",
    default=True,
    show_default=True,
    help="Also declare the exchanges and queues, so partners can publish before the gateway runs.",
)
def setup_command(
    config_path: Path, secrets_dir: Path | None, rabbitmqctl_exe: str, declare: bool
) -> None:
    """Create the vhost, the gateway's and every AMQP partner's user, and their permissions.

    Idempotent: what exists is kept (passwords are never changed), permissions are (re)set.
    Prints what it did.
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    url = config.amqp.url
    if url is None:
        _fail(f"{config.source}: amqp.url: not set; setup needs the broker URL (with its vhost)")
    vhost, gateway_user, gateway_password = _parse_url(config, url)
    partners = _amqp_partners(config, gateway_user)
    ctl = Rabbitmqctl(rabbitmqctl_exe)
    secrets_dir = secrets_dir or config.source.parent / "var" / "amqp-users"

    if vhost in ctl.names("list_vhosts", "name", key="name"):
        click.echo(f"vhost {vhost} exists")
    else:
        ctl.run("add_vhost", vhost)
        click.echo(f"created vhost {vhost}")

    users = ctl.names("list_users", key="user")
    if gateway_user in users:
        click.echo(f"user {gateway_user} exists (password unchanged)")
    else:
        if not gateway_password:
            _fail(
                f"{config.source}: amqp.url: user {gateway_user!r} is new and the URL"
                " has no password"
            )
        ctl.run("add_user", gateway_user, stdin=gateway_password + "\n")
        click.echo(f"created user {gateway_user} (password from amqp.url)")
    _set_permissions(ctl, vhost, gateway_user, gateway_permissions())

    for partner in partners:
        user = partner.amqp.broker_user
        assert user is not None
        if user in users:
            click.echo(f"user {user} exists (password unchanged)")
        else:
            path = _password_file(secrets_dir, user)
            ctl.run("add_user", user, stdin=path.read_text("utf-8").strip() + "\n")
            click.echo(f"created user {user} for {partner.id} (password in {path})")
        _set_permissions(ctl, vhost, user, partner_permissions(partner.id))

    _set_dead_letter_policy(ctl, vhost)

    if declare:
        try:
            asyncio.run(_declare(config, [p.id for p in partners]))
        except Unavailable as exc:
            _fail(exc.reason)
        for partner in partners:
            click.echo(
                f"declared {partner_in_queue(partner.id)} (exchange and quorum queue), "
                f"{partner_out_queue(partner.id)}"
            )
        click.echo("declared c2c.inbound, c2c.submit, c2c.dlx and the dead-letter queues")


def _parse_url(config: GatewayConfig, url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    where = f"{config.source}: amqp.url"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    # RabbitMQ's URI spec: an absent path is the default vhost "/".
    vhost = unquote(path) if path else "/"
    user = unquote(parts.username or "")
    if not user:
        _fail(f"{where}: no user in the URL")
    return vhost, user, unquote(parts.password or "")


def _amqp_partners(config: GatewayConfig, gateway_user: str) -> list[PartnerConfig]:
    partners = []
    for partner in sorted(config.partners.values(), key=lambda p: p.id):
        if not partner.amqp.enabled:
            continue
        where = f"{partner.directory / 'partner.toml'}: amqp.broker_user"
        user = partner.amqp.broker_user
        if user is None:
            _fail(f"{where}: required when amqp.enabled (the partner's RabbitMQ user)")
        if not _USER_RE.fullmatch(user):
            _fail(f"{where}: {user!r} is not a plain user name ([A-Za-z0-9._@-], max 64)")
        if user == gateway_user:
            _fail(f"{where}: {user!r} is the gateway's own user; a partner needs its own")
        partners.append(partner)
    return partners


def _password_file(secrets_dir: Path, user: str) -> Path:
    """The user's password file; made with a fresh random password unless it exists."""
    path = secrets_dir / f"{user}.password"
    try:
        make_private_folder(secrets_dir)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # An earlier run made the file but not the user (it failed in between): reuse it.
        return path
    except OSError as exc:
        _fail(f"{exc.filename or path}: {exc.strerror or exc}")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(24) + "\n")
    return path


def _set_permissions(ctl: Rabbitmqctl, vhost: str, user: str, perms: Permissions) -> None:
    ctl.run("set_permissions", "-p", vhost, user, perms.configure, perms.write, perms.read)
    click.echo(
        f"set permissions of {user} on {vhost}: configure={perms.configure} "
        f"write={perms.write} read={perms.read}"
    )


#: RabbitMQ 4.0 gives a quorum queue declared without ``x-delivery-limit`` a limit of 20
#: returns, after which a message is dropped (a dead-letter queue has no dead-letter exchange
#: of its own): a replay tool that nacks, or a peek in the management UI, would lose what the
#: gateway dead-lettered. The ``.dead`` queues cannot take the argument now (a queue declared
#: again with other arguments is refused PRECONDITION_FAILED), and ``-1`` (no limit on 4.x)
#: drops a message at its first return on 3.x, so a policy sets a limit no replay reaches.
#: ``queues``, not ``quorum_queues``, which RabbitMQ before 3.12 does not know.
DEAD_LETTER_POLICY = "c2c-dead-letter-queues"
DEAD_LETTER_PATTERN = r"^c2c\..*\.dead$"
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000


def _set_dead_letter_policy(ctl: Rabbitmqctl, vhost: str) -> None:
    definition = json.dumps({"delivery-limit": DEAD_LETTER_DELIVERY_LIMIT})
    ctl.run(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "--priority",
        "0",
        DEAD_LETTER_POLICY,
        DEAD_LETTER_PATTERN,
        definition,
    )
    click.echo(
        f"set policy {DEAD_LETTER_POLICY} on {vhost}: the dead-letter queues keep a message"
        f" through {DEAD_LETTER_DELIVERY_LIMIT:,} returns"
    )


async def _declare(config: GatewayConfig, partner_ids: Sequence[str]) -> None:
    broker = AmqpBroker(config.amqp, connection_name="c2c-gateway-setup")
    await broker.connect()
    try:
        await broker.declare_topology(partner_ids)
    finally:
        await broker.close()
