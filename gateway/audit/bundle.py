"""Export bundles and their offline verification (format: docs/audit-bundle.md).

A bundle is one JSON Lines file, every line RFC 8785 canonical JSON:

1. ``{"type": "header", ...}`` with the signed checkpoint note;
2. ``{"type": "entry", "seq", "entry", "proof"}`` per audit entry (base64 leaf data and its
   inclusion proof in the checkpoint's tree);
3. ``{"type": "message", ...}`` per archived message of a case or message export (wire
   bytes, signature, receipt);
4. ``{"type": "cosignature", ...}`` per partner, its latest cosignature within the bundle's
   tree, with a consistency proof from the cosigned tree to the bundle's tree;
5. ``{"type": "consistency", "old_size", "proof"}`` per ``prove_from`` size: a consistency
   proof from that earlier tree size to the bundle's tree, for an auditor's kept checkpoint;
6. ``{"type": "end", "signature"}``: a signed note over the SHA-256 of every line before it.

Verification needs only the bundle and the log's audit public key (partners' keys, when
given, verify their cosignatures and must each have one; checkpoint notes the auditor kept
from earlier bundles must be prefixes of the bundle's tree). Each entry is checked on its own
against the checkpoint and against the header's filter (an unfiltered bundle must hold every
entry), so a changed, withheld or foreign entry is named by its seq; the end signature makes
every other byte (and truncation) fail too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import rfc8785

from gateway.audit import merkle
from gateway.audit.checkpoint import (
    CheckpointError,
    KeptCheckpoint,
    open_checkpoint,
    parse_body,
)
from gateway.audit.events import entry_view
from gateway.audit.log import AuditIntegrityError, AuditLog
from gateway.clock import format_rfc3339
from gateway.crypto.notes import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    NoteError,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    key_id,
    parse_note,
    sign_note,
    verify_note,
)
from gateway.envelope import TimestampError, body_digest, parse_rfc3339
from gateway.store.base import AuditFilter, AuditRow, MessageFilter, Store

FORMAT = "c2c-audit-bundle"
VERSION = 1
_END_PREFIX = "c2c-audit-bundle/v1 "
#: entries (and their proofs' node reads) fetched per store round trip
PAGE = 512
#: aligned leaf block read as one range when a page holds at least DENSE entries of it
BLOCK = 1024
DENSE = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _line(obj: dict[str, Any]) -> bytes:
    return bytes(rfc8785.dumps(obj)) + b"\n"


def _end_text(origin: str, lines: int, digest: bytes) -> str:
    return f"{_END_PREFIX}{origin}\n{lines}\n{digest.hex()}\n"


_MILLISECOND = timedelta(milliseconds=1)


def ceil_millisecond(moment: datetime) -> datetime:
    """``moment`` rounded up to the next millisecond boundary (unchanged when it is on one).

    Entries say their time in milliseconds: a ``since`` or ``until`` bound between two
    milliseconds is moved to the next one, so "at or after since" and "before until" hold for
    the times the entries show. OverflowError past year 9999.
    """
    floor = moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)
    return floor if floor == moment else floor + _MILLISECOND


class ExportTargetError(Exception):
    """The bundle's path names something a bundle must not be renamed over."""


_SPECIAL_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_export_target(out: Path) -> None:
    """Refuse an ``out`` that exists and is not a regular file (followed through symlinks).

    The bundle is written beside ``out`` and renamed over it: over a FIFO or a device
    (``/dev/stdout``, ``/dev/full``) that would replace the special file itself and report
    success while no reader ever got the bundle.
    """
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
    raise ExportTargetError(
        f"{out} is {kind}: a bundle is written only to a new path or over a regular file"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportSummary:
    path: Path
    size: int
    entries: int
    messages: int
    cosignatures: int


class _Writer:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.lines = 0

    def write(self, obj: dict[str, Any]) -> None:
        data = _line(obj)
        self._out.write(data)
        self._hash.update(data)
        self.lines += 1

    def digest(self) -> bytes:
        return self._hash.digest()


async def export_bundle(
    store: Store,
    audit: AuditLog,
    signer: NoteSigner,
    out: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    correlation_id: str | None = None,
    message_ids: Sequence[str] = (),
    prove_from: Sequence[int] = (),
    progress: Callable[[int], object] | None = None,
) -> ExportSummary:
    """Write a bundle of the entries matching the filter, proven against a fresh checkpoint.

    ``since`` and ``until`` are rounded up to the millisecond (``ceil_millisecond``) and the
    header's filter records the bounds applied. A case (``correlation_id``) or messages
    (``message_ids``, entries of any of them) also get their archived messages: wire bytes,
    signature, receipt. ``prove_from`` adds a consistency proof from each of those tree
    sizes (merkle.ProofError when one is beyond the checkpoint).

    Every proof written is checked against the checkpoint first: a log whose entries do not
    match its tree fails the export (AuditIntegrityError naming the first bad seq) instead of
    writing a bundle that cannot verify. Written to a temporary file and renamed, so a failed
    export leaves no partial bundle; ExportTargetError when ``out`` is a special file the
    rename would destroy.
    """
    since = None if since is None else ceil_millisecond(since)
    until = None if until is None else ceil_millisecond(until)
    checkpoint = await audit.checkpoint()
    size = checkpoint.size
    for old_size in prove_from:
        if not 0 <= old_size <= size:
            raise merkle.ProofError(
                f"no consistency proof from size {old_size}: the log's checkpoint has size {size}"
            )
    message_ids = sorted(set(message_ids))
    per_message: list[str | None] = [*message_ids] or [None]
    filters = [
        AuditFilter(since=since, until=until, correlation_id=correlation_id, message_id=m)
        for m in per_message
    ]
    # what the entries written record of messages, when message lines are written
    recorded = _Recorded() if correlation_id is not None or message_ids else None
    tmp = out.with_name(out.name + ".partial")
    try:
        # owner-only, as the store it copies message bodies from (a left-over temporary file
        # keeps its mode through O_CREAT: set it again)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            writer = _Writer(fh)
            writer.write(
                {
                    "type": "header",
                    "format": FORMAT,
                    "version": VERSION,
                    "origin": audit.origin,
                    "checkpoint": checkpoint.note,
                    "filter": {
                        k: v
                        for k, v in (
                            ("since", since and format_rfc3339(since)),
                            ("until", until and format_rfc3339(until)),
                            ("correlation_id", correlation_id),
                            ("message_ids", message_ids or None),
                        )
                        if v is not None
                    },
                }
            )
            root = checkpoint.root_hash
            pages = _pages(store, filters, size)
            entries = await _write_entries(store, writer, pages, size, root, recorded, progress)
            messages = 0
            if recorded is not None:
                messages = await _write_messages(
                    store, writer, recorded, correlation_id, message_ids
                )
            cosigs = await _write_cosignatures(store, audit, writer, size, root)
            for old_size in dict.fromkeys(prove_from):
                writer.write(
                    {
                        "type": "consistency",
                        "old_size": old_size,
                        "proof": [_b64(h) for h in await audit.consistency_proof(old_size, size)],
                    }
                )
            lines = writer.lines
            end = sign_note(_end_text(audit.origin, lines, writer.digest()), [signer])
            writer.write({"type": "end", "signature": end})
        check_export_target(out)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(
        path=out, size=size, entries=entries, messages=messages, cosignatures=cosigs
    )


async def _pages(
    store: Store, filters: Sequence[AuditFilter], size: int
) -> AsyncIterator[list[AuditRow]]:
    """Pages of the entries below ``size`` matching any of ``filters``, in seq order.

    Several filters are those of several messages (one message id each, so no entry matches
    two): a message has few entries, so each one's are read whole and merged.
    """
    if len(filters) == 1:
        after = -1
        while True:
            page = await store.audit_entries(filters[0], after_seq=after, limit=PAGE)
            rows = [r for r in page if r.seq < size]
            if not rows:
                return
            yield rows
            after = rows[-1].seq
    merged: list[AuditRow] = []
    for filt in filters:
        async for rows in _pages(store, [filt], size):
            merged += rows
    merged.sort(key=lambda row: row.seq)
    for start in range(0, len(merged), PAGE):
        yield merged[start : start + PAGE]


class _Recorded:
    """What the written entries record of messages: the ``(message_id, body_digest)`` pairs
    (a message line is written only for a pair a proven entry records, as ``audit verify``
    asks) and, per message id, the senders named (whose inbound messages to look up)."""

    def __init__(self) -> None:
        self.digests: set[tuple[str, str]] = set()
        self.senders: dict[str, set[str]] = {}

    def add(self, entry: bytes) -> None:
        view = entry_view(entry)
        message_id, digest, sender = (
            view.get("message_id"),
            view.get("body_digest"),
            view.get("sender"),
        )
        if not isinstance(message_id, str):
            return
        senders = self.senders.setdefault(message_id, set())
        if isinstance(sender, str):
            senders.add(sender)
        if isinstance(digest, str):
            self.digests.add((message_id, digest))


async def _write_entries(
    store: Store,
    writer: _Writer,
    pages: AsyncIterator[list[AuditRow]],
    size: int,
    root: bytes,
    recorded: _Recorded | None,
    progress: Callable[[int], object] | None,
) -> int:
    count = 0
    async for rows in pages:
        plans = [merkle.inclusion_plan(r.seq, size) for r in rows]
        nodes = await _proof_nodes(store, [r.seq for r in rows], plans, size)
        for row, plan in zip(rows, plans, strict=True):
            proof = plan.assemble(nodes)
            try:
                merkle.verify_inclusion(row.seq, size, merkle.leaf_hash(row.entry), proof, root)
            except merkle.ProofError as exc:
                raise AuditIntegrityError(
                    f"entry {row.seq} is not in the tree of the checkpoint of size {size} "
                    f"({exc}): the log does not check; no bundle written, run `c2c-gateway "
                    f"audit check` to see what differs"
                ) from None
            writer.write(
                {
                    "type": "entry",
                    "seq": row.seq,
                    "entry": _b64(row.entry),
                    "proof": [_b64(h) for h in proof],
                }
            )
            if recorded is not None:
                recorded.add(row.entry)
        count += len(rows)
        if progress is not None:
            progress(len(rows))
    return count


async def _proof_nodes(
    store: Store, seqs: list[int], plans: list[merkle.Plan], size: int
) -> dict[merkle.NodeKey, bytes]:
    """The subtree hashes of a page's proofs, read as ranges of leaf hashes where dense.

    A full-log export proves every entry: the low levels of neighbouring proofs are then
    recomputed from one range read per aligned block instead of thousands of node lookups;
    only the few upper nodes (and sparse pages' nodes) come from the node table.
    """
    nodes: dict[merkle.NodeKey, bytes] = {}
    per_block: dict[int, int] = {}
    for seq in seqs:
        per_block[seq // BLOCK] = per_block.get(seq // BLOCK, 0) + 1
    for block, count in per_block.items():
        if count < DENSE:
            continue
        start = block * BLOCK
        leaves = await store.audit_leaf_hashes(start, min(start + BLOCK, size))
        nodes.update(merkle.subtree_hashes(leaves, offset=start))
    keys = [k for k in dict.fromkeys(k for p in plans for k in p.node_keys()) if k not in nodes]
    if keys:
        nodes.update(await store.audit_node_hashes(keys))
    return nodes


async def _write_messages(
    store: Store,
    writer: _Writer,
    recorded: _Recorded,
    correlation_id: str | None,
    message_ids: Sequence[str],
) -> int:
    """The archived messages of the case or of the message ids, each whose body digest a
    written entry records (a message of the case outside ``since``/``until`` has none)."""
    count = 0
    async for direction, partner, message_id in _messages_of(
        store, recorded, correlation_id, message_ids
    ):
        record = await _message_record(store, direction, partner, message_id)
        if record is not None and (message_id, record["body_digest"]) in recorded.digests:
            writer.write(record)
            count += 1
    return count


async def _messages_of(
    store: Store, recorded: _Recorded, correlation_id: str | None, message_ids: Sequence[str]
) -> AsyncIterator[tuple[str, str, str]]:
    """``(direction, partner, message_id)`` of the messages to archive: with message ids,
    our outbound message of each id and the inbound one of each sender its entries name (a
    partner's ids are unique per sender only, and may equal ours); else the case's."""
    if message_ids:
        for message_id in message_ids:
            if message_id not in recorded.senders:
                continue
            yield "outbound", "", message_id
            for sender in sorted(recorded.senders[message_id]):
                yield "inbound", sender, message_id
        return
    assert correlation_id is not None
    after: str | None = None
    while True:
        page = await store.list_messages(
            MessageFilter(correlation_id=correlation_id), limit=100, after=after
        )
        for item in page.items:
            yield item.direction.value, item.partner, item.message_id
        if page.next_cursor is None:
            return
        after = page.next_cursor


async def _message_record(
    store: Store, direction: str, partner: str, message_id: str
) -> dict[str, Any] | None:
    if direction == "inbound":
        inbound = await store.get_inbound(partner, message_id)
        if inbound is None:
            return None
        return _message_obj(
            direction,
            message_id,
            inbound.sender,
            inbound.recipient,
            inbound.body,
            inbound.body_digest,
            inbound.signature,
            inbound.receipt_body,
            inbound.receipt_signature,
        )
    outbound = await store.get_outbound(message_id)
    if outbound is None:
        return None
    return _message_obj(
        direction,
        message_id,
        None,
        outbound.recipient,
        outbound.body,
        outbound.body_digest,
        outbound.signature,
        outbound.receipt_body,
        outbound.receipt_signature,
    )


def _message_obj(
    direction: str,
    message_id: str,
    sender: str | None,
    recipient: str,
    body: bytes | None,
    digest: str,
    signature: str,
    receipt_body: bytes | None,
    receipt_signature: str | None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "message",
        "direction": direction,
        "message_id": message_id,
        "recipient": recipient,
        "body_digest": digest,
        "signature": signature,
    }
    for name, value in (
        ("sender", sender),
        ("body", None if body is None else _b64(body)),
        ("receipt_body", None if receipt_body is None else _b64(receipt_body)),
        ("receipt_signature", receipt_signature),
    ):
        if value is not None:
            obj[name] = value
    return obj


async def _write_cosignatures(
    store: Store, audit: AuditLog, writer: _Writer, size: int, root: bytes
) -> int:
    """Per partner, its latest cosignature of a tree within the bundle's: it covers every
    entry below its size, so older ones (one per witnessing round) would add nothing. Each
    consistency proof is checked from the cosigned note's root before it is written."""
    latest = await store.latest_cosignatures(size)
    for cosig in latest:
        partner = cosig.partner
        proof = await audit.consistency_proof(cosig.size, size)
        try:
            cosigned = parse_body(parse_note(cosig.note).text)
            merkle.verify_consistency(cosigned.size, size, cosigned.root_hash, root, proof)
        except (CheckpointError, NoteError, merkle.ProofError) as exc:
            raise AuditIntegrityError(
                f"the checkpoint of size {cosig.size} cosigned by {partner} is not a prefix of "
                f"the tree of size {size} ({exc}): the log does not check; no bundle written, "
                f"run `c2c-gateway audit check` to see what differs"
            ) from None
        writer.write(
            {
                "type": "cosignature",
                "partner": cosig.partner,
                "note": cosig.note,
                "consistency_proof": [_b64(h) for h in proof],
            }
        )
    return len(latest)


# ---------------------------------------------------------------- offline verification


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    #: 1-based line of the bundle
    line: int | None
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}" if self.line is not None else self.what


@dataclass(kw_only=True, slots=True)
class BundleReport:
    origin: str | None = None
    size: int | None = None
    entries: int = 0
    messages: int = 0
    #: cosignature lines whose partner signature was verified with that partner's witness key
    cosignatures: int = 0
    #: partners of cosignature lines not checked: no witness key was given for them
    unchecked_cosignatures: list[str] = field(default_factory=list)
    #: sizes of the kept checkpoints the bundle's tree was shown to extend
    kept_sizes: list[int] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, line: int | None, what: str) -> None:
        self.failures.append(Failure(line=line, what=what))


class _BadLine(Exception):
    pass


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadLine(f"field {name!r} is missing or not a {kind.__name__}")
    return value


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _BadLine(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _BadLine(f"{what} is not valid base64") from None


def _hashes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list):
        raise _BadLine(f"{what} is not a list")
    return [_unb64(h, f"{what}[{i}]") for i, h in enumerate(value)]


#: a partner's cosignature verifier for the key name its signature line carries
WitnessKey = Callable[[str], NoteVerifier]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Filter:
    since: datetime | None = None
    until: datetime | None = None
    correlation_id: str | None = None
    message_ids: frozenset[str] | None = None

    @property
    def empty(self) -> bool:
        return (
            self.since is None
            and self.until is None
            and self.correlation_id is None
            and self.message_ids is None
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Kept:
    label: str
    size: int
    root: bytes


@dataclass(kw_only=True, slots=True)
class _State:
    key: NoteVerifier
    witness_keys: Mapping[str, WitnessKey]
    origin: str = ""
    size: int = 0
    root: bytes = b""
    filter: _Filter = field(default_factory=_Filter)
    last_seq: int = -1
    digests: set[tuple[str, str]] = field(default_factory=set)
    messages: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    #: partners named by cosignature lines
    cosigned: set[str] = field(default_factory=set)
    #: kept checkpoints smaller than the bundle's, checked once the bundle is read
    kept: list[_Kept] = field(default_factory=list)
    #: consistency lines: old size -> proof
    consistency: dict[int, list[bytes]] = field(default_factory=dict)
    #: the first ``prefix`` leaves (seqs 0..prefix-1 without a gap), as a compact range; only
    #: kept while a kept checkpoint's size is still ahead
    prefix: int = 0
    frontier: dict[merkle.NodeKey, bytes] = field(default_factory=dict)
    #: root of the first n leaves, for each kept size n the prefix reached
    prefix_roots: dict[int, bytes] = field(default_factory=lambda: {0: merkle.EMPTY_ROOT})


def verify_bundle(
    path: Path,
    public_key: Callable[[str], NoteVerifier],
    *,
    witness_keys: Mapping[str, WitnessKey] | None = None,
    kept: Sequence[KeptCheckpoint] = (),
    progress: Callable[[int], object] | None = None,
) -> BundleReport:
    """Check a bundle offline, reading it once (it may be a pipe).

    ``public_key(origin)`` gives the log's verifier for its origin (NoteError when the origin
    cannot name a log). ``witness_keys`` maps a partner to its cosignature verifier: each
    such partner must have a cosignature line that verifies with it; a cosignature line of a
    partner without one is counted as not checked. ``kept`` are checkpoint notes of the same
    log the auditor kept from earlier bundles: the bundle's tree must extend each of them.
    """
    report = BundleReport()
    running = hashlib.sha256()
    state: _State | None = None
    ended = False
    crlf = False
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if ended:
                report.fail(number, "data after the end line")
                break
            if raw.endswith(b"\r\n"):
                # a text-mode transfer converted the line endings: said once, and the lines
                # read as they were exported, so that nothing else is blamed on it
                if not crlf:
                    report.fail(number, _CRLF)
                    crlf = True
                raw = raw[:-2] + b"\n"
            try:
                obj, canonical = _parse_line(raw)
                if not canonical and (state is not None or number == 1):
                    # still read: its entry is there, only its bytes are not the exported ones
                    report.fail(number, "line is not in RFC 8785 canonical form")
                kind = obj.get("type")
                if number == 1:
                    if kind != "header":
                        raise _BadLine("the first line is not the bundle header")
                    state = _header(obj, public_key, witness_keys or {}, kept, report)
                elif state is None:
                    # nothing can be checked against an unproven checkpoint; the lines are
                    # only read to tell a complete bundle from a truncated one
                    ended = kind == "end"
                elif kind == "entry":
                    _entry(obj, state, report, number)
                    if progress is not None:
                        progress(1)
                elif kind == "message":
                    state.messages.append((number, obj))
                elif kind == "cosignature":
                    _cosignature(obj, state, report, number)
                elif kind == "consistency":
                    _consistency(obj, state, number)
                elif kind == "end":
                    # an end line that fails its own check still ends the bundle
                    ended = True
                    _end(obj, state, running.digest(), number - 1, report, number)
                else:
                    raise _BadLine(f"unknown line type {kind!r}")
            except _BadLine as exc:
                if state is not None or number == 1:
                    report.fail(number, str(exc))
            running.update(raw)
    if state is not None:
        for number, obj in state.messages:
            _message(obj, state, report, number)
        _finish(state, report)
    if not ended:
        report.fail(None, "bundle is truncated: it has no end line")
    # in line order (messages are checked once every entry is read), the bundle's own last
    report.failures.sort(key=lambda f: (f.line is None, f.line or 0))
    return report


_CRLF = (
    "the bundle has CRLF line endings (converted in transfer?): its lines end with \\n alone; "
    "the rest is checked as if they did"
)


def _parse_line(raw: bytes) -> tuple[dict[str, Any], bool]:
    """The line's JSON object and whether the line is its RFC 8785 form."""
    if not raw.endswith(b"\n"):
        raise _BadLine("line does not end with a newline (truncated bundle?)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadLine("line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _BadLine("line is not a JSON object")
    try:
        return obj, _line(obj) == raw
    except rfc8785.CanonicalizationError as exc:
        raise _BadLine(f"line has a value RFC 8785 cannot represent: {exc}") from None


def _header(
    obj: dict[str, Any],
    public_key: Callable[[str], NoteVerifier],
    witness_keys: Mapping[str, WitnessKey],
    kept: Sequence[KeptCheckpoint],
    report: BundleReport,
) -> _State:
    if obj.get("format") != FORMAT or obj.get("version") != VERSION:
        raise _BadLine(f"not a {FORMAT} version {VERSION} header")
    origin = _field(obj, "origin", str)
    note = _field(obj, "checkpoint", str)
    try:
        key = public_key(origin)
        body = open_checkpoint(note, key, origin=origin).body
    except (CheckpointError, NoteError) as exc:
        raise _BadLine(f"checkpoint: {exc}") from None
    report.origin, report.size = origin, body.size
    state = _State(
        key=key,
        witness_keys=witness_keys,
        origin=origin,
        size=body.size,
        root=body.root_hash,
        filter=_read_filter(obj.get("filter")),
    )
    for item in kept:
        _kept(item, state, report)
    return state


_FILTER_STRINGS = ("since", "until", "correlation_id")
_FILTER_KEYS = (*_FILTER_STRINGS, "message_ids")


def _read_filter(value: Any) -> _Filter:
    """The header's filter: an object of ``since``/``until`` (RFC 3339 UTC),
    ``correlation_id`` (a string) and ``message_ids`` (a non-empty list of strings), each
    absent when unused."""
    if not isinstance(value, dict):
        raise _BadLine("filter is missing or not an object")
    unknown = sorted(set(value) - set(_FILTER_KEYS))
    if unknown:
        raise _BadLine(f"filter has keys verify cannot check: {', '.join(unknown)}")
    for name in _FILTER_STRINGS:
        if name in value and not isinstance(value[name], str):
            raise _BadLine(f"filter {name} is not a string")
    message_ids = value.get("message_ids")
    if message_ids is not None and (
        not isinstance(message_ids, list)
        or not message_ids
        or not all(isinstance(m, str) for m in message_ids)
    ):
        raise _BadLine("filter message_ids is not a non-empty list of strings")
    times: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        try:
            times[name] = parse_rfc3339(value[name]) if name in value else None
        except TimestampError:
            raise _BadLine(f"filter {name} {value[name]!r} is not an RFC 3339 UTC time") from None
    return _Filter(
        since=times["since"],
        until=times["until"],
        correlation_id=value.get("correlation_id"),
        message_ids=None if message_ids is None else frozenset(message_ids),
    )


def _kept(item: KeptCheckpoint, state: _State, report: BundleReport) -> None:
    where = f"kept checkpoint {item.label}"
    try:
        body = open_checkpoint(item.note, state.key, origin=state.origin).body
    except (CheckpointError, NoteError) as exc:
        report.fail(None, f"{where}: not a checkpoint of this log ({state.origin}): {exc}")
        return
    where += f" (size {body.size})"
    if body.size > state.size:
        report.fail(
            None,
            f"{where} is larger than the bundle's checkpoint (size {state.size}): the log shrank",
        )
    elif body.size == state.size:
        if body.root_hash != state.root:
            report.fail(
                None, f"{where}: fork: the bundle's checkpoint has the same size and another root"
            )
        else:
            report.kept_sizes.append(body.size)
    else:
        state.kept.append(_Kept(label=where, size=body.size, root=body.root_hash))


def _entry(obj: dict[str, Any], state: _State, report: BundleReport, number: int) -> None:
    seq = _field(obj, "seq", int)
    if seq <= state.last_seq:
        report.fail(number, f"entry {seq} is out of order (after entry {state.last_seq})")
    elif state.filter.empty and seq > state.last_seq + 1:
        report.fail(number, _missing(state.last_seq + 1, state.size))
    state.last_seq = max(state.last_seq, seq)
    data = _unb64(obj.get("entry"), f"entry {seq}")
    proof = _hashes(obj.get("proof"), f"entry {seq} proof")
    report.entries += 1
    leaf = merkle.leaf_hash(data)
    try:
        merkle.verify_inclusion(seq, state.size, leaf, proof, state.root)
    except merkle.ProofError as exc:
        report.fail(number, f"entry {seq} is not in the checkpoint's tree: {exc}")
        return
    _extend_prefix(state, seq, leaf)
    try:
        entry = orjson.loads(data)
    except orjson.JSONDecodeError:
        entry = None
    outside = _outside_filter(entry, state.filter)
    if outside is not None:
        report.fail(number, f"entry {seq} is outside the bundle's filter: {outside}")
    if isinstance(entry, dict):
        message_id, digest = entry.get("message_id"), entry.get("body_digest")
        if isinstance(message_id, str) and isinstance(digest, str):
            state.digests.add((message_id, digest))


def _missing(seq: int, size: int) -> str:
    return f"entry {seq} is missing: an unfiltered bundle holds every entry from 0 to {size - 1}"


def _outside_filter(entry: Any, filt: _Filter) -> str | None:
    """Why a proven entry does not match the header's filter (None when it does)."""
    if filt.empty:
        return None
    if not isinstance(entry, dict):
        return "it is not a JSON object"
    if filt.correlation_id is not None and entry.get("correlation_id") != filt.correlation_id:
        return f"its correlation_id is not {filt.correlation_id}"
    message_id = entry.get("message_id")
    if filt.message_ids is not None and not (
        isinstance(message_id, str) and message_id in filt.message_ids
    ):
        wanted = ", ".join(sorted(filt.message_ids))
        return f"its message_id is not {'one of ' if len(filt.message_ids) > 1 else ''}{wanted}"
    if filt.since is None and filt.until is None:
        return None
    text = entry.get("at")
    try:
        at = parse_rfc3339(text)
    except TimestampError:
        return f"its time {str(text)[:40]!r} is not an RFC 3339 UTC time"
    if filt.since is not None and at < filt.since:
        return f"its time {text} is before {format_rfc3339(filt.since)}"
    if filt.until is not None and at >= filt.until:
        return f"its time {text} is not before {format_rfc3339(filt.until)}"
    return None


def _extend_prefix(state: _State, seq: int, leaf: bytes) -> None:
    """Fold a proven leaf into the compact range of the bundle's first leaves, while it
    continues them and a kept checkpoint's size is still ahead."""
    if seq != state.prefix or not any(k.size > seq for k in state.kept):
        return
    known = {**state.frontier, **merkle.append_nodes(seq, state.frontier, [leaf])}
    state.prefix = seq + 1
    state.frontier = {key: known[key] for key in merkle.frontier(state.prefix)}
    if any(k.size == state.prefix for k in state.kept):
        state.prefix_roots[state.prefix] = merkle.root_from_nodes(state.prefix, state.frontier)


def _consistency(obj: dict[str, Any], state: _State, number: int) -> None:
    old_size = _field(obj, "old_size", int)
    if not 0 <= old_size <= state.size:
        raise _BadLine(
            f"consistency proof from size {old_size}: not a size of the bundle's tree "
            f"(size {state.size})"
        )
    if old_size in state.consistency:
        raise _BadLine(f"second consistency proof from size {old_size}")
    state.consistency[old_size] = _hashes(
        obj.get("proof"), f"consistency proof from size {old_size}"
    )


def _finish(state: _State, report: BundleReport) -> None:
    """The checks that need the whole bundle read: completeness, witnesses, kept notes."""
    if state.filter.empty and state.last_seq < state.size - 1:
        report.fail(None, _missing(state.last_seq + 1, state.size))
    for partner in sorted(set(state.witness_keys) - state.cosigned):
        report.fail(None, f"no cosignature of {partner} in the bundle")
    for kept in state.kept:
        proof = state.consistency.get(kept.size)
        prefix_root = state.prefix_roots.get(kept.size)
        if proof is not None:
            try:
                merkle.verify_consistency(kept.size, state.size, kept.root, state.root, proof)
            except merkle.ProofError as exc:
                report.fail(None, f"{kept.label}: fork: {exc}")
                continue
        if prefix_root is not None and prefix_root != kept.root:
            report.fail(
                None,
                f"{kept.label}: fork: the root of the bundle's first {kept.size} entries "
                f"is not the kept root",
            )
        elif proof is None and prefix_root is None:
            if state.filter.empty:
                # an unfiltered bundle holds them all: its own failures (named) are the cause
                report.fail(
                    None,
                    f"{kept.label} cannot be checked against this bundle: not every entry "
                    f"below {kept.size} is there and proven (see the failures above)",
                )
            else:
                report.fail(
                    None,
                    f"{kept.label} cannot be checked against this filtered bundle: it holds "
                    f"not every proven entry below {kept.size} and no consistency proof from "
                    f"{kept.size}; export it unfiltered or with --prove-from {kept.size}",
                )
        else:
            report.kept_sizes.append(kept.size)


def _message(obj: dict[str, Any], state: _State, report: BundleReport, number: int) -> None:
    try:
        message_id = _field(obj, "message_id", str)
        claimed = _field(obj, "body_digest", str)
        report.messages += 1
        if (message_id, claimed) not in state.digests:
            report.fail(
                number, f"message {message_id}: no proven audit entry records digest {claimed}"
            )
            return
        if "body" in obj:
            body = _unb64(obj["body"], f"message {message_id} body")
            if body_digest(body) != claimed:
                report.fail(number, f"message {message_id}: wire bytes do not match {claimed}")
    except _BadLine as exc:
        report.fail(number, str(exc))


def _cosignature(obj: dict[str, Any], state: _State, report: BundleReport, number: int) -> None:
    partner = _field(obj, "partner", str)
    state.cosigned.add(partner)
    note = _field(obj, "note", str)
    proof = _hashes(obj.get("consistency_proof"), f"cosignature of {partner} proof")
    try:
        body = open_checkpoint(note, state.key, origin=state.origin).body
        # a line of the log's own key, however often repeated or renamed, is nobody's
        # cosignature
        others = [
            s for s in parse_note(note).signatures if not _is_log_key(s, state.key, state.origin)
        ]
        if not others:
            raise _BadLine(f"checkpoint of size {body.size} carries no cosignature of {partner}")
        merkle.verify_consistency(body.size, state.size, body.root_hash, state.root, proof)
    except (CheckpointError, NoteError, merkle.ProofError) as exc:
        report.fail(number, f"cosignature of {partner}: {exc}")
        return
    witness_key = state.witness_keys.get(partner)
    if witness_key is None:
        report.unchecked_cosignatures.append(partner)
        return
    for sig in others:
        try:
            verify_note(note, [witness_key(sig.name)])
        except NoteError:
            continue
        report.cosignatures += 1
        return
    report.fail(
        number,
        f"cosignature of {partner} (size {body.size}): no signature line verifies with "
        f"{partner}'s witness key",
    )


def _is_log_key(sig: NoteSignature, log_key: NoteVerifier, origin: str) -> bool:
    """A signature line of the log key: named by the log's origin, or with the log's own key
    id (the key under its origin), or with the log key's id under the line's name (as a
    note signature or a cosignature)."""
    return (
        sig.name in (origin, log_key.name)
        or sig.key_id == key_id(origin, SIG_ED25519, log_key.public_raw)
        or any(
            sig.key_id == key_id(sig.name, sig_type, log_key.public_raw)
            for sig_type in (SIG_ED25519, SIG_COSIGNATURE_V1)
        )
    )


def _end(
    obj: dict[str, Any],
    state: _State,
    digest: bytes,
    lines: int,
    report: BundleReport,
    number: int,
) -> None:
    note = _field(obj, "signature", str)
    try:
        verify_note(note, [state.key])
        text = parse_note(note).text
    except NoteError as exc:
        raise _BadLine(f"end signature: {exc}") from None
    if text != _end_text(state.origin, lines, digest):
        report.fail(number, "end signature does not cover these lines: the bundle was altered")
