"""The per-source connection cap over IPv6 (RELIABILITY-SECURITY T37): a peer's connections
count under its /64, so the 2**64 addresses a single host or subscriber is usually given are
one source, not 2**64.

Loopback has one IPv6 address, so the check runs in a network namespace of its own
(``unshare --net``, which needs root, as the CI machine gives), whose loopback is given
addresses of three /64s: ``ipv6_sources_probe`` runs a real gateway there and connects from
several of them over real mutual TLS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ipv6_sources_probe import ADDRESSES, PER_SOURCE

HERE = Path(__file__).parent


def test_addresses_of_one_ipv6_64_share_its_cap(tmp_path: Path) -> None:
    for tool in ("unshare", "ip"):
        assert shutil.which(tool), f"{tool} (util-linux, iproute2) is needed for this test"
    # nodad: usable at once, without duplicate address detection's wait
    add = "".join(f"ip -6 addr add {address}/128 dev lo nodad && " for address in ADDRESSES)
    script = f'ip link set lo up && {add}exec "{sys.executable}" -m ipv6_sources_probe "{tmp_path}"'
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    # the endpoint's URL has its IPv6 address in brackets
    assert seen["partner_url"].startswith("https://[2001:db8:c2c::1]:")
    # two addresses of one /64 are one source, which is then full ...
    assert seen["held"] == {"2001:db8:c2c:1::/64": PER_SOURCE}
    # ... so a third address of that /64 is closed before any TLS work, and counted ...
    assert seen["same_64_refused"] is True
    assert seen["refused_per_source"] == 1
    # ... while another /64's partner is served, and the first /64 is again once its
    # connections have ended.
    assert seen["neighbour_post"] == 202
    assert seen["same_64_after"] == 200
