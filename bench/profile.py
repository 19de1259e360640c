"""Profile the gateway's HTTPS inbound path under load with py-spy (the ``bench`` extra).

    .venv/bin/python -m bench.profile --out profile.txt [--concurrency 32] [--seconds 10]

Starts ``c2c-gateway serve`` on SQLite, records it with ``py-spy record --format raw`` while
the load client sends pre-signed messages, and prints the top functions by own and total
samples. ``--out`` keeps the collapsed stacks (flamegraph input).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import uvloop

from bench.common import prepare, run_load, sign_messages
from bench.https_inbound import MESSAGES_PATH, gateways


def summarize(collapsed: Path, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    out = [f"{samples} samples", "", "own:"]
    out += [f"{n / samples * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "total:"]
    out += [f"{n / samples * 100:5.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(out)


async def profile(args: argparse.Namespace) -> None:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if pyspy is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory(prefix="c2c-profile-") as tmp:
        root = Path(tmp)
        config = prepare(root)
        count = int(args.seconds * 1500)
        payloads = sign_messages(root, root / "payloads.jsonl", count=count)
        async with gateways(config) as (gw,):
            spy = await asyncio.create_subprocess_exec(
                pyspy,
                "record",
                "--format",
                "raw",
                "--pid",
                str(gw.pid),
                "--duration",
                str(int(args.seconds)),
                "--gil",
                "--rate",
                "250",
                "--output",
                str(args.out),
                stdout=asyncio.subprocess.DEVNULL,
            )
            result = await run_load(
                [gw.partner_url + MESSAGES_PATH],
                pki=root,
                payloads=payloads,
                concurrency=args.concurrency,
                duration_s=args.seconds,
            )
            await spy.wait()
        print(
            f"{result.rate:.0f} messages/s, p50 {result.p50_ms:.1f} ms, statuses {result.statuses}"
        )
        print(summarize(args.out, args.top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("profile.txt"))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=40)
    uvloop.run(profile(parser.parse_args()))


if __name__ == "__main__":
    main()
