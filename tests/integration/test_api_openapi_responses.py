"""Real answers of the internal API, over TLS, checked against its served OpenAPI document.

Every answer's status must be documented for its operation, its media type declared, its
required headers present and its JSON valid against the declared schema, with formats
asserted. The schemas leave ``additionalProperties`` open (a client must accept members added
later), so the check closes every object schema that lists properties: a member a view emits
that the document does not declare fails here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
from https_env import wait_relayed
from inbound_records import sample_record
from outbound_env import (
    RETRYING_OUTBOX,
    Running,
    auth,
    client_ssl,
    free_port,
    gateway_config,
    post_as_partner,
    row_until,
    start_gateway,
    token,
)
from partner_stub import PartnerStub

from gateway.api.audit import MAX_EXPORT_MESSAGES
from gateway.api.audit import MAX_PAGE as AUDIT_MAX_PAGE
from gateway.api.messages import DEFAULT_PAGE, MAX_PAGE
from gateway.envelope import encode_envelope, new_message_id
from gateway.model import Header
from gateway.store.base import OutboundState

US, MX = "US-CBP", "MX-ANAM"
#: headers of the API's own that a client acts on: where they are sent, they are declared
MEANINGFUL_HEADERS = frozenset({"Location", "C2C-Signature", "Idempotent-Replayed", "Retry-After"})


def closed(node: Any) -> Any:
    """``node`` with ``additionalProperties: false`` on every object schema listing properties
    and saying nothing of others."""
    if isinstance(node, list):
        return [closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: closed(value) for key, value in node.items()}
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@dataclass
class Api:
    running: Running
    document: dict[str, Any]

    def validator(self, schema: dict[str, Any]) -> jsonschema_rs.Draft202012Validator:
        components = closed(copy.deepcopy(self.document["components"]))
        return jsonschema_rs.Draft202012Validator(
            {**closed(schema), "components": components}, validate_formats=True
        )

    async def call(
        self,
        method: str,
        template: str,
        path: str | None = None,
        *,
        scopes: tuple[str, ...] = ("admin", "c2c:send", "c2c:query", "c2c:receive", "audit:read"),
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        expect: int | None = None,
    ) -> Any:
        """Call ``path`` (default ``template``) and check the answer against ``template``'s
        operation in the document; returns the JSON answer (or the bytes)."""
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                self.running.api_url + (path or template),
                json=json_body,
                headers={**auth(token(self.running.config, scopes)), **(headers or {})},
                ssl=client_ssl(self.running.config),
            ) as response,
        ):
            body = await response.read()
            status, got_headers = response.status, response.headers
        where = f"{method} {path or template} -> {status}"
        if expect is not None:
            assert status == expect, (where, body)
        operation = self.document["paths"][template][method.lower()]
        assert str(status) in operation["responses"], f"{where}: status not documented"
        spec = operation["responses"][str(status)]
        for name, header in spec.get("headers", {}).items():
            if header.get("required"):
                assert name in got_headers, f"{where}: required header {name} missing"
        for name in MEANINGFUL_HEADERS & set(got_headers):
            assert name in spec.get("headers", {}), f"{where}: header {name} not declared"
        media = got_headers["Content-Type"].split(";")[0].strip()
        content = spec.get("content", {})
        declared = content.get(media, content.get("*/*"))
        assert declared is not None, f"{where}: {media} not declared ({sorted(content)})"
        # a JSON document (application/json, a +json type), not JSON Lines (x-ndjson)
        if media != "application/json" and not media.endswith("+json"):
            return body
        answer = json.loads(body)
        errors = [str(e) for e in self.validator(declared["schema"]).iter_errors(answer)]
        assert errors == [], f"{where}: {errors}\n{json.dumps(answer, indent=2)[:3000]}"
        return answer


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """US-CBP sending to an MX-ANAM stub that acknowledges the first message and answers 503
    to every later one (they stay queued); its OpenAPI document fetched."""
    port = free_port()
    config = gateway_config(
        tmp_path, US, peers={MX: f"https://127.0.0.1:{port}"}, outbox=RETRYING_OUTBOX
    )
    stub = PartnerStub(pki=tmp_path / "pki", behaviours=["ack", "503"])
    await stub.start(port)
    running = await start_gateway(config)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                running.api_url + "/api/v1/openapi.json", ssl=client_ssl(running.config)
            ) as response,
        ):
            document = await response.json()
        yield Api(running, document)
    finally:
        await running.gateway.stop()
        await stub.stop()


async def post_as_mx(running: Running, root: Path, message_type: str) -> str:
    """An MX-ANAM message of ``message_type`` over mTLS; its id."""
    registry = running.gateway.registry
    message_id = new_message_id()
    now = datetime.now(UTC)
    header = Header(
        message_id=message_id,
        message_type=message_type,
        schema_version="1.0",
        sender=MX,
        recipient=US,
        created_at=now,
        expires_at=now + timedelta(days=1),
        correlation_id=new_message_id(),
    )
    body = encode_envelope(header, registry.examples(message_type, "1.0")[0])
    status, answer, _ = await post_as_partner(running, root, body)
    assert status == 202, answer
    return message_id


MESSAGE = "/api/v1/messages/{message_id}"


async def test_every_answer_of_the_message_and_query_routes_is_documented(
    api: Api, tmp_path: Path
) -> None:
    running = api.running
    store = running.gateway.store
    payload = running.gateway.registry.examples("shipment.status", "1.0")[0]
    submission = {"recipient": MX, "message_type": "shipment.status", "payload": payload}
    accepted = await api.call(
        "POST", "/api/v1/messages", json_body=submission, headers={"Idempotency-Key": "k1"}
    )
    ours = accepted["message_id"]
    replayed = await api.call(
        "POST", "/api/v1/messages", json_body=submission, headers={"Idempotency-Key": "k1"}
    )
    assert replayed["message_id"] == ours
    running.dispatcher.wake()
    await row_until(store, ours, lambda r: r.state is OutboundState.ACKNOWLEDGED)
    view = await api.call("GET", MESSAGE, f"/api/v1/messages/{ours}", expect=200)
    assert view["receipt"] is not None
    # the check itself: a member the document does not declare is refused
    operation = api.document["paths"][MESSAGE]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert not api.validator(schema).is_valid({**view, "undeclared": 1})

    # still queued, with its next attempt: MX-ANAM's endpoint answers 503 from now on
    urgent = await api.call(
        "POST", "/api/v1/messages", json_body={**submission, "priority": "urgent", "ttl_s": 600}
    )
    view = await api.call("GET", MESSAGE, f"/api/v1/messages/{urgent['message_id']}", expect=200)
    assert view["next_attempt_at"] is not None

    advance = await post_as_mx(running, tmp_path, "shipment.advance_data")
    status = await post_as_mx(running, tmp_path, "shipment.status")
    await wait_relayed(store)
    view = await api.call("GET", MESSAGE, f"/api/v1/messages/{status}", expect=200)
    assert (view["direction"], view["document_ref"]) == ("inbound", None)
    view = await api.call("GET", MESSAGE, f"/api/v1/messages/{advance}", expect=200)
    ref = view["document_ref"]
    assert isinstance(ref, str)
    documents = f"/api/v1/documents?partner={MX}&type=shipment.advance_data&ref={ref}"
    await api.call("GET", "/api/v1/documents", documents, expect=200)
    page = await api.call("GET", "/api/v1/messages", "/api/v1/messages?limit=2", expect=200)
    assert page["next_cursor"] is not None
    await api.call("GET", "/api/v1/messages", expect=200)

    # the exact bytes, and the problems
    for tail in ("body", "receipt/body"):
        for message_id in (ours, advance):
            await api.call(
                "GET", f"{MESSAGE}/{tail}", f"/api/v1/messages/{message_id}/{tail}", expect=200
            )
    missing = "01890000-0000-7000-8000-000000000000"
    await api.call("GET", f"{MESSAGE}/body", f"/api/v1/messages/{missing}/body", expect=404)
    queued = urgent["message_id"]
    await api.call(
        "GET", f"{MESSAGE}/receipt/body", f"/api/v1/messages/{queued}/receipt/body", expect=404
    )
    assert await store.purge_bodies(datetime.now(UTC) + timedelta(days=1)) >= 1
    await api.call("GET", f"{MESSAGE}/body", f"/api/v1/messages/{ours}/body", expect=410)
    await api.call("GET", MESSAGE, f"/api/v1/messages/{missing}", expect=404)
    await api.call("GET", MESSAGE, "/api/v1/messages/not-a-uuid", expect=400)
    await api.call(
        "GET",
        MESSAGE,
        f"/api/v1/messages/{ours}?direction=inbound",
        scopes=("c2c:send",),
        expect=403,
    )
    await api.call("POST", f"{MESSAGE}/retry", f"/api/v1/messages/{queued}/retry", expect=409)
    close, reason = f"{MESSAGE}/close", {"reason": "its body was purged"}
    await api.call("POST", close, f"/api/v1/messages/{queued}/close", json_body=reason, expect=409)
    await api.call("POST", close, f"/api/v1/messages/{missing}/close", json_body=reason, expect=404)
    await api.call("POST", close, f"/api/v1/messages/{queued}/close", json_body={}, expect=400)
    dying = await api.call("POST", "/api/v1/messages", json_body={**submission, "ttl_s": 1})
    await row_until(store, dying["message_id"], lambda r: r.state is OutboundState.DEAD)
    path = f"/api/v1/messages/{dying['message_id']}/close"
    closed = await api.call("POST", close, path, json_body=reason, expect=200)
    assert closed["status"] == "closed"
    bad = {**submission, "payload": {**payload, "status": 7}}
    problem = await api.call("POST", "/api/v1/messages", json_body=bad, expect=400)
    assert "pointer" in problem

    query = {
        "partner": MX,
        "message_type": "query.shipment_lookup",
        "params": running.gateway.registry.examples("query.shipment_lookup", "1.0")[0],
        "timeout_s": 0,
    }
    asked = await api.call("POST", "/api/v1/queries", json_body=query, expect=202)
    path = f"/api/v1/queries/{asked['query_id']}"
    await api.call("GET", "/api/v1/queries/{query_id}", path, expect=200)
    answer = dataclasses.replace(
        sample_record(sender=MX), message_type="query.response", in_reply_to=asked["query_id"]
    )
    await store.store_inbound(answer, [])
    answered = await api.call("GET", "/api/v1/queries/{query_id}", path, expect=200)
    assert answered["state"] == "answered"
    await api.call("GET", "/api/v1/audit/entries", "/api/v1/audit/entries?limit=5", expect=200)
    await api.call("GET", "/readyz", expect=200)


async def test_the_documented_page_sizes_are_the_codes(api: Api) -> None:
    def limit(path: str) -> dict[str, Any]:
        [parameter] = [
            p for p in api.document["paths"][path]["get"]["parameters"] if p["name"] == "limit"
        ]
        schema: dict[str, Any] = parameter["schema"]
        return schema

    assert limit("/api/v1/messages") == {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_PAGE,
        "default": DEFAULT_PAGE,
    }
    # gateway/api/audit.py: ``fields.decimal("limit", low=1, high=MAX_PAGE) or 100``
    assert limit("/api/v1/audit/entries") == {
        "type": "integer",
        "minimum": 1,
        "maximum": AUDIT_MAX_PAGE,
        "default": 100,
    }


async def test_the_schema_catalogue_and_a_message_export_answer_as_documented(
    api: Api, tmp_path: Path
) -> None:
    index = await api.call("GET", "/api/v1/schemas", scopes=("audit:read",), expect=200)
    schema = "/api/v1/schemas/{message_type}/{schema_version}"
    for entry in index["schemas"]:
        await api.call("GET", schema, entry["url"], scopes=("c2c:send",), expect=200)
    await api.call("GET", schema, "/api/v1/schemas/shipment.status/9.9", expect=404)
    await api.call("GET", schema, "/api/v1/schemas/shipment.status/1.0?x=1", expect=400)
    await api.call("GET", "/api/v1/schemas", "/api/v1/schemas?x=1", expect=400)
    await api.call("GET", "/api/v1/schemas", headers={"Authorization": "Bearer x"}, expect=401)

    received = await post_as_mx(api.running, tmp_path, "shipment.advance_data")
    export = "/api/v1/audit/export"
    await api.call("GET", export, f"{export}?message_id={received}", expect=200)
    await api.call("GET", export, f"{export}?message_id={received.upper()}", expect=400)
    [parameter] = [
        p for p in api.document["paths"][export]["get"]["parameters"] if p["name"] == "message_id"
    ]
    assert parameter["schema"]["maxItems"] == MAX_EXPORT_MESSAGES
