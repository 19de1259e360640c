"""``python -m bench`` (``make bench``): every benchmark, raw baseline and gateway in one run.

Prints one Markdown table per benchmark (baseline, gateway, gateway/baseline) and the target
verdicts. ``BENCH_QUICK=1`` shortens every run (a smoke test of the harness, figures noisier);
``--only NAME`` runs some of them; ``--write FILE`` writes the report (RESULTS.md form).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

import structlog
import uvloop

import gateway
from bench import (
    amqp_inbound,
    amqp_poison,
    attack,
    audit,
    fairness,
    https_inbound,
    outbound,
    stages,
)
from bench.common import QUICK, Table, prepare, sign_messages

NAMES = (
    "https",
    "postgres",
    "amqp",
    "outbound",
    "memory",
    "audit",
    "poison",
    "fairness",
    "attack",
    "stages",
)
#: the checkout whose ``gateway`` package this process imported
CHECKOUT = Path(gateway.__file__).resolve().parent.parent


def same_code_in_children() -> None:
    """Make ``serve`` and the helper processes import the ``gateway`` this process did.

    The venv's editable install resolves ``gateway`` to the checkout it was made from, so a
    benchmark run from another checkout (a worktree of an older commit, for a before/after
    pair) would measure that checkout's code in every child process: PYTHONPATH wins over it.
    """
    paths = [str(CHECKOUT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def code_version() -> str:
    """The commit measured, and whether the checkout had changes on top of it."""
    git = ["git", "-C", str(CHECKOUT)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes" if dirty else "")


def environment() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("aiohttp", "aio-pika", "cryptography", "jsonschema-rs", "orjson", "asyncpg")
    )
    return "\n".join(
        [
            f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
            f"- code: {code_version()}",
            f"- machine: {os.cpu_count()} vCPU {cpu}, {platform.system()} {platform.release()}",
            f"- Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, uvloop "
            f"{metadata.version('uvloop')}",
            f"- libraries: {versions}",
            f"- mode: {'quick (BENCH_QUICK=1)' if QUICK else 'full'}",
        ]
    )


async def run(names: list[str]) -> list[Table]:
    tables: list[Table] = []

    async def step(name: str, body: Callable[[Path], Awaitable[list[Table]]]) -> None:
        if name not in names:
            return
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"c2c-bench-{name}-") as tmp:
            result = await body(Path(tmp))
        for table in result:
            print(table.markdown(), flush=True)
        print(f"({name}: {time.monotonic() - started:.0f} s)\n", file=sys.stderr, flush=True)
        tables.extend(result)

    raw: list[https_inbound.RawFigures] = []

    async def https(root: Path) -> list[Table]:
        table, figures = await https_inbound.sqlite_inbound(root)
        raw.append(figures)
        return [table]

    async def postgres(root: Path) -> list[Table]:
        if not raw:
            raw.append(await https_inbound.raw_figures(root / "raw", await _raw_payloads(root)))
        return await https_inbound.postgres_inbound(root, raw[0])

    await step("https", https)
    await step("postgres", postgres)
    await step("amqp", lambda root: _one(amqp_inbound.amqp_inbound(root)))
    await step("outbound", lambda root: _one(outbound.outbound(root)))
    await step("memory", lambda root: _one(https_inbound.memory(root)))
    await step("audit", lambda root: _one(audit.audit(root)))
    await step("poison", lambda root: _one(amqp_poison.amqp_poison(root)))
    await step("fairness", lambda root: _one(fairness.fairness(root)))
    await step("attack", lambda root: _one(attack.attack(root)))
    await step("stages", lambda root: _one(stages.stages(root)))
    return tables


async def _one(table: Awaitable[Table]) -> list[Table]:
    return [await table]


async def _raw_payloads(root: Path) -> Path:
    prepare(root / "raw")
    return sign_messages(root / "raw", root / "raw-payloads.jsonl", count=10_000)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", action="append", choices=NAMES, help="run only these")
    parser.add_argument("--write", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    names = args.only or list(NAMES)
    same_code_in_children()
    # gateway objects built in this process (AMQP topology) must not chat into the tables
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.monotonic()
    header = environment()
    print(header + "\n", flush=True)
    tables = uvloop.run(run(names))
    elapsed = time.monotonic() - started
    print(f"total: {elapsed:.0f} s", flush=True)
    if args.write is not None:
        body = "\n".join(table.markdown() for table in tables)
        args.write.write_text(
            f"# Benchmark results\n\n{header}\n- wall time: {elapsed:.0f} s\n\n{body}",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
