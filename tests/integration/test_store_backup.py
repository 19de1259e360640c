"""``c2c-gateway store backup`` (the real CLI) against a running gateway's SQLite store: a
consistent, checked, single-file copy taken while messages keep coming in; refusals that
never overwrite or half-write; a damaged log is not passed off as a backup."""

from __future__ import annotations

import asyncio
import getpass
import json
import sqlite3
import sys
from pathlib import Path

from outbound_env import Running
from serve_proc import edit_toml
from test_api_audit import submit

from gateway.api.audit import AUDIT_LOG
from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.crypto.notes import load_note_signer
from gateway.store.base import AuditFilter
from gateway.store.sqlite import SqliteStore

CLI = str(Path(sys.executable).parent / "c2c-gateway")


async def backup(config: Path, dest: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "store",
        "backup",
        "--config",
        str(config),
        str(dest),
        "--no-progress",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def database(running: Running) -> Path:
    return Path(running.config.store_url.removeprefix("sqlite:///"))


async def test_a_backup_of_a_running_gateway_is_consistent_and_checked(
    us: Running, tmp_path: Path
) -> None:
    for _ in range(5):
        await submit(us)
    await us.api.app[AUDIT_LOG].checkpoint()
    before = await us.gateway.store.audit_size()
    stop = asyncio.Event()

    async def keep_submitting() -> int:
        count = 0
        while not stop.is_set():
            await submit(us)
            count += 1
        return count

    writer = asyncio.create_task(keep_submitting())
    dest = tmp_path / "backups" / "c2c-copy.db"
    dest.parent.mkdir()
    code, out, err = await backup(us.config.source, dest)
    stop.set()
    submitted_meanwhile = await writer
    assert code == 0, err
    assert out.startswith(f"OK {dest}: ")
    assert "audit entries verified (last checkpoint size" in out
    assert submitted_meanwhile > 0
    # one self-contained file, nothing left beside it
    assert sorted(p.name for p in dest.parent.iterdir()) == ["c2c-copy.db"]
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    copy = SqliteStore(dest, clock=SystemClock())
    await copy.open()
    try:
        size = await copy.audit_size()
        assert size >= before
        signer = load_note_signer(us.config.audit.key, us.config.audit.origin)
        report = await AuditLog(copy, signer=signer, clock=SystemClock()).verify_store()
        assert report.ok, report.problems
        assert report.checked == size
    finally:
        await copy.close()
    rows = await us.gateway.store.audit_entries(
        AuditFilter(event="operator_action"), after_seq=-1, limit=10
    )
    [entry] = [
        json.loads(r.entry) for r in rows if json.loads(r.entry)["outcome"] == "store_backup"
    ]
    assert entry["actor"] == f"cli:{getpass.getuser()}"
    assert entry["reason"].startswith(f"backup c2c-copy.db: {dest.stat().st_size} bytes, {size}")


async def test_refusals_never_overwrite_or_leave_a_partial_file(
    us: Running, tmp_path: Path
) -> None:
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"someone's file")
    code, _, err = await backup(us.config.source, taken)
    assert (code, err) == (2, f"error: {taken} already exists; a backup never overwrites a file\n")
    assert taken.read_bytes() == b"someone's file"
    code, _, err = await backup(us.config.source, tmp_path / "nowhere" / "x.db")
    assert (code, err.strip()) == (2, f"error: the folder {tmp_path / 'nowhere'} does not exist")

    pg_config = us.config.source.with_name("pg.toml")
    pg_config.write_text(us.config.source.read_text())
    edit_toml(pg_config, 'store_url = "sqlite:///c2c.db"', 'store_url = "postgresql://db/c2c"')
    code, _, err = await backup(pg_config, tmp_path / "pg.db")
    assert code == 2
    assert "back up a PostgreSQL store with pg_dump" in err
    assert not (tmp_path / "pg.db").exists()


async def test_a_damaged_log_is_not_passed_off_as_a_backup(us: Running, tmp_path: Path) -> None:
    for _ in range(3):
        await submit(us)
    with sqlite3.connect(database(us)) as conn:
        # the last submission's entry (which entries the dispatcher wrote around it varies)
        (seq,) = conn.execute(
            "SELECT max(seq) FROM audit_entries WHERE CAST(entry AS TEXT) LIKE '%\"queued\"%'"
        ).fetchone()
        changed = conn.execute(
            "UPDATE audit_entries SET entry = CAST(REPLACE(CAST(entry AS TEXT), 'queued',"
            " 'QUEUED') AS BLOB) WHERE seq = ?",
            (seq,),
        ).rowcount
        assert changed == 1
    dest = tmp_path / "copy.db"
    code, out, err = await backup(us.config.source, dest)
    assert code == 1
    assert out == ""
    assert f"FAIL entry {seq}: entry bytes do not match the stored leaf hash" in err
    assert f"it is kept as {dest}.partial for inspection" in err
    assert not dest.exists()
    assert (tmp_path / "copy.db.partial").exists()
    # the kept copy is evidence: a second try does not remove it
    code, _, err = await backup(us.config.source, dest)
    assert code == 2
    assert err.startswith(f"error: {dest}.partial exists (an interrupted backup")
    assert (tmp_path / "copy.db.partial").exists()
