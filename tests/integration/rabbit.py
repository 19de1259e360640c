"""The real local RabbitMQ for integration tests: a throwaway vhost per test, removed afterwards.

Vhosts and connections are managed with ``rabbitmqctl`` (the management plugin is not assumed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

HOST = os.environ.get("C2C_TEST_RABBIT_HOST", "127.0.0.1")
PORT = int(os.environ.get("C2C_TEST_RABBIT_PORT", "5672"))
USER = os.environ.get("C2C_TEST_RABBIT_USER", "guest")
PASSWORD = os.environ.get("C2C_TEST_RABBIT_PASSWORD", "guest")


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl not found on PATH: the RabbitMQ tests need it")
    done = subprocess.run(
        [exe, "-q", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class RabbitVhost:
    name: str

    def url(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"amqp://{user}:{password}@{HOST}:{PORT}/{self.name}"

    def close_connections(self, connection_name: str, reason: str = "test") -> int:
        """Force-close this vhost's connections whose client named itself ``connection_name``."""
        out = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
        marker = f'{{"connection_name","{connection_name}"}}'
        closed = 0
        for line in out.splitlines():
            pid, vhost, props = [*line.split("\t", 2), "", ""][:3]
            if vhost == self.name and marker in props:
                rabbitmqctl("close_connection", pid, reason)
                closed += 1
        return closed


def create_vhost() -> RabbitVhost:
    vhost = RabbitVhost(f"c2c-test-{uuid.uuid4().hex[:12]}")
    rabbitmqctl("add_vhost", vhost.name)
    rabbitmqctl("set_permissions", "-p", vhost.name, USER, ".*", ".*", ".*")
    return vhost


def delete_vhost(vhost: RabbitVhost) -> None:
    rabbitmqctl("delete_vhost", vhost.name)
