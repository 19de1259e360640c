"""The OpenAPI 3.1 document of the internal API, served at ``/api/v1/openapi.json``.

A test compares its paths and methods with the app's router, so the two cannot drift.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.api.auth import SCOPE_ADMIN, SCOPE_QUERY, SCOPE_SEND

_UUID = {"type": "string", "format": "uuid", "pattern": "^[0-9a-f-]{36}$"}
_PARTY = {"type": "string", "pattern": "^[A-Z]{2}-[A-Z0-9]{2,16}$"}
_TIME = {"type": "string", "format": "date-time"}
_READ_SCOPES = [SCOPE_SEND, SCOPE_QUERY, SCOPE_ADMIN]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _security(scopes: list[str]) -> list[dict[str, list[str]]]:
    # OpenAPI lists alternatives: any one of the scopes is enough.
    return [{"bearer": [scope]} for scope in scopes]


_AUTH_ERRORS = {
    "401": _problem("Missing, invalid or expired bearer token"),
    "403": _problem("The token lacks the scope this operation needs"),
}

_MESSAGE_ID_PARAM = {
    "name": "message_id",
    "in": "path",
    "required": True,
    "schema": _UUID,
}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string", "description": "PROTOCOL.md NACK code, when one applies"},
            "pointer": {"type": "string", "description": "JSON pointer of a schema error"},
        },
    },
    "Submission": {
        "type": "object",
        "additionalProperties": False,
        "required": ["recipient", "message_type", "payload"],
        "properties": {
            "recipient": _PARTY,
            "message_type": {"type": "string", "maxLength": 100},
            "schema_version": {"type": "string", "default": "1.0", "maxLength": 20},
            "payload": {
                "type": "object",
                "description": "Must satisfy the schema of message_type/schema_version",
            },
            "correlation_id": _UUID,
            "in_reply_to": _UUID,
            "priority": {"type": "string", "enum": ["routine", "urgent"]},
            "ttl_s": {"type": "integer", "minimum": 1, "maximum": 30 * 86_400},
            "respond_by": _TIME,
            "legal_basis": {"type": "string", "maxLength": 200},
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["message_id", "status"],
        "properties": {"message_id": _UUID, "status": {"type": "string"}},
    },
    "Signed": {
        "type": ["object", "null"],
        "properties": {
            "envelope": {"description": "The envelope as sent (JSON), or native text"},
            "signature": {"type": ["string", "null"], "description": "Detached JWS"},
        },
    },
    "Message": {
        "type": "object",
        "required": ["direction", "message_id", "partner", "message_type", "state"],
        "properties": {
            "direction": {"type": "string", "enum": ["inbound", "outbound"]},
            "message_id": _UUID,
            "partner": _PARTY,
            "message_type": {"type": "string"},
            "schema_version": {"type": "string"},
            "correlation_id": {"type": ["string", "null"]},
            "in_reply_to": {"type": ["string", "null"]},
            "state": {
                "type": "string",
                "enum": [
                    "queued",
                    "sent",
                    "acknowledged",
                    "rejected",
                    "dead",
                    "received",
                    "delivered",
                ],
            },
            "attempts": {"type": "integer"},
            "last_error": {"type": ["string", "null"]},
            "body_digest": {"type": "string"},
            "envelope": {},
            "signature": {"type": ["string", "null"]},
            "receipt": _ref("Signed"),
        },
    },
    "MessagePage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["direction", "message_id", "partner", "message_type", "state"],
                    "properties": {
                        "direction": {"type": "string"},
                        "message_id": {"type": "string"},
                        "partner": {"type": "string"},
                        "message_type": {"type": "string"},
                        "schema_version": {"type": "string"},
                        "correlation_id": {"type": ["string", "null"]},
                        "state": {"type": "string"},
                        "at": _TIME,
                        "attempts": {"type": "integer"},
                        "body_digest": {"type": "string"},
                    },
                },
            },
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Query": {
        "type": "object",
        "additionalProperties": False,
        "required": ["partner", "message_type", "params"],
        "properties": {
            "partner": _PARTY,
            "message_type": {"type": "string", "pattern": "^query\\.", "maxLength": 100},
            "schema_version": {"type": "string", "default": "1.0", "maxLength": 20},
            "params": {"type": "object", "description": "The query's payload"},
            "timeout_s": {"type": "number", "minimum": 0, "maximum": 60, "default": 10},
            "correlation_id": _UUID,
        },
    },
    "QueryState": {
        "type": "object",
        "required": ["query_id", "partner", "message_type", "state", "response"],
        "properties": {
            "query_id": _UUID,
            "partner": _PARTY,
            "message_type": {"type": "string"},
            "state": {"type": "string"},
            "last_error": {"type": ["string", "null"]},
            "response": {"oneOf": [{"type": "null"}, _ref("Message")]},
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}


def _list_parameters() -> list[dict[str, Any]]:
    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
        }

    return [
        query("direction", {"type": "string", "enum": ["inbound", "outbound"]}, "Direction"),
        query("partner", _PARTY, "Sender (inbound) or recipient (outbound)"),
        query("type", {"type": "string", "maxLength": 100}, "message_type"),
        query(
            "state",
            {
                "type": "string",
                "enum": [
                    "queued",
                    "sent",
                    "acknowledged",
                    "rejected",
                    "dead",
                    "received",
                    "delivered",
                ],
            },
            "Message state",
        ),
        query("since", _TIME, "At or after this time (RFC 3339 UTC)"),
        query("until", _TIME, "Before this time (RFC 3339 UTC)"),
        query("correlation_id", _UUID, "Conversation id"),
        query(
            "limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "Page size"
        ),
        query("after", {"type": "string", "maxLength": 400}, "next_cursor of the previous page"),
    ]


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "C2C gateway internal API",
            "version": __version__,
            "description": "Send messages and queries to partner administrations and follow"
            " their delivery. Bearer JWTs with scopes c2c:send, c2c:query, audit:read, admin.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": _SCHEMAS,
        },
        "paths": {
            "/api/v1/messages": {
                "post": {
                    "operationId": "submitMessage",
                    "summary": "Submit a message to a partner; stored durably before 202",
                    "security": _security([SCOPE_SEND]),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Submission")}},
                    },
                    "responses": {
                        "202": _json(_ref("Accepted"), "Stored in the outbox; delivery follows"),
                        "400": _problem("Malformed request, unknown type or schema error"),
                        **_AUTH_ERRORS,
                        "413": _problem("Body too large"),
                        "503": _problem("The store is unavailable; nothing was kept"),
                    },
                },
                "get": {
                    "operationId": "listMessages",
                    "summary": "List messages, newest first, keyset-paged",
                    "security": _security(_READ_SCOPES),
                    "parameters": _list_parameters(),
                    "responses": {
                        "200": _json(_ref("MessagePage"), "One page"),
                        "400": _problem("Bad filter or cursor"),
                        **_AUTH_ERRORS,
                        "503": _problem("The store is unavailable"),
                    },
                },
            },
            "/api/v1/messages/{message_id}": {
                "get": {
                    "operationId": "getMessage",
                    "summary": "A message's state, attempts and receipt",
                    "security": _security(_READ_SCOPES),
                    "parameters": [_MESSAGE_ID_PARAM],
                    "responses": {
                        "200": _json(_ref("Message"), "The message"),
                        "400": _problem("message_id is not a UUID"),
                        **_AUTH_ERRORS,
                        "404": _problem("No such message"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/messages/{message_id}/retry": {
                "post": {
                    "operationId": "retryMessage",
                    "summary": "Queue a dead or rejected message again (audited)",
                    "security": _security([SCOPE_ADMIN]),
                    "parameters": [_MESSAGE_ID_PARAM],
                    "responses": {
                        "200": _json(_ref("Accepted"), "Queued again"),
                        "400": _problem("message_id is not a UUID"),
                        **_AUTH_ERRORS,
                        "404": _problem("No such outbound message"),
                        "409": _problem("The message is not dead or rejected"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/queries": {
                "post": {
                    "operationId": "submitQuery",
                    "summary": "Send a query and wait up to timeout_s for the partner's answer",
                    "security": _security([SCOPE_QUERY]),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Query")}},
                    },
                    "responses": {
                        "200": _json(_ref("QueryState"), "Answered in time"),
                        "202": _json(_ref("QueryState"), "Sent; no answer yet"),
                        "400": _problem("Malformed request or schema error"),
                        **_AUTH_ERRORS,
                        "413": _problem("Body too large"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/queries/{query_id}": {
                "get": {
                    "operationId": "getQuery",
                    "summary": "A query's state and, once it came, the partner's answer",
                    "security": _security([SCOPE_QUERY, SCOPE_ADMIN]),
                    "parameters": [
                        {"name": "query_id", "in": "path", "required": True, "schema": _UUID}
                    ],
                    "responses": {
                        "200": _json(_ref("QueryState"), "The query"),
                        "400": _problem("query_id is not a UUID"),
                        **_AUTH_ERRORS,
                        "404": _problem("No such query"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document")},
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: store reachable, and the broker when configured",
                    "security": [],
                    "responses": {
                        "200": _json(_ref("Readiness"), "Ready"),
                        "503": _json(_ref("Readiness"), "Not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
    }
