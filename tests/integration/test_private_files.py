"""What the gateway writes that holds message bodies or passwords is its owner's only, whatever
the umask: the folders it makes (parents included), the SQLite database with its -wal and -shm
files, a store backup, and ``amqp setup``'s password folder (README, "Operating").

Each test runs under umask 022, the common default, which leaves new files world-readable.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from amqp_env import write_config
from click.testing import CliRunner
from outbound_env import Running
from rabbit import RabbitVhost, rabbitmqctl
from test_store import T0, event, inbound
from test_store_backup import backup

from gateway.audit.events import EventKind
from gateway.cli.main import cli
from gateway.clock import ManualClock
from gateway.store.sqlite import SqliteStore

pytestmark = pytest.mark.usefixtures("umask_022")


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_missing_folders_and_the_database_files_are_made_private(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "srv" / "var" / "gw.db", clock=ManualClock(T0))
    with structlog.testing.capture_logs() as logs:
        await store.open()
    try:
        await store.store_inbound(inbound("private"), [event(EventKind.ACCEPTED)])
        var = tmp_path / "srv" / "var"
        modes = {name: _mode(var / name) for name in ("gw.db", "gw.db-wal", "gw.db-shm")}
    finally:
        await store.close()
    assert (_mode(tmp_path / "srv"), _mode(tmp_path / "srv" / "var")) == (0o700, 0o700)
    assert modes == {"gw.db": 0o600, "gw.db-wal": 0o600, "gw.db-shm": 0o600}
    assert logs == []


async def test_an_operators_folder_and_file_keep_their_modes_and_an_open_file_is_said(
    tmp_path: Path,
) -> None:
    """What the operator (or an older version) made is theirs to change: a folder open to
    others gets a private database file, a database file open to others a warning."""
    (tmp_path / "var").mkdir(mode=0o755)
    store = SqliteStore(tmp_path / "var" / "gw.db", clock=ManualClock(T0))
    with structlog.testing.capture_logs() as logs:
        await store.open()
    await store.close()
    assert (_mode(tmp_path / "var"), _mode(tmp_path / "var" / "gw.db"), logs) == (
        0o755,
        0o600,
        [],
    )

    (tmp_path / "var" / "gw.db").chmod(0o644)
    with structlog.testing.capture_logs() as logs:
        await store.open()
    await store.close()
    assert _mode(tmp_path / "var" / "gw.db") == 0o644
    assert logs == [
        {
            "event": "store_file_open_to_others",
            "file": str(tmp_path / "var" / "gw.db"),
            "log_level": "warning",
        }
    ]


@pytest.fixture
def fresh() -> Iterator[tuple[RabbitVhost, str]]:
    """A vhost name and a partner user name that do not exist yet; both removed afterwards."""
    tag = uuid.uuid4().hex[:10]
    vhost, user = RabbitVhost(f"c2c-private-{tag}"), f"mx-anam-{tag}"
    yield vhost, user
    for args in (("delete_vhost", vhost.name), ("delete_user", user)):
        with contextlib.suppress(RuntimeError):
            rabbitmqctl(*args)


@pytest.mark.rabbitmq
async def test_amqp_setup_then_the_store_leave_var_private(
    tmp_path: Path, fresh: tuple[RabbitVhost, str]
) -> None:
    """The documented order on a fresh install: ``amqp setup`` makes var/ (for the partners'
    passwords), then the gateway's store goes in it."""
    vhost, user = fresh
    config = write_config(tmp_path, amqp_url=vhost.url(), amqp_user=user)
    result = CliRunner().invoke(cli, ["amqp", "setup", "--config", str(config), "--no-declare"])
    assert result.exit_code == 0, result.stderr
    var = tmp_path / "var"
    password = var / "amqp-users" / f"{user}.password"
    assert (_mode(var), _mode(var / "amqp-users"), _mode(password)) == (0o700, 0o700, 0o600)

    store = SqliteStore(var / "c2c.db", clock=ManualClock(T0))
    with structlog.testing.capture_logs() as logs:
        await store.open()
    await store.close()
    assert (_mode(var), _mode(var / "c2c.db"), logs) == (0o700, 0o600, [])


async def test_a_store_backup_is_its_owners_only(us: Running, tmp_path: Path) -> None:
    """The copy holds every stored body: the real CLI, a subprocess with the umask above."""
    dest = tmp_path / "backups" / "copy.db"
    dest.parent.mkdir()
    code, out, err = await backup(us.config.source, dest)
    assert code == 0, err
    assert out.startswith(f"OK {dest}: ")
    assert "open_to_others" not in err
    assert _mode(dest) == 0o600
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.db"]
