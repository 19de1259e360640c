"""``c2c-gateway messages list|show|versions|retry|close``: the outbox and inbox from the
operator's seat.

``retry`` puts a dead, closed or rejected message back in the queue (same signed bytes),
audited with the actor ``cli:<user>``; a running gateway's dispatcher picks it up at its next
poll. ``close`` ends a dead message that will not be sent again, audited with the actor and
the operator's reason: it is no longer counted as dead, and ``retry`` undoes it.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import NoReturn, TypeVar

import click
import orjson

from gateway.api.documents import version_view
from gateway.api.messages import LIST_STATES, find_messages, several_messages
from gateway.api.requests import UUID_RE
from gateway.clock import SystemClock, format_rfc3339
from gateway.config import GatewayConfig, known_message_types, load_config
from gateway.documents import CANCELLING_FUNCTIONS, DOCUMENT_FIELDS, not_found
from gateway.envelope import parse_timestamp
from gateway.errors import ConfigError, Malformed, Unavailable
from gateway.model import Direction, is_party_id
from gateway.outbound.operator import OperatorRefused, operator_close, operator_retry
from gateway.runtime import load_own_signing_keys
from gateway.store import open_store
from gateway.store.base import MessageFilter, Store
from gateway.store.queries import InvalidCursor

T = TypeVar("T")

_CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("gateway.toml"),
    show_default=True,
    help="The gateway's configuration file.",
)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _with_store(config_path: Path, work: Callable[[GatewayConfig, Store], Awaitable[T]]) -> T:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(f"{exc.file}: {exc.key}: {exc.reason}")

    async def run() -> T:
        store = open_store(
            config.store_url, clock=SystemClock(), timeout_s=config.limits.store_timeout_s
        )
        await store.open()
        try:
            return await work(config, store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except Unavailable as exc:
        _fail(f"store unavailable: {exc.reason}")


def _message_id(value: str) -> str:
    if not UUID_RE.fullmatch(value):
        _fail(f"{value[:60]!r} is not a message id (a lowercase UUID)")
    return value


def _party_filter(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # as the API's filter: anything else matches no message, and an empty table would say
    # "none" where the truth is "mistyped"
    if value is not None and not is_party_id(value):
        raise click.BadParameter(f"{value[:60]!r} is not a party id (CC-AGENCY)")
    return value


def _type_filter(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and value not in known_message_types():
        raise click.BadParameter(
            f"{value[:100]!r} is not a message type this gateway knows (e.g. shipment.manifest)"
        )
    return value


@click.group()
def messages() -> None:
    """List, show, retry and close messages."""


@messages.command("list")
@_CONFIG
@click.option("--direction", type=click.Choice([d.value for d in Direction]))
@click.option("--partner", callback=_party_filter, help="Sender (inbound) or recipient (outbound).")
@click.option("--type", "message_type", callback=_type_filter, help="message_type.")
@click.option(
    "--state",
    type=click.Choice(sorted(LIST_STATES)),
    help="An outbound message's state, or received/delivered for inbound ones.",
)
@click.option("--since", help="RFC 3339 UTC time, e.g. 2026-11-23T00:00:00Z.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--after", help="The cursor printed at the end of the previous page.")
def list_command(
    config_path: Path,
    direction: str | None,
    partner: str | None,
    message_type: str | None,
    state: str | None,
    since: str | None,
    limit: int,
    after: str | None,
) -> None:
    """List messages, newest first."""
    since_at: datetime | None = None
    if since is not None:
        try:
            since_at = parse_timestamp(since, "since")
        except Malformed:
            _fail(f"--since: {since!r} is not an RFC 3339 UTC time")
    filt = MessageFilter(
        direction=Direction(direction) if direction else None,
        partner=partner,
        message_type=message_type,
        state=state,
        since=since_at,
    )

    async def work(config: GatewayConfig, store: Store) -> None:
        try:
            page = await store.list_messages(filt, limit=limit, after=after)
        except InvalidCursor:
            _fail("--after: not a cursor this command printed")
        heading = ("AT", "DIR", "PARTNER", "TYPE", "STATE", "TRIES")
        click.echo("{:<24} {:<8} {:<10} {:<32} {:<13} {:>5}  MESSAGE_ID".format(*heading))
        for item in page.items:
            click.echo(
                f"{format_rfc3339(item.at):<24} {item.direction.value:<8} {item.partner:<10} "
                f"{item.message_type:<32} {item.state:<13} {item.attempts:>5}  {item.message_id}"
            )
        if page.next_cursor is not None:
            click.echo(f"more: --after {page.next_cursor}")

    _with_store(config_path, work)


@messages.command("show")
@_CONFIG
@click.option(
    "--direction",
    type=click.Choice([d.value for d in Direction]),
    help="When the id names several messages.",
)
@click.option(
    "--partner",
    callback=_party_filter,
    help="When the id names several messages: the sender or recipient.",
)
@click.argument("message_id")
def show_command(
    config_path: Path, direction: str | None, partner: str | None, message_id: str
) -> None:
    """Show one message (state, attempts, last error, receipt) as JSON."""
    wanted = _message_id(message_id)

    async def work(config: GatewayConfig, store: Store) -> None:
        views = await find_messages(
            store,
            config.partners,
            wanted,
            direction=Direction(direction) if direction else None,
            partner=partner,
        )
        if not views:
            _fail(f"no message with message_id {wanted}")
        if len(views) > 1:
            _fail(several_messages(wanted, views, narrow="--direction and --partner"))
        click.echo(orjson.dumps(views[0], option=orjson.OPT_INDENT_2).decode())

    _with_store(config_path, work)


@messages.command("versions")
@_CONFIG
@click.option("--partner", required=True, help="The sender, a party id (CC-AGENCY).")
@click.option(
    "--type",
    "message_type",
    required=True,
    type=click.Choice(sorted(DOCUMENT_FIELDS)),
    help="A message type with versions.",
)
@click.option("--ref", required=True, help="The document's reference (its document_ref).")
def versions_command(config_path: Path, partner: str, message_type: str, ref: str) -> None:
    """A partner's filing and its amendments, oldest version first, and the current one
    (the highest version, whatever order they arrived in)."""
    if not is_party_id(partner):
        _fail(f"--partner: {partner[:60]!r} is not a party id (CC-AGENCY)")

    async def work(config: GatewayConfig, store: Store) -> None:
        versions = await store.document_versions(partner, message_type, ref)
        if not versions:
            _fail(not_found(message_type, partner, ref))
        heading = ("VERSION", "FN", "RECEIVED_AT", "STATE")
        click.echo("{:<49} {:<3} {:<24} {:<10} MESSAGE_ID".format(*heading))
        for version in versions:
            view = version_view(version)
            click.echo(
                f"{view['version']:<49} {view['message_function'] or '-':<3} "
                f"{view['received_at']:<24} {view['state']:<10} {view['message_id']}"
            )
        current = versions[-1]
        ended = " (cancelled)" if current.message_function in CANCELLING_FUNCTIONS else ""
        click.echo(f"current: {current.message_id}{ended}")

    _with_store(config_path, work)


@messages.command("retry")
@_CONFIG
@click.option(
    "--reason",
    default=None,
    help="Why it is sent again (a ticket, what was fixed; kept in the audit log; one line).",
)
@click.argument("message_id")
def retry_command(config_path: Path, reason: str | None, message_id: str) -> None:
    """Queue a dead, closed or rejected outbound message again (audited as cli:<user>, with
    the reason given); an expired one is signed again (same message_id and payload,
    created_at now, expires_at its TTL from now)."""
    wanted = _message_id(message_id)
    actor = f"cli:{getpass.getuser()}"

    async def work(config: GatewayConfig, store: Store) -> None:
        try:
            record = await operator_retry(
                store,
                party=config.party,
                message_id=wanted,
                actor=actor,
                now=SystemClock().now(),
                config=config,
                signing_keys=load_own_signing_keys(config),
                why=reason,
            )
        except OperatorRefused as exc:
            _fail(exc.reason)
        click.echo(f"queued again: {record.message_id} (to {record.recipient}, by {actor})")

    _with_store(config_path, work)


@messages.command("close")
@_CONFIG
@click.option(
    "--reason",
    required=True,
    help="Why the message will not be sent again (kept in the audit log; one line).",
)
@click.argument("message_id")
def close_command(config_path: Path, reason: str, message_id: str) -> None:
    """Close a dead outbound message that will not be sent again (its body purged, its partner
    removed): no more attempts, no longer counted as dead, audited as cli:<user> with the
    reason. messages retry queues it again."""
    wanted = _message_id(message_id)
    actor = f"cli:{getpass.getuser()}"

    async def work(config: GatewayConfig, store: Store) -> None:
        try:
            record = await operator_close(
                store,
                party=config.party,
                message_id=wanted,
                actor=actor,
                reason=reason,
                now=SystemClock().now(),
            )
        except OperatorRefused as exc:
            _fail(exc.reason)
        click.echo(f"closed: {record.message_id} (to {record.recipient}, by {actor})")

    _with_store(config_path, work)
