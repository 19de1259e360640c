"""``c2c-gateway store backup``: a consistent copy of a running gateway's SQLite store.

Copying the database file of a running gateway is not safe (WAL mode: the newest commits live
in the ``-wal`` file until a checkpoint). The backup reads one consistent snapshot through
SQLite's online backup API while the gateway goes on writing. The copy is checked before it is
kept: ``PRAGMA integrity_check``, then the whole audit log recomputed against its Merkle tree
and signed checkpoints. Only then does it get its final name. It is a single self-contained
file (rollback-journal mode), and the backup is recorded in the live log as an operator
action.

A PostgreSQL store is backed up with PostgreSQL's own tools (``pg_dump`` takes a consistent
snapshot while the gateway runs); the command says so instead of copying.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.log import AuditLog
from gateway.cli.send import fail
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.crypto.notes import load_note_signer
from gateway.errors import ConfigError, GatewayError
from gateway.store import InvalidStoreUrl, open_store
from gateway.store.sqlite import SqliteStore

_SQLITE = "sqlite:///"


@dataclass(frozen=True, kw_only=True)
class Verified:
    ok: bool
    entries: int
    checkpoint_size: int | None
    problem_count: int
    problems: list[str]


def _copy(source: Path, target: Path) -> None:
    """One consistent snapshot of ``source`` into ``target``, a new empty file."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one snapshot
            (result,) = dst.execute("PRAGMA integrity_check").fetchone()
            if result != "ok":
                raise sqlite3.DatabaseError(f"the copy fails PRAGMA integrity_check: {result}")
        finally:
            dst.close()
    finally:
        src.close()


def _single_file(target: Path) -> None:
    """Leave the copy in rollback-journal mode, on disk: no -wal file belongs to it."""
    conn = sqlite3.connect(target)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()
    with target.open("rb+") as fh:
        os.fsync(fh.fileno())


async def _verify(target: Path, config: GatewayConfig, show: bool) -> Verified:
    signer = load_note_signer(config.audit.key, config.audit.origin)
    copy = SqliteStore(target, clock=SystemClock())
    await copy.open()
    try:
        size = await copy.audit_size()
        log = AuditLog(copy, signer=signer, clock=SystemClock())
        with tqdm(total=size, disable=not show, file=sys.stderr, unit="entry", desc="checking"):
            report = await log.verify_store()
    finally:
        await copy.close()
    return Verified(
        ok=report.ok,
        entries=report.checked,
        checkpoint_size=report.checkpoint_size,
        problem_count=report.problem_count,
        problems=[str(p) for p in report.problems],
    )


async def _record(config: GatewayConfig, reason: str) -> None:
    live = open_store(
        config.store_url, clock=SystemClock(), timeout_s=config.limits.store_timeout_s
    )
    await live.open()
    try:
        await live.append_audit(
            [
                AuditEvent(
                    event=EventKind.OPERATOR_ACTION,
                    at=SystemClock().now(),
                    outcome="store_backup",
                    actor=f"cli:{getpass.getuser()}",
                    reason=reason,
                )
            ]
        )
    finally:
        await live.close()


@click.group()
def store() -> None:
    """The gateway's store: messages, receipts and the audit log."""


@store.command("backup")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The gateway configuration (gateway.toml).",
)
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
def backup_command(config_path: Path, dest: Path, progress: bool | None) -> None:
    """Copy the SQLite store to DEST while the gateway runs; the copy is checked first."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc))
    url = config.store_url
    if not url.startswith(_SQLITE):
        fail(
            "store backup copies SQLite stores; back up a PostgreSQL store with pg_dump"
            " (for example pg_dump --format=custom), which takes a consistent snapshot while"
            " the gateway runs"
        )
    source = Path(url.removeprefix(_SQLITE))
    if not source.is_file():
        fail(f"the store {source} does not exist")
    if dest.exists():
        fail(f"{dest} already exists; a backup never overwrites a file")
    if not dest.parent.is_dir():
        fail(f"the folder {dest.parent} does not exist")
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        fail(
            f"{partial} exists (an interrupted backup, or a copy kept because its log did not"
            " verify); move it away first"
        )
    show = sys.stderr.isatty() if progress is None else progress
    try:
        # owner only whatever the umask: the copy holds message bodies (its rename keeps that)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        fail(f"backup failed: cannot create {partial}: {exc.strerror or exc}", status=1)
    try:
        _copy(source, partial)
        verified = asyncio.run(_verify(partial, config, show))
        _single_file(partial)
    except (sqlite3.Error, OSError, GatewayError, InvalidStoreUrl) as exc:
        partial.unlink(missing_ok=True)
        fail(f"backup failed: {exc}", status=1)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    for line in verified.problems:
        click.echo(f"FAIL {line}", err=True)
    if not verified.ok:
        # kept under its .partial name: evidence of the damaged log, never taken for a backup
        fail(
            f"the copy's audit log does not verify ({verified.problem_count} problem(s));"
            f" it is kept as {partial} for inspection",
            status=1,
        )
    partial.rename(dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    size = dest.stat().st_size
    checkpoint = verified.checkpoint_size
    reason = (
        f"backup {dest.name}: {size} bytes, {verified.entries} audit entries verified"
        f" (last checkpoint size {checkpoint if checkpoint is not None else 'none'})"
    )
    try:
        asyncio.run(_record(config, reason))
    except (GatewayError, InvalidStoreUrl) as exc:
        click.echo(f"warning: the backup was not recorded in the log: {exc}", err=True)
    click.echo(f"OK {dest}: {reason.split(': ', 1)[1]}")
