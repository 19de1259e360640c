"""The schema catalogue on the internal API, over real TLS with real tokens: what a CBP system
writes a payload against, the same documents partners read on the mutual-TLS endpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from outbound_env import Running, auth, client_ssl, token

Answer = tuple[int, dict[str, str], bytes]


async def from_api(running: Running, path: str, bearer: str | None) -> Answer:
    headers = auth(bearer) if bearer is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            running.api_url + path, headers=headers, ssl=client_ssl(running.config)
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def from_partner_endpoint(running: Running, root: Path, path: str) -> Answer:
    """``path`` read on the partner endpoint as MX-ANAM, with its development certificate."""
    context = client_ssl(running.config)
    pki = root / "pki" / "MX-ANAM"
    context.load_cert_chain(str(pki / "tls.pem"), str(pki / "tls.key"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.get(running.gateway.partner_url + path) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def as_json(answer: Answer) -> Any:
    return orjson.loads(answer[2])


async def test_the_index_lists_every_type_the_registry_knows(us: Running, tmp_path: Path) -> None:
    answer = await from_api(us, "/api/v1/schemas", token(us.config, ("audit:read",)))
    status, headers, _ = answer
    assert status == 200, answer
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    index = as_json(answer)["schemas"]
    registry = us.gateway.registry
    assert [(e["message_type"], e["schema_version"]) for e in index] == registry.types()
    assert {"shipment.status", "receipt", "query.shipment_lookup"} <= {
        e["message_type"] for e in index
    }
    for entry in index:
        assert entry["url"] == (
            f"/api/v1/schemas/{entry['message_type']}/{entry['schema_version']}"
        )
        assert (
            entry["title"]
            == registry.schema(entry["message_type"], entry["schema_version"])["title"]
        )
    # the partner endpoint's index, but for the URLs
    partners = as_json(await from_partner_endpoint(us, tmp_path, "/c2c/v1/schemas"))["schemas"]
    assert [{**e, "url": None} for e in index] == [{**e, "url": None} for e in partners]


async def test_each_schema_is_the_partner_endpoints_bytes(us: Running, tmp_path: Path) -> None:
    bearer = token(us.config, ("c2c:send",))
    index = as_json(await from_api(us, "/api/v1/schemas", bearer))["schemas"]
    assert len(index) == len(us.gateway.registry.types())
    for entry in index:
        status, headers, body = await from_api(us, entry["url"], bearer)
        assert status == 200, (entry, body)
        tail = f"{entry['message_type']}/{entry['schema_version']}"
        p_status, p_headers, p_body = await from_partner_endpoint(
            us, tmp_path, f"/c2c/v1/schemas/{tail}"
        )
        assert p_status == 200
        assert body == p_body, tail
        assert headers["Content-Type"] == p_headers["Content-Type"] == "application/schema+json"
        assert headers["Cache-Control"] == "no-store"
        document = orjson.loads(body)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize(
    "scopes",
    [("audit:read",), ("c2c:receive",), ("admin",), (), ("some:other",)],
    ids=["audit-read", "c2c-receive", "admin", "no-scope", "unknown-scope"],
)
async def test_any_valid_token_reads_the_catalogue(us: Running, scopes: tuple[str, ...]) -> None:
    bearer = token(us.config, scopes)
    for path in ("/api/v1/schemas", "/api/v1/schemas/shipment.status/1.0"):
        status, _, body = await from_api(us, path, bearer)
        assert status == 200, (scopes, path, body)
    status, _, body = await from_api(us, "/api/v1/schemas/shipment.status/1.0", bearer)
    assert orjson.loads(body) == us.gateway.registry.schema("shipment.status", "1.0")


async def test_a_type_or_version_not_known_is_a_404_naming_it(us: Running) -> None:
    bearer = token(us.config, ("audit:read",))
    for tail, named in (
        ("shipment.status/9.9", "'shipment.status'/'9.9'"),
        ("no.such_type/1.0", "'no.such_type'/'1.0'"),
    ):
        answer = await from_api(us, f"/api/v1/schemas/{tail}", bearer)
        status, headers, _ = answer
        assert status == 404, answer
        assert headers["Content-Type"] == "application/problem+json"
        problem = as_json(answer)
        assert (problem["status"], problem["title"]) == (404, "Not Found")
        assert problem["detail"] == (
            f"no schema for message_type/schema_version {named}; GET /api/v1/schemas lists the"
            " known ones"
        )
    status, _, _ = await from_api(us, "/api/v1/schemas/shipment.status", bearer)
    assert status == 404
    answer = await from_api(us, "/api/v1/schemas?type=shipment.status", bearer)
    assert answer[0] == 400
    assert as_json(answer)["detail"].startswith("unknown query parameter(s): type")


async def test_the_catalogue_needs_a_token(us: Running) -> None:
    for path in ("/api/v1/schemas", "/api/v1/schemas/shipment.status/1.0"):
        status, headers, body = await from_api(us, path, None)
        assert status == 401, (path, body)
        assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        assert orjson.loads(body)["detail"] == (
            "missing Authorization header (expected: Bearer <JWT>)"
        )
        status, _, _ = await from_api(us, path, "not-a-jwt")
        assert status == 401, path
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    expired = token(us.config, ("audit:read",), now=an_hour_ago, ttl_s=60)
    status, _, _ = await from_api(us, "/api/v1/schemas", expired)
    assert status == 401


async def test_the_openapi_document_points_payload_at_the_catalogue(us: Running) -> None:
    status, _, body = await from_api(us, "/api/v1/openapi.json", None)
    assert status == 200
    document = orjson.loads(body)
    schemas = document["components"]["schemas"]
    payload = schemas["Submission"]["properties"]["payload"]["description"]
    assert "GET /api/v1/schemas/{message_type}/{schema_version}" in payload
    assert "GET /api/v1/schemas lists" in payload
    for path in ("/api/v1/schemas", "/api/v1/schemas/{message_type}/{schema_version}"):
        operation = document["paths"][path]["get"]
        # any valid token: the bearer scheme, no scope named, and so never a 403
        assert operation["security"] == [{"bearer": []}]
        assert "403" not in operation["responses"]
