"""``c2c-gateway audit``: query the log, get proofs, sign checkpoints, export and verify bundles.

``audit verify`` is offline: it needs only a bundle and the gateway's audit public key, and
names exactly which line, entry or checkpoint fails. The other commands open the store of a
gateway configuration.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import getpass
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import orjson
from tqdm import tqdm

from gateway.audit import merkle
from gateway.audit.bundle import (
    ExportSummary,
    ExportTargetError,
    check_export_target,
    export_bundle,
    verify_bundle,
)
from gateway.audit.checkpoint import CheckpointError, KeptCheckpoint, open_checkpoint
from gateway.audit.events import AuditEvent, EventKind, entry_view
from gateway.audit.log import AuditIntegrityError, AuditLog
from gateway.audit.witnessing import offer_checkpoints
from gateway.cli.send import uuid_option
from gateway.clock import SystemClock, format_rfc3339
from gateway.config import GatewayConfig, load_config
from gateway.crypto.notes import (
    NoteError,
    NoteSigner,
    NoteVerifier,
    load_note_signer,
    load_note_verifier,
    note_in_file,
    parse_note,
)
from gateway.envelope import TimestampError, TimestampOutOfRange, parse_rfc3339_bound
from gateway.errors import ConfigError, GatewayError
from gateway.model import is_party_id
from gateway.store import InvalidStoreUrl, Store, open_store
from gateway.store.base import AuditFilter

T = TypeVar("T")
#: the highest ``--after`` cursor: the API's bound for ``after``, within the stores' 64-bit seq
MAX_SEQ = 2**62


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        _fail(str(exc))
    except (GatewayError, InvalidStoreUrl) as exc:
        _fail(f"store: {exc}")
    except (merkle.ProofError, CheckpointError, AuditIntegrityError) as exc:
        _fail(str(exc))


#: the option help's note on ``--since``/``--until`` finer than entries' times
_ROUNDED = (
    "Entries carry milliseconds: a time with sub-millisecond digits is rounded up to the "
    "next millisecond."
)


def _parse_time(value: str | None, option: str) -> datetime | None:
    """An RFC 3339 UTC time, read as the API's ``since``/``until``: rounded up to the next
    millisecond when it has sub-millisecond digits (``parse_rfc3339_bound``)."""
    if value is None:
        return None
    try:
        return parse_rfc3339_bound(value)
    except TimestampOutOfRange as exc:
        _fail(f"{option}: {value!r} {exc}")
    except TimestampError:
        _fail(f"{option}: {value!r} is not an RFC 3339 UTC time (e.g. 2026-03-01T00:00:00Z)")


class _Opened:
    def __init__(self, config: GatewayConfig, store: Store, signer: NoteSigner) -> None:
        self.config = config
        self.store = store
        self.signer = signer
        self.audit = AuditLog(store, signer=signer, clock=SystemClock())


_Loaded = tuple[GatewayConfig, NoteSigner]


def _load(config_path: Path) -> _Loaded:
    """The configuration and the log's key, loaded before anything else runs (exit 2 when
    they do not load)."""
    try:
        config = load_config(config_path)
        return config, load_note_signer(config.audit.key, config.audit.origin)
    except ConfigError as exc:
        _fail(str(exc))


@asynccontextmanager
async def _open(loaded: _Loaded) -> AsyncIterator[_Opened]:
    config, signer = loaded
    store = open_store(
        config.store_url, clock=SystemClock(), timeout_s=config.limits.store_timeout_s
    )
    await store.open()
    try:
        yield _Opened(config, store, signer)
    finally:
        await store.close()


def _party_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not is_party_id(value):
        raise click.BadParameter(f"{value[:60]!r} is not a party id (CC-AGENCY)")
    return value


def _uuids_option(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    for value in values:
        uuid_option(ctx, param, value)
    return values


def _config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_path",
        required=True,
        type=click.Path(path_type=Path, dir_okay=False),
        help="The gateway configuration (gateway.toml).",
    )(func)


def _progress_bar(total: int | None, enabled: bool, desc: str) -> tqdm[Any]:
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="entry", desc=desc)


@click.group()
def audit() -> None:
    """The tamper-evident audit log: entries, proofs, checkpoints, bundles."""


@audit.command("query")
@_config_option
@click.option("--since", help=f"Entries at or after this RFC 3339 UTC time. {_ROUNDED}")
@click.option("--until", help=f"Entries before this RFC 3339 UTC time. {_ROUNDED}")
@click.option("--partner", callback=_party_option, help="Sender or recipient party id.")
@click.option("--type", "message_type", help="Message type.")
@click.option("--message-id", callback=uuid_option, help="Message id (a lowercase UUID).")
@click.option("--outcome", help="Outcome (ACK, a NACK code, a state word).")
@click.option("--event", type=click.Choice([kind.value for kind in EventKind]), help="Event kind.")
@click.option(
    "--correlation-id", callback=uuid_option, help="Correlation id of a case or conversation."
)
@click.option(
    "--after",
    "after_seq",
    type=click.IntRange(-1, MAX_SEQ),
    default=-1,
    show_default=True,
    help="Seq cursor: entries after this seq.",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
def query_command(
    config_path: Path,
    since: str | None,
    until: str | None,
    partner: str | None,
    message_type: str | None,
    message_id: str | None,
    outcome: str | None,
    event: str | None,
    correlation_id: str | None,
    after_seq: int,
    limit: int,
) -> None:
    """Print matching entries, one JSON object per line ({"seq", "leaf_hash", "entry"}; the
    leaf hash in base64, as the API and `audit proof` give it). When more match than
    --limit, the last line on stderr says how to get the next page."""
    filt = AuditFilter(
        since=_parse_time(since, "--since"),
        until=_parse_time(until, "--until"),
        partner=partner,
        message_type=message_type,
        message_id=message_id,
        outcome=outcome,
        event=event,
        correlation_id=correlation_id,
    )

    loaded = _load(config_path)

    async def run() -> None:
        async with _open(loaded) as opened:
            # one more than asked: whether there is a next page, said only when there is
            rows = await opened.store.audit_entries(filt, after_seq=after_seq, limit=limit + 1)
        for row in rows[:limit]:
            line = {
                "seq": row.seq,
                "leaf_hash": base64.b64encode(row.leaf_hash).decode(),
                "entry": entry_view(row.entry),
            }
            click.echo(orjson.dumps(line).decode())
        if len(rows) > limit:
            click.echo(f"more: --after {rows[limit - 1].seq}", err=True)

    _run(run())


@audit.command("proof")
@_config_option
@click.option("--index", type=int, help="Inclusion proof of this entry (seq).")
@click.option("--old-size", type=int, help="Consistency proof from this tree size.")
@click.option("--size", type=int, help="Tree size (default: the current one).")
def proof_command(
    config_path: Path, index: int | None, old_size: int | None, size: int | None
) -> None:
    """Print an inclusion (--index) or consistency (--old-size) proof as JSON (base64 hashes)."""
    if (index is None) == (old_size is None):
        _fail("give exactly one of --index or --old-size")
    loaded = _load(config_path)

    async def run() -> dict[str, Any]:
        async with _open(loaded) as opened:
            if index is not None:
                proof = await opened.audit.inclusion_proof(index, size)
                return {
                    "index": proof.index,
                    "size": proof.size,
                    "leaf_hash": base64.b64encode(proof.leaf_hash).decode(),
                    "root_hash": base64.b64encode(proof.root_hash).decode(),
                    "proof": [base64.b64encode(h).decode() for h in proof.hashes],
                }
            assert old_size is not None
            new_size, root = await opened.audit.root(size)
            _, old_root = await opened.audit.root(old_size)
            hashes = await opened.audit.consistency_proof(old_size, new_size)
            return {
                "old_size": old_size,
                "size": new_size,
                "old_root_hash": base64.b64encode(old_root).decode(),
                "root_hash": base64.b64encode(root).decode(),
                "proof": [base64.b64encode(h).decode() for h in hashes],
            }

    click.echo(orjson.dumps(_run(run()), option=orjson.OPT_INDENT_2).decode())


@audit.command("checkpoint")
@_config_option
@click.option(
    "--send",
    is_flag=True,
    help="Also queue it as audit.checkpoint to every partner with an [audit] key (witnessing).",
)
def checkpoint_command(config_path: Path, send: bool) -> None:
    """Sign a checkpoint of the current tree now and print its note."""
    loaded = _load(config_path)

    async def run() -> tuple[str, list[tuple[str, str]]]:
        async with _open(loaded) as opened:
            # an on-demand checkpoint is an operator action, recorded in the tree it signs
            await opened.store.append_audit(
                [
                    AuditEvent(
                        event=EventKind.OPERATOR_ACTION,
                        at=SystemClock().now(),
                        outcome="audit_checkpoint",
                        actor=f"cli:{getpass.getuser()}",
                        reason="checkpoint --send" if send else "checkpoint",
                    )
                ]
            )
            # Signed here first, so a log that contradicts its last checkpoint fails loudly.
            note = (await opened.audit.checkpoint()).note
            if not send:
                return note, []
            offered = await offer_checkpoints(opened.config, opened.store)
            return note, [(r.recipient, r.message_id) for r in offered]

    note, offered = _run(run())
    click.echo(note, nl=False)
    for partner, message_id in offered:
        click.echo(f"queued audit.checkpoint {message_id} for {partner}", err=True)


@audit.command("check")
@_config_option
@click.option(
    "--trusted",
    "trusted_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="NOTE",
    help="A checkpoint note of this log kept from earlier; it must still be a prefix of the "
    "log (repeatable). A file that is not a note signed by the log's key is refused (exit 2) "
    "before the check.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
def check_command(
    config_path: Path, trusted_paths: tuple[Path, ...], progress: bool | None
) -> None:
    """Recompute the whole stored log and compare it with its tree and signed checkpoints."""
    loaded = _load(config_path)
    log_key = loaded[1].verifier
    # the operator's files, checked before the log is read: a bad one is no problem of the
    # log, and nothing is recorded for it
    trusted = [_trusted_checkpoint(path, log_key) for path in trusted_paths]
    show = sys.stderr.isatty() if progress is None else progress

    async def run() -> tuple[bool, list[str], int, int]:
        async with _open(loaded) as opened:
            size = await opened.store.audit_size()
            with _progress_bar(size, show, "checking") as bar:
                report = await opened.audit.verify_store(trusted=trusted, progress=bar.update)
            # an auditor's read of the store is an operator action, recorded with its verdict;
            # a log too damaged to take it must still get its verdict printed
            action = AuditEvent(
                event=EventKind.OPERATOR_ACTION,
                at=SystemClock().now(),
                outcome="audit_check",
                actor=f"cli:{getpass.getuser()}",
                reason=f"check: {report.checked} entries, {report.problem_count} problem(s)",
            )
            try:
                await opened.store.append_audit([action])
            except GatewayError as exc:
                click.echo(f"warning: the check was not recorded in the log: {exc}", err=True)
        lines = [str(p) for p in report.problems]
        return report.ok, lines, report.checked, report.problem_count

    ok, lines, checked, count = _run(run())
    for line in lines:
        click.echo(f"FAIL {line}", err=True)
    if not ok:
        _fail(f"audit log check failed: {count} problem(s) in {checked} entries", code=1)
    click.echo(f"OK {checked} entries match their tree and signed checkpoints")


def _note_file(path: Path, where: str) -> str:
    """The signed note in an operator's file, read as ``note_in_file`` reads it; exit 2
    naming the file when it cannot be read or holds no note."""
    try:
        # bytes, not text mode: which line endings to read as newlines is note_in_file's rule
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        _fail(f"{where}: the file is not UTF-8 text, so no checkpoint note")
    except OSError as exc:
        _fail(f"{where}: cannot read the checkpoint note: {exc.strerror or exc}")
    try:
        return note_in_file(text)
    except NoteError as exc:
        _fail(f"{where}: {exc}")


def _trusted_checkpoint(path: Path, log_key: NoteVerifier) -> KeptCheckpoint:
    """A ``--trusted`` note: this log's checkpoint, signed by its key (exit 2 otherwise)."""
    where = f"--trusted {path}"
    note = _note_file(path, where)
    try:
        open_checkpoint(note, log_key, origin=log_key.name)
    except CheckpointError as exc:
        _fail(
            f"{where}: not a checkpoint note of this log ({log_key.name}) signed by its key: {exc}"
        )
    return KeptCheckpoint(label=str(path), note=note)


@audit.command("export")
@_config_option
@click.option(
    "--out",
    "out",
    default="-",
    show_default=True,
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="The bundle file (written beside it and renamed into place), or - for stdout (the "
    "bundle is checked in full before a byte of it is written there).",
)
@click.option(
    "--since",
    help=f"Entries at or after this RFC 3339 UTC time. {_ROUNDED} The bundle's filter "
    "records the time applied.",
)
@click.option(
    "--until",
    help=f"Entries before this RFC 3339 UTC time. {_ROUNDED} The bundle's filter records "
    "the time applied.",
)
@click.option(
    "--correlation-id",
    callback=uuid_option,
    help="A case (a lowercase UUID): its entries, messages, signatures, receipts.",
)
@click.option(
    "--message-id",
    "message_ids",
    multiple=True,
    callback=_uuids_option,
    metavar="ID",
    help="A message (a lowercase UUID): its entries, and its wire bytes, signature and "
    "receipt (repeatable: the entries of any of them).",
)
@click.option(
    "--prove-from",
    "prove_from",
    multiple=True,
    type=click.IntRange(0, MAX_SEQ),
    metavar="SIZE",
    help="Add a consistency proof from this earlier tree size (the size of a checkpoint an "
    "auditor kept) to the bundle's checkpoint, so `audit verify --checkpoint` can check a "
    "filtered bundle against it (repeatable).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
def export_command(
    config_path: Path,
    out: Path,
    since: str | None,
    until: str | None,
    correlation_id: str | None,
    message_ids: tuple[str, ...],
    prove_from: tuple[int, ...],
    progress: bool | None,
) -> None:
    """Write an evidence bundle that `audit verify` checks offline (to stdout by default).

    Every entry's proof is checked against the fresh checkpoint before the bundle is
    renamed into place or written out: a log that does not check gets no bundle (exit 2)."""
    since_at, until_at = _parse_time(since, "--since"), _parse_time(until, "--until")
    show = sys.stderr.isatty() if progress is None else progress
    export = functools.partial(
        _export,
        config_path,
        since=since,
        until=until,
        since_at=since_at,
        until_at=until_at,
        correlation_id=correlation_id,
        message_ids=message_ids,
        prove_from=prove_from,
        show=show,
    )
    if out == Path("-"):
        # into a private directory first: the bundle is whole and checked before stdout
        # gets any of it, and the summary goes to stderr, out of the bundle's way
        with tempfile.TemporaryDirectory(prefix="c2c-export-") as tmp:
            summary = export(Path(tmp) / "bundle.jsonl")
            _owner_only_stdout()
            try:
                with summary.path.open("rb") as fh:
                    shutil.copyfileobj(fh, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                # the reader went away (| head): nothing more to say to it, nor at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                _fail("stdout closed before the whole bundle was written", code=1)
            except OSError as exc:
                _fail(f"stdout: cannot write bundle: {exc.strerror or exc}")
        click.echo(_exported("the bundle to stdout", summary), err=True)
        return
    # refused before the export is recorded; export_bundle checks again before its rename
    try:
        check_export_target(out)
    except ExportTargetError as exc:
        _fail(f"--out: {exc} (--out - writes it to stdout)")
    except OSError as exc:
        _fail(f"{out}: cannot write bundle: {exc.strerror or exc}")
    summary = export(out)
    click.echo(_exported(str(summary.path), summary))


def _owner_only_stdout() -> None:
    """Stdout redirected to a file (``> case.jsonl``) gets the bundle's mode, 0600, as
    ``--out`` does: it holds message bodies, and the shell made the file under the umask."""
    fd = sys.stdout.fileno()
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
    except OSError as exc:
        click.echo(
            f"warning: stdout: cannot make the file owner-only ({exc.strerror or exc}); "
            "the bundle holds message bodies",
            err=True,
        )


def _exported(where: str, summary: ExportSummary) -> str:
    return (
        f"wrote {where}: {summary.entries} entries, {summary.messages} messages, "
        f"{summary.cosignatures} cosignatures, checkpoint size {summary.size}"
    )


def _export(
    config_path: Path,
    out: Path,
    *,
    since: str | None,
    until: str | None,
    since_at: datetime | None,
    until_at: datetime | None,
    correlation_id: str | None,
    message_ids: tuple[str, ...],
    prove_from: tuple[int, ...],
    show: bool,
) -> ExportSummary:
    """Record the export as an operator action, then write the bundle to ``out``."""
    loaded = _load(config_path)

    async def run() -> ExportSummary:
        async with _open(loaded) as opened:
            clock = SystemClock()
            named = ([correlation_id] if correlation_id else []) + [
                f"message {m}" for m in dict.fromkeys(message_ids)
            ]
            scope = " ".join(named) or "all"
            # the export is an operator action, recorded before the checkpoint that covers it
            await opened.store.append_audit(
                [
                    AuditEvent(
                        event=EventKind.OPERATOR_ACTION,
                        at=clock.now(),
                        correlation_id=correlation_id,
                        outcome="audit_export",
                        actor=f"cli:{getpass.getuser()}",
                        reason=f"export {scope} since={since or '-'} until={until or '-'}",
                    )
                ]
            )
            with _progress_bar(None, show, "exporting") as bar:
                return await export_bundle(
                    opened.store,
                    opened.audit,
                    opened.signer,
                    out,
                    since=since_at,
                    until=until_at,
                    correlation_id=correlation_id,
                    message_ids=message_ids,
                    prove_from=prove_from,
                    progress=bar.update,
                )

    try:
        return _run(run())
    except ExportTargetError as exc:
        _fail(f"--out: {exc}")
    except OSError as exc:
        _fail(f"{out}: cannot write bundle: {exc.strerror or exc}")


def _witness_key_option(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    for value in values:
        party, sep, path = value.partition("=")
        if not sep or not is_party_id(party) or not path:
            raise click.BadParameter(f"{value[:80]!r} is not PARTY=PATH (e.g. MX-ANAM=mx.pub)")
        if party in keys:
            raise click.BadParameter(f"{party} is given twice")
        keys[party] = Path(path)
    return keys


def _key_loader(path: Path, *, cosignature: bool = False) -> Callable[[str], NoteVerifier]:
    """Verifiers of the key in ``path`` under any key name; the file is read (and refused,
    exit 2) once, here. A name that cannot name a key is the bundle's fault: NoteError."""
    try:
        load_note_verifier(path, "key-check", cosignature=cosignature)
    except ConfigError as exc:
        _fail(str(exc))

    def for_name(name: str) -> NoteVerifier:
        try:
            return load_note_verifier(path, name, cosignature=cosignature)
        except ConfigError as exc:
            raise NoteError(f"{name!r} cannot name a key: {exc.reason}") from None

    return for_name


def _kept_checkpoint(path: Path, key_for: Callable[[str], NoteVerifier]) -> KeptCheckpoint:
    """A kept note, read and checked against ``--key`` under its own origin (exit 2 when it
    is unreadable or not signed by that key): the auditor's own file, not the bundle's fault.
    Whether its origin is the bundle's is the bundle's check."""
    where = f"--checkpoint {path}"
    note = _note_file(path, where)
    try:
        origin = parse_note(note).text.split("\n", 1)[0]
        open_checkpoint(note, key_for(origin), origin=origin)
    except (CheckpointError, NoteError) as exc:
        _fail(f"{where}: not a checkpoint note signed by --key: {exc}")
    return KeptCheckpoint(label=str(path), note=note)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


@audit.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The gateway's audit public key (PEM), e.g. DIR/US-CBP/audit.pub.",
)
@click.option(
    "--witness-key",
    "witness_keys",
    multiple=True,
    callback=_witness_key_option,
    metavar="PARTY=PATH",
    help="A partner's audit public key (PEM) (repeatable): the bundle must hold a cosignature "
    "of that partner that verifies with it. Without one, a partner's cosignature lines are "
    "not checked.",
)
@click.option(
    "--checkpoint",
    "kept_paths",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="NOTE",
    help="A checkpoint note of this log kept from an earlier bundle (its header's "
    "checkpoint): the bundle's tree must extend it (repeatable).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
def verify_command(
    bundle: Path,
    key_path: Path,
    witness_keys: dict[str, Path],
    kept_paths: tuple[Path, ...],
    progress: bool | None,
) -> None:
    """Verify a bundle offline (- reads it from stdin): checkpoint, every inclusion proof,
    order, completeness and filter, wire bytes, cosignatures, kept checkpoints, end seal."""
    shown = "stdin" if bundle == Path("-") else str(bundle)
    if bundle == Path("-"):
        bundle = Path("/dev/stdin")
    show = sys.stderr.isatty() if progress is None else progress
    key_for = _key_loader(key_path)
    witnesses = {p: _key_loader(path, cosignature=True) for p, path in witness_keys.items()}
    kept = [_kept_checkpoint(path, key_for) for path in kept_paths]
    total: int | None = None
    # a pipe (/dev/stdin, <(...)) can be read only once: no line count for the progress bar
    if show and _is_regular_file(bundle):
        try:
            with bundle.open("rb") as fh:
                total = sum(1 for _ in fh)
        except OSError as exc:
            _fail(f"{shown}: cannot read bundle: {exc.strerror or exc}")
    try:
        with _progress_bar(total, show, "verifying") as bar:
            report = verify_bundle(
                bundle, key_for, witness_keys=witnesses, kept=kept, progress=bar.update
            )
    except OSError as exc:
        _fail(f"{shown}: cannot read bundle: {exc.strerror or exc}")
    for failure in report.failures:
        click.echo(f"FAIL {shown}: {failure}", err=True)
    if not report.ok:
        _fail(f"{shown}: verification failed ({len(report.failures)} problem(s))", code=1)
    unchecked = report.unchecked_cosignatures
    cosigned = f"{report.cosignatures} cosignatures verified with witness keys"
    if unchecked:
        partners = ", ".join(sorted(set(unchecked)))
        cosigned += (
            f", {len(unchecked)} cosignature lines not checked: no witness key for {partners}"
        )
    if report.kept_sizes:
        sizes = ", ".join(str(n) for n in report.kept_sizes)
        plural = "s" if len(report.kept_sizes) > 1 else ""
        cosigned += f"; consistent with the kept checkpoint{plural} of size {sizes}"
    click.echo(
        f"OK {shown}: {report.entries} entries, {report.messages} messages proven in "
        f"checkpoint {report.origin} size {report.size}; {cosigned} "
        f"(verified {format_rfc3339(datetime.now(UTC))})"
    )
