"""``c2c-gateway query``: ask a partner a question through a running gateway and print its answer.

Uses ``POST /api/v1/queries`` of the gateway's internal API (scope ``c2c:query``): the
gateway sends the query and waits up to ``--timeout`` seconds for the partner's signed
``query.response``.

Exit status: 0 answered (the response is printed as JSON), 1 the query was refused or the
partner rejected it, 2 configuration or API unavailable, 3 no answer in time (the query id
is printed; ``GET /api/v1/queries/<id>`` shows the answer when it comes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from gateway.api.queries import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S
from gateway.cli.api_client import ApiCallError
from gateway.cli.params import FiniteFloatRange
from gateway.cli.send import OPERATOR_ERROR, REFUSED, api_client, fail, read_json_object
from gateway.config import MAX_BODY_BYTES

NO_ANSWER = 3
#: on top of the gateway's own wait: the round trip and the submission itself
_HTTP_MARGIN_S = 30.0


@click.command()
@click.option("--api-url", required=True, help="The running gateway's internal API base URL.")
@click.option(
    "--token",
    "token_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the API bearer token (scope c2c:query).",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate of the API's TLS certificate (default: the system's trust store).",
)
@click.option("--partner", required=True, help="The partner's party id, e.g. MX-ANAM.")
@click.option(
    "--type", "message_type", required=True, help="The query type, e.g. query.shipment_lookup."
)
@click.option(
    "--params",
    "params_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A JSON file holding the query's parameters (its payload).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=FiniteFloatRange(0, MAX_TIMEOUT_S),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds the gateway waits for the answer.",
)
def query(
    api_url: str,
    token_file: Path,
    ca: Path | None,
    partner: str,
    message_type: str,
    params_path: Path,
    timeout_s: float,
) -> None:
    """Send a query and print the partner's query.response (or the query id if none came)."""
    client = api_client(api_url, token_file, ca)
    params = read_json_object(params_path, "--params", max_bytes=MAX_BODY_BYTES)
    document: dict[str, Any] = {
        "partner": partner,
        "message_type": message_type,
        "params": params,
        "timeout_s": timeout_s,
    }
    try:
        status, answer = client.post(
            "/api/v1/queries", document, timeout_s=timeout_s + _HTTP_MARGIN_S
        )
    except ApiCallError as exc:
        fail(exc.message, REFUSED if exc.refused else OPERATOR_ERROR)
    if not isinstance(answer, dict) or "query_id" not in answer:
        fail("the internal API answered without a query_id")
    response = answer.get("response")
    if status == 200 and isinstance(response, dict):
        click.echo(json.dumps(response, indent=2, ensure_ascii=False))
        return
    query_id, state = answer["query_id"], answer.get("state")
    if state in ("rejected", "dead", "closed"):
        fail(f"query {query_id} is {state}: {answer.get('last_error')}", REFUSED)
    click.echo(f"query_id: {query_id}")
    click.echo(
        f"no answer within {timeout_s:g} s (query {state}); "
        f"GET /api/v1/queries/{query_id} shows it when it comes",
        err=True,
    )
    sys.exit(NO_ANSWER)
