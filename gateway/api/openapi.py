"""The OpenAPI 3.1 document of the internal API, served at ``/api/v1/openapi.json``.

A test compares its paths and methods with the app's router, so the two cannot drift; another
checks real answers against it, every member a view emits declared
(tests/integration/test_api_openapi_responses.py).
"""

from __future__ import annotations

from typing import Any, get_args

from gateway import __version__
from gateway.api.audit import MAX_EXPORT_MESSAGES as AUDIT_MAX_MESSAGES
from gateway.api.audit import MAX_PAGE as AUDIT_MAX_PAGE
from gateway.api.auth import ANY_READER, READERS, SCOPE_ADMIN, SCOPE_AUDIT, SCOPE_QUERY, SCOPE_SEND
from gateway.api.console_routes import ASSETS
from gateway.api.messages import DEFAULT_PAGE, MAX_PAGE
from gateway.api.schemas import PREFIX as SCHEMAS_PATH
from gateway.api.schemas import SCHEMA_JSON
from gateway.audit.events import EventKind
from gateway.config import MAX_TTL_S
from gateway.documents import DOCUMENT_FIELDS, MAX_REF
from gateway.inbound.context import Transport
from gateway.model import Direction, Priority
from gateway.outbound.operator import MAX_OPERATOR_REASON
from gateway.store.base import INBOUND_DELIVERED, INBOUND_RECEIVED, OutboundState
from gateway.transports.https_server import SIGNATURE_HEADER

_UUID = {"type": "string", "format": "uuid", "pattern": "^[0-9a-f-]{36}$"}
_PARTY = {"type": "string", "pattern": "^[A-Z]{2}-[A-Z0-9]{2,16}$"}
_TIME = {"type": "string", "format": "date-time"}
_MAYBE_TIME = {"type": ["string", "null"], "format": "date-time"}
_MAYBE_UUID = {**_UUID, "type": ["string", "null"]}
_DIGEST = {
    "type": "string",
    "pattern": "^sha-256:[A-Za-z0-9_-]{43}$",
    "description": "sha-256:<base64url of SHA-256 of the exact body bytes> (PROTOCOL.md"
    " section 4); kept when body retention removes the body",
}
_OUTBOUND_STATES = [state.value for state in OutboundState]
_INBOUND_STATES = [INBOUND_RECEIVED, INBOUND_DELIVERED]
#: gateway/api/queries.py: a query's state is its message's until the answer came
_QUERY_STATES = ["answered", *_OUTBOUND_STATES]
_DIRECTIONS = [direction.value for direction in Direction]
_READ_SCOPES = sorted(ANY_READER)
_INBOUND_READ_SCOPES = sorted(READERS[Direction.INBOUND])
_READ_NOTE = (
    "Outbound messages need c2c:send, c2c:query or admin, inbound ones c2c:receive or admin:"
    " a request naming its direction needs that direction's scope (else 403), one that names"
    " none sees the directions its token may read."
)
_B64 = {"type": "string", "contentEncoding": "base64"}
_HASHES = {"type": "array", "items": _B64}
_SEQ = {"type": "integer", "minimum": 0}
_SCHEMA_OF = f"GET {SCHEMAS_PATH}/{{message_type}}/{{schema_version}}"
_CATALOGUE = (
    f"GET {SCHEMAS_PATH} lists every type and version; the same documents partners read at"
    " /c2c/v1/schemas"
)


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
#: submitting: also a recipient that is no partner, or a type it may not be sent
_SUBMIT_AUTH_ERRORS = {
    **_AUTH_ERRORS,
    "403": _problem(
        "The token lacks the scope this operation needs, or NOT_AUTHORIZED: the recipient is"
        " not a configured partner or may not be sent this message type"
    ),
}

_MESSAGE_ID_PARAM = {
    "name": "message_id",
    "in": "path",
    "required": True,
    "schema": _UUID,
}

_IDEMPOTENCY_KEY_PARAM = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Your key for this request (draft-ietf-httpapi-idempotency-key-header): a"
    " structured-field string or a bare token, 1 to 255 printable ASCII characters other than"
    ' " and \\. Sent again with the same request, it gets the message the first one created'
    " (marked Idempotent-Replayed: true), never a second one; with a different request, 422."
    " Keys are per token subject and kept as long as their message.",
    "schema": {"type": "string", "maxLength": 257},
}
_REPLAYED_HEADER = {
    "Idempotent-Replayed": {
        "description": "true when the answer is for an earlier request with this Idempotency-Key",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_KEY_REUSED = _problem("The Idempotency-Key was used for a different request")


def _replayable(response: dict[str, Any], *, location: str | None = None) -> dict[str, Any]:
    """``response`` with ``Idempotent-Replayed``, and the ``Location`` of what it created."""
    headers: dict[str, Any] = dict(_REPLAYED_HEADER)
    if location is not None:
        headers["Location"] = {
            "description": location,
            "required": True,
            "schema": {"type": "string", "format": "uri-reference"},
        }
    return {**response, "headers": headers}


#: what ``pointer`` points into. It stays relative to the payload, as the detail (the exact
#: reason, audited too) and the CLI's output are: a v1 member that changed meaning would break
#: the clients that already prefix it.
_POINTER = (
    "SCHEMA_INVALID: the RFC 6901 JSON pointer of the schema error, relative to the payload"
    " you submitted, not to the request body: into payload for POST /api/v1/messages, into"
    ' params for POST /api/v1/queries ("" is the payload itself). Prefix /payload or /params'
    " for a pointer into your request body. detail names the same location. (A partner's"
    " NACK detail, PROTOCOL.md section 4, and the problem answering a c2c.submit submission"
    " name it from the envelope or submission instead: /payload/...)"
)
_NOT_SIGNED = (
    "This is not the signed bytes: the JWS covers the bytes exactly as sent (PROTOCOL.md"
    " section 3), which may differ in spacing, member order or escapes, so this value"
    " serialised again need not verify."
)
_COMMON_MEMBERS = (
    "direction",
    "message_id",
    "partner",
    "message_type",
    "schema_version",
    "correlation_id",
    "in_reply_to",
    "state",
    "body_digest",
    "envelope",
    "signature",
    "receipt",
)
_OUTBOUND_MEMBERS = (
    "priority",
    "attempts",
    "last_error",
    "created_at",
    "updated_at",
    "expires_at",
    "next_attempt_at",
    "submitted_by",
    "idempotency_key",
)
_INBOUND_MEMBERS = (
    "received_at",
    "transport",
    "document_ref",
    "document_version",
    "message_function",
)


def _common_properties(direction: Direction) -> dict[str, Any]:
    """The members both views of a message have (gateway/api/messages.py)."""
    return {
        "direction": {"type": "string", "enum": [direction.value]},
        "message_id": _UUID,
        "partner": {
            **_PARTY,
            "description": "The recipient" if direction is Direction.OUTBOUND else "The sender",
        },
        "message_type": {"type": "string"},
        "schema_version": {"type": "string"},
        "correlation_id": _MAYBE_UUID,
        "in_reply_to": _MAYBE_UUID,
        "body_digest": _DIGEST,
        "envelope": {
            "type": ["object", "string", "null"],
            "description": "The message's stored bytes parsed as JSON (a native-format body"
            f" as text), for reading; null once body retention removed them. {_NOT_SIGNED}"
            " GET /api/v1/messages/{message_id}/body gives the exact bytes with their JWS.",
        },
        "signature": {
            "type": "string",
            "description": "Detached JWS (RFC 7515 Appendix F) over the exact body bytes",
        },
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
            "pointer": {"type": "string", "description": _POINTER},
            "body_digest": {
                **_DIGEST,
                "description": "410 from a body endpoint: the digest of the removed bytes",
            },
        },
    },
    "Closing": {
        "type": "object",
        "additionalProperties": False,
        "required": ["reason"],
        "properties": {
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_OPERATOR_REASON,
                "description": "Why the message will not be sent again (its body purged, its"
                " partner removed, ...): one line of text, kept in the audit entry",
            },
        },
    },
    "OperatorReason": {
        "type": "object",
        "additionalProperties": False,
        "required": ["reason"],
        "properties": {
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_OPERATOR_REASON,
                "description": "Why the message is sent again (a ticket, what was fixed): one"
                " line of text, kept in the audit entry",
            },
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
                "description": "Must satisfy the schema of message_type/schema_version:"
                f" {_SCHEMA_OF} ({_CATALOGUE})",
            },
            "correlation_id": _UUID,
            "in_reply_to": _UUID,
            "priority": {"type": "string", "enum": ["routine", "urgent"]},
            "ttl_s": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_S},
            "respond_by": _TIME,
            "legal_basis": {"type": "string", "maxLength": 200},
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["message_id", "status"],
        "properties": {
            "message_id": _UUID,
            "status": {
                "type": "string",
                "enum": _OUTBOUND_STATES,
                "description": "The message's state: queued when just stored; an answer"
                " replayed for an Idempotency-Key gives the message's state now",
            },
        },
    },
    "Signed": {
        "type": "object",
        "description": "A receipt, parsed for reading: its exact bytes and their JWS are"
        " GET /api/v1/messages/{message_id}/receipt/body",
        "required": ["envelope", "signature"],
        "properties": {
            "envelope": {
                "type": ["object", "string"],
                "description": f"The receipt's stored bytes parsed as JSON (a native-format"
                f" receipt as text). {_NOT_SIGNED}",
            },
            "signature": {"type": "string", "description": "Detached JWS over the exact bytes"},
        },
    },
    "OutboundMessage": {
        "type": "object",
        "description": "A message we send (an outbox row)",
        "required": [*_COMMON_MEMBERS, *_OUTBOUND_MEMBERS],
        "properties": {
            **_common_properties(Direction.OUTBOUND),
            "priority": {"type": "string", "enum": [p.value for p in Priority]},
            "state": {"type": "string", "enum": _OUTBOUND_STATES},
            "attempts": {"type": "integer", "minimum": 0},
            "last_error": {
                "type": ["string", "null"],
                "description": "Why the last attempt failed",
            },
            "created_at": _TIME,
            "updated_at": _TIME,
            "expires_at": {**_MAYBE_TIME, "description": "After it, no more attempts"},
            "next_attempt_at": {
                **_MAYBE_TIME,
                "description": "When the next attempt is due while queued or sent; null once"
                " the message is acknowledged, rejected, dead or closed",
            },
            "submitted_by": {
                "type": ["string", "null"],
                "description": "Who submitted it: api:<token subject>, amqp:<user or app>",
            },
            "idempotency_key": {"type": ["string", "null"]},
            "receipt": {
                "oneOf": [{"type": "null"}, _ref("Signed")],
                "description": "The partner's receipt once it came",
            },
        },
    },
    "InboundMessage": {
        "type": "object",
        "description": "A message a partner sent us (an inbox row)",
        "required": [*_COMMON_MEMBERS, *_INBOUND_MEMBERS],
        "properties": {
            **_common_properties(Direction.INBOUND),
            "state": {
                "type": "string",
                "enum": _INBOUND_STATES,
                "description": "delivered once handed to the internal bus",
            },
            "received_at": _TIME,
            "transport": {"type": "string", "enum": list(get_args(Transport))},
            "receipt": {**_ref("Signed"), "description": "The receipt we answered with"},
            "document_ref": {
                "type": ["string", "null"],
                "description": "The document this message is a version of (GET"
                " /api/v1/documents), null for a type without versions",
            },
            "document_version": {
                "type": ["string", "null"],
                "description": "Its place among the document's versions; compare as strings,"
                " the highest is current",
            },
            "message_function": {
                "type": ["string", "null"],
                "description": "UNTDID 1225: 9 original, 5 replace, 4 change, 1 cancellation,"
                " 3 deletion, 6 confirmation",
            },
        },
    },
    "Message": {
        "oneOf": [_ref("OutboundMessage"), _ref("InboundMessage")],
        "discriminator": {
            "propertyName": "direction",
            "mapping": {
                Direction.OUTBOUND.value: "#/components/schemas/OutboundMessage",
                Direction.INBOUND.value: "#/components/schemas/InboundMessage",
            },
        },
    },
    "DocumentVersion": {
        "type": "object",
        "required": [
            "message_id",
            "version",
            "message_function",
            "created_at",
            "received_at",
            "transport",
            "state",
        ],
        "properties": {
            "message_id": _UUID,
            "version": {
                "type": "string",
                "description": "created_at (UTC, microseconds), then the store's order:"
                " compare as strings",
            },
            "message_function": {"type": ["string", "null"]},
            "created_at": _TIME,
            "received_at": _TIME,
            "transport": {"type": "string", "enum": list(get_args(Transport))},
            "state": {"type": "string", "enum": _INBOUND_STATES},
        },
    },
    "Document": {
        "type": "object",
        "required": ["partner", "message_type", "document_ref", "current", "cancelled", "versions"],
        "properties": {
            "partner": _PARTY,
            "message_type": {"type": "string"},
            "document_ref": {"type": "string"},
            "current": _ref("DocumentVersion"),
            "cancelled": {
                "type": "boolean",
                "description": "The current version cancels or deletes the document",
            },
            "versions": {"type": "array", "items": _ref("DocumentVersion")},
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
                    "required": [
                        "direction",
                        "message_id",
                        "partner",
                        "message_type",
                        "schema_version",
                        "correlation_id",
                        "state",
                        "at",
                        "attempts",
                        "body_digest",
                    ],
                    "properties": {
                        "direction": {"type": "string", "enum": _DIRECTIONS},
                        "message_id": _UUID,
                        "partner": _PARTY,
                        "message_type": {"type": "string"},
                        "schema_version": {"type": "string"},
                        "correlation_id": _MAYBE_UUID,
                        "state": {"type": "string", "enum": _OUTBOUND_STATES + _INBOUND_STATES},
                        "at": {
                            **_TIME,
                            "description": "created_at (outbound) or received_at (inbound)",
                        },
                        "attempts": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Delivery attempts (0 for an inbound message)",
                        },
                        "body_digest": _DIGEST,
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
            "params": {
                "type": "object",
                "description": "The query's payload: it must satisfy the schema of"
                f" message_type/schema_version, {_SCHEMA_OF}",
            },
            "timeout_s": {"type": "number", "minimum": 0, "maximum": 60, "default": 10},
            "correlation_id": _UUID,
        },
    },
    "QueryState": {
        "type": "object",
        "required": ["query_id", "partner", "message_type", "state", "last_error", "response"],
        "properties": {
            "query_id": _UUID,
            "partner": _PARTY,
            "message_type": {"type": "string"},
            "state": {
                "type": "string",
                "enum": _QUERY_STATES,
                "description": "answered once the partner's query.response came; until then"
                " the query message's state",
            },
            "last_error": {"type": ["string", "null"]},
            "response": {"oneOf": [{"type": "null"}, _ref("InboundMessage")]},
        },
    },
    "AuditEntryPage": {
        "type": "object",
        "required": ["items", "next_after"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["seq", "leaf_hash", "entry"],
                    "properties": {
                        "seq": _SEQ,
                        "leaf_hash": _B64,
                        "entry": {
                            "type": "object",
                            "description": "The leaf data (RFC 8785 JSON): event, at, "
                            "message_id, sender, recipient, message_type, body_digest, "
                            'outcome, reason, actor ...; {"unreadable": <base64>} when the '
                            "stored bytes hold no JSON object (changed outside the gateway)",
                        },
                    },
                },
            },
            "next_after": {
                "type": ["integer", "null"],
                "description": "Pass as after for the next page; null when this page is the last",
            },
        },
    },
    "AuditCheckpoint": {
        "type": "object",
        "required": ["origin", "size", "root_hash", "created_at", "note", "cosignatures"],
        "properties": {
            "origin": {"type": "string"},
            "size": _SEQ,
            "root_hash": _B64,
            "created_at": _TIME,
            "note": {"type": "string", "description": "C2SP signed-note checkpoint"},
            "cosignatures": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "partner",
                        "size",
                        "root_hash",
                        "received_at",
                        "note",
                        "consistency_proof",
                    ],
                    "properties": {
                        "partner": _PARTY,
                        "size": _SEQ,
                        "root_hash": _B64,
                        "received_at": _TIME,
                        "note": {"type": "string", "description": "The cosigned note"},
                        "consistency_proof": {
                            **_HASHES,
                            "description": "RFC 9162 consistency proof from the cosigned size"
                            " to the checkpoint's size (empty when they are equal)",
                        },
                    },
                },
            },
        },
    },
    "InclusionProof": {
        "type": "object",
        "required": ["index", "size", "leaf_hash", "root_hash", "proof"],
        "properties": {
            "index": _SEQ,
            "size": _SEQ,
            "leaf_hash": _B64,
            "root_hash": _B64,
            "proof": _HASHES,
        },
    },
    "ConsistencyProof": {
        "type": "object",
        "required": ["old_size", "size", "old_root_hash", "root_hash", "proof"],
        "properties": {
            "old_size": _SEQ,
            "size": _SEQ,
            "old_root_hash": _B64,
            "root_hash": _B64,
            "proof": _HASHES,
        },
    },
    "StoreCheck": {
        "type": "object",
        "required": [
            "ok",
            "size",
            "checked",
            "checkpoint_size",
            "first_bad_position",
            "problem_count",
            "problems",
        ],
        "properties": {
            "ok": {"type": "boolean"},
            "size": _SEQ,
            "checked": _SEQ,
            "checkpoint_size": {"type": ["integer", "null"]},
            "first_bad_position": {"type": ["integer", "null"]},
            "problem_count": _SEQ,
            "problems": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["position", "what"],
                    "properties": {
                        "position": {"type": ["integer", "null"]},
                        "what": {"type": "string"},
                    },
                },
            },
        },
    },
    "SchemaIndex": {
        "type": "object",
        "required": ["schemas"],
        "properties": {
            "schemas": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["message_type", "schema_version", "title", "url"],
                    "properties": {
                        "message_type": {"type": "string"},
                        "schema_version": {"type": "string"},
                        "title": {"type": "string"},
                        "url": {
                            "type": "string",
                            "format": "uri-reference",
                            "description": "The path of the schema on this API",
                        },
                    },
                },
            },
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
        query("direction", {"type": "string", "enum": _DIRECTIONS}, "Direction"),
        query("partner", _PARTY, "Sender (inbound) or recipient (outbound)"),
        query("type", {"type": "string", "maxLength": 100}, "message_type"),
        query(
            "state", {"type": "string", "enum": _OUTBOUND_STATES + _INBOUND_STATES}, "Message state"
        ),
        query("since", _TIME, "At or after this time (RFC 3339 UTC)"),
        query("until", _TIME, "Before this time (RFC 3339 UTC)"),
        query("correlation_id", _UUID, "Conversation id"),
        query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
            "Page size",
        ),
        query("after", {"type": "string", "maxLength": 400}, "next_cursor of the previous page"),
    ]


def _query(
    name: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


_EVENTS = [kind.value for kind in EventKind]
#: audit entries' times are milliseconds (``parse_rfc3339_bound``)
_ROUNDED = "Sub-millisecond digits round it up to the next millisecond."
_INT = {"type": "integer", "minimum": 0, "maximum": 2**62}


def _audit_entry_parameters() -> list[dict[str, Any]]:
    return [
        _query("since", _TIME, f"At or after this time (RFC 3339 UTC). {_ROUNDED}"),
        _query("until", _TIME, f"Before this time (RFC 3339 UTC). {_ROUNDED}"),
        _query("partner", _PARTY, "Sender or recipient"),
        _query("type", {"type": "string", "maxLength": 100}, "message_type"),
        _query("message_id", _UUID, "Message id"),
        _query("correlation_id", _UUID, "Case or conversation id"),
        _query("outcome", {"type": "string", "maxLength": 100}, "ACK, a NACK code or a state"),
        _query("event", {"type": "string", "enum": _EVENTS}, "Event kind"),
        _query("after", _INT, "next_after of the previous page (a seq)"),
        # gateway/api/audit.py takes 100 when not given
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": AUDIT_MAX_PAGE, "default": 100},
            "Page size",
        ),
    ]


def _one_message(
    operation: str,
    summary: str,
    ok: dict[str, Any],
    *,
    not_found: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A read of the one message ``message_id`` names (gateway/api/messages.py)."""
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "description": _READ_NOTE,
            "security": _security(_READ_SCOPES),
            "parameters": [
                _MESSAGE_ID_PARAM,
                _query(
                    "direction",
                    {"type": "string", "enum": _DIRECTIONS},
                    "When the id names several messages",
                ),
                _query(
                    "partner", _PARTY, "When the id names several messages: the sender or recipient"
                ),
            ],
            "responses": {
                "200": ok,
                "400": _problem("message_id is not a UUID, or a bad parameter"),
                **_AUTH_ERRORS,
                "404": _problem(not_found),
                "409": _problem(
                    "The id names several messages (a partner's ids are unique per"
                    " sender only): the detail lists them; give direction and partner"
                ),
                **(extra or {}),
                "503": _problem("The store is unavailable"),
            },
        }
    }


def _signed_bytes(description: str, signature: str) -> dict[str, Any]:
    """An answer of exact stored bytes: what the JWS in ``C2C-Signature`` covers."""
    return {
        "description": f"{description}: exactly the bytes the signature covers (PROTOCOL.md"
        " section 3). The store keeps no media type: Content-Type is the partner's format as"
        " configured now, application/json for the canonical envelope, else its adapter's"
        " (application/octet-stream for a partner no longer configured).",
        "headers": {
            SIGNATURE_HEADER: {
                "description": f"{signature}: the header PROTOCOL.md section 5 carries it in",
                "required": True,
                "schema": {"type": "string"},
            }
        },
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "*/*": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}},
        },
    }


def _audit_get(
    operation: str,
    summary: str,
    ok: dict[str, Any],
    *,
    scopes: list[str],
    parameters: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "operationId": operation,
        "summary": summary,
        "security": _security(scopes),
        "responses": {
            "200": ok,
            "400": _problem("Bad parameter (named in detail)"),
            **_AUTH_ERRORS,
            **(extra or {}),
            "503": _problem("The store is unavailable"),
        },
    }
    if parameters is not None:
        spec["parameters"] = parameters
    return {"get": spec}


def _audit_paths() -> dict[str, Any]:
    audit = [SCOPE_AUDIT]
    return {
        "/api/v1/audit/entries": _audit_get(
            "listAuditEntries",
            "Audit entries in log order, filtered, keyset-paged by seq",
            _json(_ref("AuditEntryPage"), "One page"),
            scopes=audit,
            parameters=_audit_entry_parameters(),
        ),
        "/api/v1/audit/checkpoint": _audit_get(
            "latestAuditCheckpoint",
            "The latest signed checkpoint and, per partner, its latest cosigned checkpoint "
            "note with the consistency proof from that size to the checkpoint's",
            _json(_ref("AuditCheckpoint"), "The checkpoint"),
            scopes=audit,
            extra={"404": _problem("No checkpoint signed yet")},
        ),
        "/api/v1/audit/proofs/inclusion": _audit_get(
            "auditInclusionProof",
            "RFC 9162 inclusion proof of entry index in the tree of size entries",
            _json(_ref("InclusionProof"), "The proof"),
            scopes=audit,
            parameters=[
                _query("index", _INT, "Entry (seq), below size", required=True),
                _query("size", _INT, "Tree size (default: current)"),
            ],
        ),
        "/api/v1/audit/proofs/consistency": _audit_get(
            "auditConsistencyProof",
            "RFC 9162 consistency proof from tree size old_size to size",
            _json(_ref("ConsistencyProof"), "The proof"),
            scopes=audit,
            parameters=[
                _query("old_size", _INT, "Earlier tree size", required=True),
                _query("size", _INT, "Later tree size (default: current)"),
            ],
        ),
        "/api/v1/audit/export": _audit_get(
            "auditExport",
            "Evidence bundle (docs/audit-bundle.md) proven against a fresh checkpoint; "
            "with correlation_id or message_id: the case's or the messages' wire bytes, "
            "signatures and receipts. Verify offline with `c2c-gateway audit verify`. "
            "Audited as an operator action.",
            {
                "description": "The bundle (JSON Lines) as a download, named after its filter:"
                " audit-<origin>-<filter>-<checkpoint size>.jsonl, the filter all, or"
                " case-<correlation_id>, message-<message_id> or messages-<count>,"
                " since-<time>, until-<time> (RFC 3339 basic form: 20260302T120000.000Z)"
                " in that order",
                "headers": {
                    "Content-Disposition": {
                        "description": 'attachment; filename="<the name>"',
                        "required": True,
                        "schema": {"type": "string"},
                    }
                },
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            },
            scopes=audit,
            parameters=[
                _query("since", _TIME, f"Entries at or after this time. {_ROUNDED}"),
                _query("until", _TIME, f"Entries before this time. {_ROUNDED}"),
                _query("correlation_id", _UUID, "A case: its entries and messages"),
                _query(
                    "message_id",
                    {"type": "array", "items": _UUID, "maxItems": AUDIT_MAX_MESSAGES},
                    "A message: its entries, and its wire bytes, signature and receipt"
                    " (repeatable, ?message_id=A&message_id=B: the entries of any of them;"
                    " as `c2c-gateway audit export --message-id`)",
                ),
            ],
            extra={"409": _problem("The log does not check: no bundle that would not verify")},
        ),
        "/api/v1/audit/verify": _audit_get(
            "auditStoreCheck",
            "Recompute the whole stored log against its tree and signed checkpoints; "
            "names the first bad position",
            _json(_ref("StoreCheck"), "The report (ok false names the problems)"),
            scopes=[SCOPE_AUDIT, SCOPE_ADMIN],
        ),
    }


#: any valid token, whatever its scopes (OpenAPI: the scheme with no scope named)
_ANY_TOKEN: list[dict[str, list[str]]] = [{"bearer": []}]


def _schema_paths() -> dict[str, Any]:
    """The schema catalogue (gateway/api/schemas.py): for any valid token, so no 403."""
    unknown_parameter = _problem("An unknown query parameter (named in detail)")
    unauthorized = _problem("Missing, invalid or expired bearer token")
    return {
        SCHEMAS_PATH: {
            "get": {
                "operationId": "listSchemas",
                "summary": "Every message_type/schema_version a payload may be written"
                " against, with the URL of its JSON Schema",
                "description": f"Any valid token, whatever its scopes. {_CATALOGUE}.",
                "security": _ANY_TOKEN,
                "responses": {
                    "200": _json(_ref("SchemaIndex"), "The catalogue"),
                    "400": unknown_parameter,
                    "401": unauthorized,
                },
            }
        },
        SCHEMAS_PATH + "/{message_type}/{schema_version}": {
            "get": {
                "operationId": "getSchema",
                "summary": "The JSON Schema (Draft 2020-12) of a payload of this type and"
                " version: what POST /api/v1/messages checks payload against",
                "description": "Any valid token, whatever its scopes. Self-contained (the"
                " shared definitions it uses are in its $defs); the same bytes partners"
                " read at /c2c/v1/schemas/{message_type}/{schema_version}.",
                "security": _ANY_TOKEN,
                "parameters": [
                    {
                        "name": "message_type",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "example": "shipment.status",
                    },
                    {
                        "name": "schema_version",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "example": "1.0",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The schema",
                        "content": {SCHEMA_JSON: {"schema": {"type": "object"}}},
                    },
                    "400": unknown_parameter,
                    "401": unauthorized,
                    "404": _problem(f"No such type and version ({_CATALOGUE})"),
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "C2C gateway internal API",
            "version": __version__,
            "description": "Send messages and queries to partner administrations and follow"
            " their delivery, and read what partners sent. Bearer JWTs with scopes c2c:send,"
            " c2c:query, c2c:receive (what partners sent), audit:read, admin.",
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
                    "parameters": [_IDEMPOTENCY_KEY_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Submission")}},
                    },
                    "responses": {
                        "202": _replayable(
                            _json(_ref("Accepted"), "Stored in the outbox; delivery follows"),
                            location="/api/v1/messages/{message_id}: the message",
                        ),
                        "400": _problem("Malformed request, unknown type or schema error"),
                        **_SUBMIT_AUTH_ERRORS,
                        "413": _problem(
                            "Body too large, or the signed message larger than the partner takes"
                        ),
                        "422": _KEY_REUSED,
                        "503": _problem("The store is unavailable; nothing was kept"),
                    },
                },
                "get": {
                    "operationId": "listMessages",
                    "summary": "List messages, newest first, keyset-paged",
                    "description": _READ_NOTE,
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
            "/api/v1/messages/{message_id}": _one_message(
                "getMessage",
                "A message's state, attempts and receipt",
                _json(_ref("Message"), "The message"),
                not_found="No such message",
            ),
            "/api/v1/messages/{message_id}/body": _one_message(
                "getMessageBody",
                "The message's bytes exactly as sent or received, to verify its signature",
                _signed_bytes(
                    "The body as stored; for a native-format partner, in its format",
                    "The message's detached JWS, as sent with it (signature in the message)",
                ),
                not_found="No such message",
                extra={
                    "410": _problem(
                        "The body was removed after the retention period ([retention]"
                        " body_retention_days); body_digest gives its digest, which the"
                        " message and the audit log keep"
                    )
                },
            ),
            "/api/v1/messages/{message_id}/receipt/body": _one_message(
                "getReceiptBody",
                "The message's receipt exactly as sent or received: ours for an inbound"
                " message, the partner's for an outbound one. Retention keeps receipts.",
                _signed_bytes(
                    "The receipt as stored; for a native-format partner, in its format",
                    "The receipt's detached JWS (receipt.signature in the message)",
                ),
                not_found="No such message, or an outbound message whose receipt has not come",
            ),
            "/api/v1/messages/{message_id}/retry": {
                "post": {
                    "operationId": "retryMessage",
                    "summary": "Queue a dead, closed or rejected message again (audited)",
                    "description": "The body is optional: with a reason (a ticket, what was"
                    " fixed), the audit entry keeps it.",
                    "security": _security([SCOPE_ADMIN]),
                    "parameters": [_MESSAGE_ID_PARAM],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("OperatorReason")}},
                    },
                    "responses": {
                        "200": _json(_ref("Accepted"), "Queued again"),
                        "400": _problem(
                            "message_id is not a UUID, or the body or its reason is malformed"
                        ),
                        **_AUTH_ERRORS,
                        "404": _problem("No such outbound message"),
                        "409": _problem("The message is not dead, closed or rejected"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/messages/{message_id}/close": {
                "post": {
                    "operationId": "closeMessage",
                    "summary": "Close a dead message that will not be sent again (audited with"
                    " the reason)",
                    "description": "The message is closed: no more attempts, and no longer"
                    " counted as dead (c2c_outbox_depth, alert C2COutboxDead). A retry"
                    " queues it again; the partner's late receipt still settles it.",
                    "security": _security([SCOPE_ADMIN]),
                    "parameters": [_MESSAGE_ID_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Closing")}},
                    },
                    "responses": {
                        "200": _json(_ref("Accepted"), "Closed"),
                        "400": _problem(
                            "message_id is not a UUID, or the body or its reason is malformed"
                        ),
                        **_AUTH_ERRORS,
                        "404": _problem("No such outbound message"),
                        "409": _problem("The message is not dead"),
                        "413": _problem("Body too large"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/documents": {
                "get": {
                    "operationId": "getDocument",
                    "summary": "A partner's filing and its amendments in version order, and the"
                    " current version (the highest, whatever order they arrived in)",
                    "security": _security(_INBOUND_READ_SCOPES),
                    "parameters": [
                        _query("partner", _PARTY, "The sender", required=True),
                        _query(
                            "type",
                            {"type": "string", "enum": sorted(DOCUMENT_FIELDS)},
                            "A message type with versions",
                            required=True,
                        ),
                        _query(
                            "ref",
                            {"type": "string", "minLength": 1, "maxLength": MAX_REF},
                            "The document's reference (document_ref of its messages)",
                            required=True,
                        ),
                    ],
                    "responses": {
                        "200": _json(_ref("Document"), "The document"),
                        "400": _problem("Bad parameter (named in detail)"),
                        **_AUTH_ERRORS,
                        "404": _problem("No version of this document was received"),
                        "503": _problem("The store is unavailable"),
                    },
                }
            },
            "/api/v1/queries": {
                "post": {
                    "operationId": "submitQuery",
                    "summary": "Send a query and wait up to timeout_s for the partner's answer",
                    "security": _security([SCOPE_QUERY]),
                    "parameters": [_IDEMPOTENCY_KEY_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("Query")}},
                    },
                    "responses": {
                        "200": _replayable(_json(_ref("QueryState"), "Answered in time")),
                        "202": _replayable(
                            _json(_ref("QueryState"), "Sent; no answer yet"),
                            location="/api/v1/queries/{query_id}: poll it for the answer",
                        ),
                        "400": _problem("Malformed request, unknown type or schema error"),
                        **_SUBMIT_AUTH_ERRORS,
                        "413": _problem(
                            "Body too large, or the signed message larger than the partner takes"
                        ),
                        "422": _KEY_REUSED,
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
            **_audit_paths(),
            **_schema_paths(),
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
            "/console": {
                "get": {
                    "operationId": "consoleRedirect",
                    "summary": "The audit console (redirects to /console/)",
                    "security": [],
                    "responses": {"308": {"description": "Permanent redirect to /console/"}},
                }
            },
            "/console/": {
                "get": {
                    "operationId": "consolePage",
                    "summary": "The audit console: a web page for auditors (docs/audit-console.md);"
                    " it calls the auditor API with the token the auditor enters",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/console/{name}": {
                "get": {
                    "operationId": "consoleFile",
                    "summary": "The console's scripts and style sheet",
                    "security": [],
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {
                                "type": "string",
                                "enum": list(ASSETS),
                            },
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The file",
                            "content": {
                                "text/javascript": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                            },
                        },
                        "404": _problem("No such file"),
                    },
                }
            },
        },
    }
