"""RFC 9457 problem documents: every refusal of the internal API has one, never a traceback."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import GatewayError, SchemaInvalid

PROBLEM_TYPE = "application/problem+json"


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    document: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if code is not None:
        document["code"] = code
    document.update(extra)
    return web.Response(
        status=status, body=orjson.dumps(document), content_type=PROBLEM_TYPE, headers=headers
    )


def problem_for(exc: GatewayError) -> web.Response:
    """The answer to an internal client for a refusal: the exact reason helps it fix its call."""
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, SchemaInvalid):
        extra["pointer"] = exc.pointer
    return problem(exc.http_status, exc.reason, code=exc.code.value, headers=headers, **extra)


def json_response(
    document: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(document), content_type="application/json", headers=headers
    )
