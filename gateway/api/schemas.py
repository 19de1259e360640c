"""Internal API: the message schema catalogue (PROTOCOL.md section 6), for internal systems.

``GET /api/v1/schemas`` lists every message_type/schema_version with its URL here;
``GET /api/v1/schemas/{message_type}/{schema_version}`` answers the JSON Schema a submission's
``payload`` must satisfy: the document and media type the partner endpoint serves at
``/c2c/v1/schemas`` (gateway/transports/https_server.py), which a CBP system's certificate
cannot reach. It describes the API rather than its data, so any valid token reads it.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.api.problems import json_response, problem
from gateway.api.requests import query_fields
from gateway.api.services import SERVICES

PREFIX = "/api/v1/schemas"
SCHEMA_JSON = "application/schema+json"
#: characters of a path segment quoted back in a 404
_QUOTED = 40


async def schema_index(request: web.Request) -> web.Response:
    query_fields(request, frozenset())
    return json_response({"schemas": request.app[SERVICES].registry.index(url_prefix=PREFIX)})


async def get_schema(request: web.Request) -> web.Response:
    query_fields(request, frozenset())
    message_type = request.match_info["message_type"]
    version = request.match_info["schema_version"]
    registry = request.app[SERVICES].registry
    if not registry.is_known(message_type, version):
        return problem(
            404,
            f"no schema for message_type/schema_version {message_type[:_QUOTED]!r}/"
            f"{version[:_QUOTED]!r}; GET {PREFIX} lists the known ones",
        )
    return web.Response(
        body=orjson.dumps(registry.schema(message_type, version)), content_type=SCHEMA_JSON
    )
