"""The internal API application: one route table gives the router and each route's access rule."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from gateway.api import audit, schemas
from gateway.api import console_routes as console
from gateway.api.auth import (
    ANY_READER,
    CLAIMS_KEY,
    READERS,
    SCOPE_ADMIN,
    SCOPE_AUDIT,
    SCOPE_QUERY,
    SCOPE_SEND,
    Access,
    Handler,
    bearer_middleware,
)
from gateway.api.documents import get_document
from gateway.api.messages import (
    close_message,
    get_message,
    get_message_body,
    get_receipt_body,
    list_messages,
    post_message,
    retry_message,
)
from gateway.api.openapi import openapi_document
from gateway.api.ops import healthz, metrics, readyz
from gateway.api.problems import json_response, problem, problem_for
from gateway.api.queries import get_query, post_query
from gateway.api.services import SERVICES, ApiServices
from gateway.audit.log import AuditLog
from gateway.crypto.notes import load_note_signer
from gateway.errors import GatewayError
from gateway.model import Direction

log = structlog.get_logger(__name__)

PUBLIC = Access(public=True)
#: messages of either direction; a request naming its ``direction`` needs that direction's
#: readers, and one that does not is answered with the directions its token may read alone
READ = Access(scopes=ANY_READER)
_READ_DIRECTION = {direction.value: Access(scopes=r) for direction, r in READERS.items()}
AUDIT_READ = Access(scopes=frozenset({SCOPE_AUDIT}))
#: what describes the API rather than its data (the schema catalogue): every client needs it
TOKEN = Access(any_scope=True)


@dataclass(frozen=True, kw_only=True)
class Route:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    access: Access


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


ROUTES: tuple[Route, ...] = (
    Route(
        method="POST",
        path="/api/v1/messages",
        handler=post_message,
        access=Access(scopes=frozenset({SCOPE_SEND})),
    ),
    Route(method="GET", path="/api/v1/messages", handler=list_messages, access=READ),
    Route(method="GET", path="/api/v1/messages/{message_id}", handler=get_message, access=READ),
    Route(
        method="GET",
        path="/api/v1/messages/{message_id}/body",
        handler=get_message_body,
        access=READ,
    ),
    Route(
        method="GET",
        path="/api/v1/messages/{message_id}/receipt/body",
        handler=get_receipt_body,
        access=READ,
    ),
    Route(
        method="POST",
        path="/api/v1/messages/{message_id}/retry",
        handler=retry_message,
        access=Access(scopes=frozenset({SCOPE_ADMIN})),
    ),
    Route(
        method="POST",
        path="/api/v1/messages/{message_id}/close",
        handler=close_message,
        access=Access(scopes=frozenset({SCOPE_ADMIN})),
    ),
    Route(
        method="GET",
        path="/api/v1/documents",
        handler=get_document,
        access=Access(scopes=READERS[Direction.INBOUND]),
    ),
    Route(
        method="POST",
        path="/api/v1/queries",
        handler=post_query,
        access=Access(scopes=frozenset({SCOPE_QUERY})),
    ),
    Route(
        method="GET",
        path="/api/v1/queries/{query_id}",
        handler=get_query,
        access=Access(scopes=frozenset({SCOPE_QUERY, SCOPE_ADMIN})),
    ),
    Route(
        method="GET", path="/api/v1/audit/entries", handler=audit.list_entries, access=AUDIT_READ
    ),
    Route(
        method="GET",
        path="/api/v1/audit/checkpoint",
        handler=audit.latest_checkpoint,
        access=AUDIT_READ,
    ),
    Route(
        method="GET",
        path="/api/v1/audit/proofs/inclusion",
        handler=audit.inclusion_proof,
        access=AUDIT_READ,
    ),
    Route(
        method="GET",
        path="/api/v1/audit/proofs/consistency",
        handler=audit.consistency_proof,
        access=AUDIT_READ,
    ),
    Route(method="GET", path="/api/v1/audit/export", handler=audit.export, access=AUDIT_READ),
    Route(
        method="GET",
        path="/api/v1/audit/verify",
        handler=audit.verify,
        access=Access(scopes=frozenset({SCOPE_AUDIT, SCOPE_ADMIN})),
    ),
    Route(method="GET", path=schemas.PREFIX, handler=schemas.schema_index, access=TOKEN),
    Route(
        method="GET",
        path=schemas.PREFIX + "/{message_type}/{schema_version}",
        handler=schemas.get_schema,
        access=TOKEN,
    ),
    Route(method="GET", path="/api/v1/openapi.json", handler=openapi, access=PUBLIC),
    Route(method="GET", path="/console", handler=console.redirect, access=PUBLIC),
    Route(method="GET", path=console.PREFIX, handler=console.page, access=PUBLIC),
    Route(method="GET", path=console.PREFIX + "{name}", handler=console.static, access=PUBLIC),
    Route(method="GET", path="/healthz", handler=healthz, access=PUBLIC),
    Route(method="GET", path="/readyz", handler=readyz, access=PUBLIC),
    Route(method="GET", path="/metrics", handler=metrics, access=PUBLIC),
)

_ACCESS = {(route.method, route.path): route.access for route in ROUTES}


def _access_for(request: web.Request) -> Access | None:
    info = request.match_info
    if info.http_exception is not None:
        return None
    resource = info.route.resource
    if resource is None:
        return None
    access = _ACCESS.get((request.method, resource.canonical))
    if access is READ:
        return _READ_DIRECTION.get(request.query.get("direction", ""), READ)
    return access


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is a problem document; an unexpected fault is logged, never shown."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return problem_for(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem(exc.status, exc.reason, headers=headers)
    except Exception as exc:
        log.exception("api_internal_error", path=request.path, error=type(exc).__name__)
        return problem(500, "internal error; the gateway logged it")


def build_api_app(services: ApiServices) -> web.Application:
    app = web.Application(
        middlewares=[
            problem_middleware,
            bearer_middleware(
                auth=services.config.api_auth,
                keys=services.token_keys,
                clock=services.clock,
                access_for=_access_for,
                metrics=services.metrics,
            ),
        ],
        client_max_size=services.config.largest_body_bytes + 1,
    )
    app[SERVICES] = services
    config = services.config
    app[audit.AUDIT_LOG] = AuditLog(
        services.store,
        signer=load_note_signer(config.audit.key, config.audit.origin),
        clock=services.clock,
    )
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.on_response_prepare.append(_not_kept)
    return app


async def _not_kept(request: web.Request, response: web.StreamResponse) -> None:
    """Messages, audit entries and bundles are enforcement data: no browser or proxy keeps a
    copy (``no-store``); the console's own files say otherwise (``no-cache``). Who was
    answered what is logged (``api_access``: the token's subject, the request, the status),
    so that a data-protection officer can tell who read which message."""
    response.headers.setdefault("Cache-Control", "no-store")
    claims = request.get(CLAIMS_KEY)
    if claims is not None:
        log.info(
            "api_access",
            subject=claims.subject,
            method=request.method,
            path=request.path[:200],
            query=request.query_string[:200] or None,
            status=response.status,
        )
