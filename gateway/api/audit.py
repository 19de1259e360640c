"""Auditor API: entries, checkpoints with their cosignatures, proofs, export bundles, the check.

Every route needs ``audit:read`` (``admin`` may also run the store check). Proofs and roots
come from ``AuditLog`` (O(log n) node reads); a bad parameter is a 400 naming it and why.
"""

from __future__ import annotations

import base64
import re
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from aiohttp import web

from gateway.api.auth import claims_of
from gateway.api.problems import json_response, problem
from gateway.api.requests import Fields, query_fields, query_uuids
from gateway.api.services import SERVICES
from gateway.audit import merkle
from gateway.audit.bundle import export_bundle
from gateway.audit.events import AuditEvent, EventKind, entry_view
from gateway.audit.log import AuditIntegrityError, AuditLog
from gateway.clock import format_rfc3339
from gateway.errors import Malformed
from gateway.model import is_party_id
from gateway.store.base import AuditFilter

AUDIT_LOG = web.AppKey("c2c_audit_log", AuditLog)
MAX_PAGE = 1000
#: bytes per chunk when streaming a bundle
CHUNK = 256 * 1024
ENTRY_PARAMS = frozenset(
    {
        "since",
        "until",
        "partner",
        "type",
        "message_id",
        "correlation_id",
        "outcome",
        "event",
        "after",
        "limit",
    }
)
EVENTS = frozenset(kind.value for kind in EventKind)
#: ``?message_id=A&message_id=B``: the entries and messages of any of them
EXPORT_REPEATABLE = frozenset({"message_id"})
#: message ids of one export: a case's handful, well inside a request line's 8 KiB
MAX_EXPORT_MESSAGES = 100
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _required_int(fields: Fields, name: str, *, low: int) -> int:
    value = fields.decimal(name, low=low)
    if value is None:
        raise Malformed(f"query parameter {name} is required")
    return value


def _audit_log(request: web.Request) -> AuditLog:
    return request.app[AUDIT_LOG]


async def _tree_size(request: web.Request, fields: Fields, name: str) -> int:
    """``name`` (default: the current size), refused when larger than the tree."""
    current = await request.app[SERVICES].store.audit_size()
    size = fields.decimal(name, low=0)
    if size is None:
        return current
    if size > current:
        raise Malformed(f"{name} {size} is larger than the tree ({current} entries)")
    return size


async def list_entries(request: web.Request) -> web.Response:
    fields = query_fields(request, ENTRY_PARAMS)
    partner = fields.text("partner", limit=40)
    if partner is not None and not is_party_id(partner):
        raise Malformed("partner must be a party id (CC-AGENCY)")
    filt = AuditFilter(
        since=fields.timestamp("since", bound=True),
        until=fields.timestamp("until", bound=True),
        partner=partner,
        message_type=fields.text("type", limit=100),
        message_id=fields.uuid("message_id"),
        correlation_id=fields.uuid("correlation_id"),
        outcome=fields.text("outcome", limit=100),
        event=fields.choice("event", EVENTS),
    )
    after = fields.decimal("after", low=0)
    limit = fields.decimal("limit", low=1, high=MAX_PAGE) or 100
    rows = await request.app[SERVICES].store.audit_entries(
        filt, after_seq=-1 if after is None else after, limit=limit
    )
    return json_response(
        {
            "items": [
                {"seq": r.seq, "leaf_hash": _b64(r.leaf_hash), "entry": entry_view(r.entry)}
                for r in rows
            ],
            # a full page may have more after it; the cursor is the last seq seen
            "next_after": rows[-1].seq if len(rows) == limit else None,
        }
    )


async def latest_checkpoint(request: web.Request) -> web.Response:
    """The latest checkpoint and, per partner, its latest cosigned note with the consistency
    proof from the cosigned size to the checkpoint's: all an auditor's browser needs to check
    each cosignature against the checkpoint with the partner's key."""
    query_fields(request, frozenset())
    store = request.app[SERVICES].store
    checkpoint = await store.latest_checkpoint()
    if checkpoint is None:
        return problem(404, "no checkpoint has been signed yet")
    audit = _audit_log(request)
    cosignatures = []
    # per partner the latest: it covers every entry below its own size, so older ones (one
    # per witnessing round) would add nothing
    for c in await store.latest_cosignatures(checkpoint.size):
        proof = await audit.consistency_proof(c.size, checkpoint.size)
        cosignatures.append(
            {
                "partner": c.partner,
                "size": c.size,
                "root_hash": _b64(c.root_hash),
                "received_at": format_rfc3339(c.received_at),
                "note": c.note,
                "consistency_proof": [_b64(h) for h in proof],
            }
        )
    return json_response(
        {
            "origin": audit.origin,
            "size": checkpoint.size,
            "root_hash": _b64(checkpoint.root_hash),
            "created_at": format_rfc3339(checkpoint.created_at),
            "note": checkpoint.note,
            "cosignatures": cosignatures,
        }
    )


async def inclusion_proof(request: web.Request) -> web.Response:
    fields = query_fields(request, frozenset({"index", "size"}))
    index = _required_int(fields, "index", low=0)
    size = await _tree_size(request, fields, "size")
    if index >= size:
        raise Malformed(f"index {index} is not below the tree size {size}")
    try:
        proof = await _audit_log(request).inclusion_proof(index, size)
    except merkle.ProofError as exc:
        raise Malformed(str(exc)) from None
    return json_response(
        {
            "index": proof.index,
            "size": proof.size,
            "leaf_hash": _b64(proof.leaf_hash),
            "root_hash": _b64(proof.root_hash),
            "proof": [_b64(h) for h in proof.hashes],
        }
    )


async def consistency_proof(request: web.Request) -> web.Response:
    fields = query_fields(request, frozenset({"old_size", "size"}))
    old_size = _required_int(fields, "old_size", low=0)
    size = await _tree_size(request, fields, "size")
    if old_size > size:
        raise Malformed(f"old_size {old_size} is larger than size {size}")
    audit = _audit_log(request)
    try:
        _, root = await audit.root(size)
        _, old_root = await audit.root(old_size)
        hashes = await audit.consistency_proof(old_size, size)
    except merkle.ProofError as exc:
        raise Malformed(str(exc)) from None
    return json_response(
        {
            "old_size": old_size,
            "size": size,
            "old_root_hash": _b64(old_root),
            "root_hash": _b64(root),
            "proof": [_b64(h) for h in hashes],
        }
    )


def _bundle_name(
    origin: str,
    size: int,
    *,
    since: datetime | None,
    until: datetime | None,
    correlation_id: str | None,
    message_ids: Sequence[str],
) -> str:
    """The download's file name: the log, the filter (``all`` without one), the checkpoint's
    size. Times in RFC 3339's basic form (no ``:``) and nothing but letters, digits, ``.``,
    ``_`` and ``-``: a name any file system takes as it is."""
    parts = [] if correlation_id is None else [f"case-{correlation_id}"]
    distinct = list(dict.fromkeys(message_ids))
    if len(distinct) == 1:
        parts.append(f"message-{distinct[0]}")
    elif distinct:
        parts.append(f"messages-{len(distinct)}")
    for name, bound in (("since", since), ("until", until)):
        if bound is not None:
            parts.append(f"{name}-{format_rfc3339(bound).replace('-', '').replace(':', '')}")
    scope = "-".join(parts) or "all"
    return _UNSAFE_IN_NAME.sub("_", f"audit-{origin}-{scope}-{size}.jsonl")


async def export(request: web.Request) -> web.StreamResponse:
    fields = query_fields(
        request, frozenset({"since", "until", "correlation_id"}), repeatable=EXPORT_REPEATABLE
    )
    since, until = fields.timestamp("since", bound=True), fields.timestamp("until", bound=True)
    correlation_id = fields.uuid("correlation_id")
    message_ids = query_uuids(request, "message_id", most=MAX_EXPORT_MESSAGES)
    services = request.app[SERVICES]
    audit = _audit_log(request)
    # named as `c2c-gateway audit export` names them
    named = ([correlation_id] if correlation_id else []) + [
        f"message {m}" for m in dict.fromkeys(message_ids)
    ]
    scope = " ".join(named) or "all"
    # the export is an operator action, recorded before the checkpoint that covers it
    await services.store.append_audit(
        [
            AuditEvent(
                event=EventKind.OPERATOR_ACTION,
                at=services.clock.now(),
                correlation_id=correlation_id,
                outcome="audit_export",
                actor=f"api:{claims_of(request).subject}",
                reason=(
                    f"export {scope} since={fields.text('since') or '-'}"
                    f" until={fields.text('until') or '-'}"
                ),
            )
        ]
    )
    with tempfile.TemporaryDirectory(prefix="c2c-export-") as tmp:
        path = Path(tmp) / "bundle.jsonl"
        try:
            summary = await export_bundle(
                services.store,
                audit,
                audit.signer,
                path,
                since=since,
                until=until,
                correlation_id=correlation_id,
                message_ids=message_ids,
            )
        except AuditIntegrityError as exc:
            return problem(409, f"no bundle exported: {exc}")
        name = _bundle_name(
            audit.origin,
            summary.size,
            since=since,
            until=until,
            correlation_id=correlation_id,
            message_ids=message_ids,
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Audit-Tree-Size": str(summary.size),
            }
        )
        response.content_length = path.stat().st_size
        await response.prepare(request)
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response


async def verify(request: web.Request) -> web.Response:
    query_fields(request, frozenset())
    services = request.app[SERVICES]
    report = await _audit_log(request).verify_store()
    # recorded after the check, with its verdict, so the report describes the log as it was
    verdict = "ok" if report.ok else f"first bad position {report.first_bad_position}"
    await services.store.append_audit(
        [
            AuditEvent(
                event=EventKind.OPERATOR_ACTION,
                at=services.clock.now(),
                outcome="audit_verify",
                actor=f"api:{claims_of(request).subject}",
                reason=f"verify: {report.checked} of {report.size} entries checked, {verdict}",
            )
        ]
    )
    return json_response(
        {
            "ok": report.ok,
            "size": report.size,
            "checked": report.checked,
            "checkpoint_size": report.checkpoint_size,
            "first_bad_position": report.first_bad_position,
            "problem_count": report.problem_count,
            "problems": [{"position": p.position, "what": p.what} for p in report.problems],
        }
    )
