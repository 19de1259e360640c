"""A SQLite store that cannot be opened for want of permissions says what failed, and where.

The store is opened in a process of its own without the permission override root has
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: dropped with capsh or util-linux setpriv), so that the
file system refuses as it would refuse the gateway's own user.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

#: opens the store at argv[1]; prints why it could not, or "opened"
OPEN = """
import asyncio, sys
from pathlib import Path
from gateway.clock import SystemClock
from gateway.errors import Unavailable
from gateway.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]), clock=SystemClock())
    try:
        await store.open()
    except Unavailable as exc:
        print(exc.reason)
        return
    await store.close()
    print("opened")

asyncio.run(main())
"""


def unprivileged() -> list[str]:
    """The command prefix that runs a process without root's permission override."""
    if os.geteuid() != 0:
        return []
    if shutil.which("capsh"):
        drop = "--drop=cap_dac_override,cap_dac_read_search"
        return ["capsh", drop, "--", "-c", 'exec "$0" "$@"']
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    pytest.skip("running as root without capsh or setpriv: no way to drop the override")


def open_store(path: Path) -> str:
    done = subprocess.run(
        [*unprivileged(), sys.executable, "-c", OPEN, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def var(tmp_path: Path) -> Iterator[Path]:
    """The store's directory; writable again afterwards, so that it can be removed."""
    folder = tmp_path / "var"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        folder.chmod(0o700)


def test_the_privilege_is_really_dropped(var: Path) -> None:
    """The premise of the tests below: the subprocess cannot write where its owner may not."""
    var.chmod(0o500)
    probe = "import sys; open(sys.argv[1], 'w')"
    denied = subprocess.run(
        [*unprivileged(), sys.executable, "-c", probe, str(var / "probe")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode != 0
    assert "PermissionError" in denied.stderr


def test_a_database_file_that_cannot_be_created_is_named(var: Path) -> None:
    var.chmod(0o500)  # the directory exists: it is the file that cannot be made
    reason = open_store(var / "c2c.db")
    assert reason == f"sqlite: cannot create the database file {var / 'c2c.db'}: Permission denied"


def test_a_store_directory_that_cannot_be_created_is_named(var: Path) -> None:
    var.chmod(0o500)
    reason = open_store(var / "store" / "c2c.db")
    assert reason == (
        f"sqlite: cannot create the store's directory {var / 'store'}: Permission denied"
    )
    # a missing folder above it, which is what fails, is named too
    reason = open_store(var / "a" / "b" / "c2c.db")
    assert reason == (
        f"sqlite: cannot create the store's directory {var / 'a' / 'b'} ({var / 'a'}):"
        " Permission denied"
    )


def test_a_store_directory_without_room_for_the_wal_is_named(var: Path) -> None:
    """The database file is there and writable (a restored copy, no -wal or -shm beside it),
    but its directory is not: SQLite cannot make the files WAL mode needs."""
    db = var / "c2c.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (a)")
    conn.close()
    db.chmod(0o600)
    assert sorted(p.name for p in var.iterdir()) == ["c2c.db"]
    var.chmod(0o500)
    reason = open_store(db)
    assert reason == (
        f"sqlite: the store's directory {var} is not writable: SQLite needs to create "
        f"{db}-wal and {db}-shm there"
    )
    var.chmod(0o700)
    assert open_store(db) == "opened"


def test_an_unreadable_database_file_is_named(var: Path) -> None:
    db = var / "c2c.db"
    assert open_store(db) == "opened"
    db.chmod(0o000)
    reason = open_store(db)
    assert reason == f"sqlite: {db}: OperationalError: unable to open database file"
