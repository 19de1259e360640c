"""``c2c-gateway send``: submit one outbound message from the operator's seat.

Without ``--api-url`` the message goes straight into the store through the same submission
stages the internal API runs (partner, type, schema, signature, outbox row and audit event in
one transaction), audited with the actor ``cli:<user>``; a running gateway's dispatcher
sends it at its next poll. With ``--api-url`` the running gateway's internal API is used and
the token's subject is the actor.

Exit status: 0 submitted, 1 the message was refused (schema error with its pointer, type not
allowed ...), 2 configuration, store or API unavailable.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from gateway.api.messages import IDEMPOTENCY_HEADER, REPLAYED_HEADER
from gateway.api.requests import UUID_RE
from gateway.cli.api_client import ApiCallError, ApiClient
from gateway.clock import SystemClock
from gateway.config import MAX_BODY_BYTES, load_config
from gateway.envelope import parse_json_strict
from gateway.errors import ConfigError, GatewayError, SchemaInvalid, Unavailable
from gateway.model import Priority
from gateway.outbound.submission import Submission, SubmissionServices, submit_request
from gateway.runtime import load_own_signing_keys
from gateway.schemas.registry import SchemaRegistry
from gateway.store import InvalidStoreUrl, open_store

REFUSED = 1
OPERATOR_ERROR = 2
#: the API answers a submission as soon as it is stored; this only bounds a hung server
API_TIMEOUT_S = 60.0


def fail(message: str, status: int = OPERATOR_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


def refusal_text(exc: GatewayError) -> str:
    """One exact line for a refused message: the NACK code, the pointer of a schema error."""
    if isinstance(exc, SchemaInvalid):
        return f"{exc.code.value} (pointer {exc.pointer!r}): {exc.reason}"
    return f"{exc.code.value}: {exc.reason}"


def read_json_object(path: Path, option: str, *, max_bytes: int) -> dict[str, Any]:
    """A JSON object from a file, parsed as strictly as a partner's message (exit 1 if not)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        fail(f"{option}: {path}: cannot read: {exc.strerror}")
    try:
        document = parse_json_strict(raw, max_bytes=max_bytes)
    except GatewayError as exc:
        fail(f"{option}: {path}: {exc.reason}", REFUSED)
    if not isinstance(document, dict):
        fail(f"{option}: {path}: expected a JSON object", REFUSED)
    return document


def uuid_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not UUID_RE.fullmatch(value):
        raise click.BadParameter(f"{value[:60]!r} is not a lowercase UUID")
    return value


def api_client(api_url: str, token_file: Path | None, ca: Path | None) -> ApiClient:
    if token_file is None:
        fail("--token FILE is required with --api-url")
    try:
        return ApiClient.create(api_url, token_file, ca)
    except ApiCallError as exc:
        fail(exc.message)


def _submit_direct(config_path: Path, submission: Submission) -> tuple[str, str, bool]:
    try:
        config = load_config(config_path)
        signing_keys = load_own_signing_keys(config)
        clock = SystemClock()
        store = open_store(config.store_url, clock=clock, timeout_s=config.limits.store_timeout_s)
    except ConfigError as exc:
        fail(f"{exc.file}: {exc.key}: {exc.reason}")
    except InvalidStoreUrl as exc:
        fail(f"{config_path}: store_url: {exc}")
    services = SubmissionServices(
        config=config,
        registry=SchemaRegistry.load_builtin(),
        signing_keys=signing_keys,
        store=store,
        clock=clock,
    )

    async def run() -> tuple[str, str, bool]:
        await store.open()
        try:
            submitted = await submit_request(services, submission)
        finally:
            await store.close()
        return submitted.record.message_id, submitted.record.state.value, submitted.replayed

    try:
        return asyncio.run(run())
    except Unavailable as exc:
        fail(f"store unavailable: {exc.reason}")
    except GatewayError as exc:
        fail(refusal_text(exc), REFUSED)


def _submit_api(client: ApiClient, submission: Submission) -> tuple[str, str, bool]:
    document: dict[str, Any] = {
        "recipient": submission.recipient,
        "message_type": submission.message_type,
        "payload": submission.payload,
        "priority": submission.priority.value,
    }
    if submission.correlation_id is not None:
        document["correlation_id"] = submission.correlation_id
    if submission.in_reply_to is not None:
        document["in_reply_to"] = submission.in_reply_to
    try:
        headers = {}
        if submission.idempotency_key is not None:
            # A structured-field string, as draft-ietf-httpapi-idempotency-key-header has it.
            headers[IDEMPOTENCY_HEADER] = f'"{submission.idempotency_key}"'
        reply = client.post_with_headers(
            "/api/v1/messages", document, timeout_s=API_TIMEOUT_S, headers=headers
        )
    except ApiCallError as exc:
        fail(exc.message, REFUSED if exc.refused else OPERATOR_ERROR)
    answer = reply.document
    if not isinstance(answer, dict) or not {"message_id", "status"} <= answer.keys():
        fail("the internal API answered without message_id and status")
    replayed = reply.headers.get(REPLAYED_HEADER.lower(), "").lower() == "true"
    return str(answer["message_id"]), str(answer["status"]), replayed


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("gateway.toml"),
    show_default=True,
    help="The gateway's configuration (used when no --api-url is given).",
)
@click.option("--to", "recipient", required=True, help="The partner's party id, e.g. MX-ANAM.")
@click.option("--type", "message_type", required=True, help="message_type, e.g. shipment.status.")
@click.option(
    "--payload",
    "payload_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A JSON file holding the payload object.",
)
@click.option(
    "--correlation-id", callback=uuid_option, help="A UUID tying related messages together."
)
@click.option("--in-reply-to", callback=uuid_option, help="The message_id this message answers.")
@click.option(
    "--priority",
    type=click.Choice([p.value for p in Priority]),
    default=Priority.ROUTINE.value,
    show_default=True,
)
@click.option(
    "--idempotency-key",
    help="A key of yours for this message: running the command again with the same key and"
    " message gives back the message the first run created instead of sending a second one.",
)
@click.option("--api-url", help="Submit through a running gateway's internal API instead.")
@click.option(
    "--token",
    "token_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the API bearer token (with --api-url).",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate of the API's TLS certificate (default: the system's trust store).",
)
def send(
    config_path: Path,
    recipient: str,
    message_type: str,
    payload_path: Path,
    correlation_id: str | None,
    in_reply_to: str | None,
    priority: str,
    idempotency_key: str | None,
    api_url: str | None,
    token_file: Path | None,
    ca: Path | None,
) -> None:
    """Submit an outbound message; prints its message_id and state."""
    client = api_client(api_url, token_file, ca) if api_url is not None else None
    # read up to what any configuration allows: the gateway (this one, or the one behind
    # --api-url) holds the message to its recipient's max_body_bytes
    payload = read_json_object(payload_path, "--payload", max_bytes=MAX_BODY_BYTES)
    submission = Submission(
        recipient=recipient,
        message_type=message_type,
        payload=payload,
        correlation_id=correlation_id,
        in_reply_to=in_reply_to,
        priority=Priority(priority),
        actor=f"cli:{getpass.getuser()}",
        idempotency_key=idempotency_key,
    )
    if client is not None:
        message_id, state, replayed = _submit_api(client, submission)
    else:
        message_id, state, replayed = _submit_direct(config_path, submission)
    if replayed:
        click.echo(
            f"note: --idempotency-key {idempotency_key!r} was already used for this message;"
            " nothing new was sent",
            err=True,
        )
    click.echo(f"{message_id} {state}")
