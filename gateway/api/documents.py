"""Internal API: the versions of one document a partner filed, and which one is current.

``GET /api/v1/documents?partner=&type=&ref=``: every stored version (original, amendments,
cancellation) in version order (gateway/documents.py), and the current one: the highest
version, whatever the order the versions arrived in (RELIABILITY-SECURITY T47). A version that
arrives late (v1 after v2) is listed, never made current.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.problems import json_response, problem
from gateway.api.requests import query_fields
from gateway.api.services import SERVICES
from gateway.clock import format_rfc3339
from gateway.documents import (
    CANCELLING_FUNCTIONS,
    DOCUMENT_FIELDS,
    MAX_REF,
    document_version,
    not_found,
)
from gateway.errors import Malformed
from gateway.model import is_party_id
from gateway.store.base import INBOUND_DELIVERED, INBOUND_RECEIVED, DocumentVersion

QUERY = frozenset({"partner", "type", "ref"})
#: versions answered at most (the newest); a document has a handful
MAX_VERSIONS = 1000


def version_view(version: DocumentVersion) -> dict[str, Any]:
    return {
        "message_id": version.message_id,
        "version": document_version(version.created_at, version.seq),
        "message_function": version.message_function,
        "created_at": format_rfc3339(version.created_at),
        "received_at": format_rfc3339(version.received_at),
        "transport": version.transport,
        "state": INBOUND_DELIVERED if version.relayed else INBOUND_RECEIVED,
    }


async def get_document(request: web.Request) -> web.Response:
    fields = query_fields(request, QUERY)
    partner = fields.required_text("partner", limit=40)
    if not is_party_id(partner):
        raise Malformed("partner must be a party id (CC-AGENCY)")
    message_type = fields.required_text("type", limit=100)
    if message_type not in DOCUMENT_FIELDS:
        raise Malformed(
            f"type {message_type[:100]} has no versions; types with versions: "
            f"{', '.join(sorted(DOCUMENT_FIELDS))}"
        )
    ref = fields.required_text("ref", limit=MAX_REF)
    versions = await request.app[SERVICES].store.document_versions(
        partner, message_type, ref, limit=MAX_VERSIONS
    )
    if not versions:
        return problem(404, not_found(message_type, partner, ref))
    current = versions[-1]
    return json_response(
        {
            "partner": partner,
            "message_type": message_type,
            "document_ref": ref,
            "current": version_view(current),
            "cancelled": current.message_function in CANCELLING_FUNCTIONS,
            "versions": [version_view(version) for version in versions],
        }
    )
