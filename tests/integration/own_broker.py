"""A RabbitMQ node of the test's own, for faults the shared broker must never suffer: a full
stop and start. It runs from the installed RabbitMQ with its own node name, ports, data
folder and Erlang cookie (under the test's tmp_path), listens on loopback only, and is
halted when the test ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

#: the real scripts: Debian's /usr/sbin wrappers switch to the rabbitmq user (and its cookie)
_LIB_BIN = Path("/usr/lib/rabbitmq/bin")


def _script(name: str) -> str:
    path = _LIB_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: the broker-restart tests need RabbitMQ installed")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class OwnBroker:
    root: Path
    node: str = field(default_factory=lambda: f"c2c-test-{uuid.uuid4().hex[:8]}@localhost")
    port: int = field(default_factory=_free_port)
    dist_port: int = field(default_factory=_free_port)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        base = self.root
        return {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie of this node and of its rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        }

    def ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_script("rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def start(self, timeout_s: float = 60) -> None:
        subprocess.run(
            [_script("rabbitmq-server"), "-detached"],
            env=self._env(),
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.ctl("await_startup", "--timeout", "30")
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = self.root / "log" / f"{self.node}.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                raise RuntimeError(f"own RabbitMQ node did not start: {done.stderr}\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Halt the node and wait for its process to end (what it persisted stays)."""
        self.ctl("stop", str(self.root / "node.pid"))
