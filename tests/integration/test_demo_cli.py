"""``c2c-gateway demo`` as a user runs it: a subprocess that exits 0 with the expected table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ONE_WAY = (
    "shipment.advance_data",
    "shipment.manifest",
    "shipment.export_declaration",
    "shipment.status",
    "enforcement.risk_alert",
    "enforcement.seizure_report",
    "enforcement.assistance_request",
    "enforcement.assistance_response",
    "query.shipment_lookup",
    "query.trader_lookup",
)


def test_demo_exits_0_with_every_type_receipted_and_every_check_passed(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "c2c-gateway"), "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for direction in ("US-CBP -> MX-ANAM", "MX-ANAM -> US-CBP"):
        for message_type in ONE_WAY:
            assert re.search(
                rf"^{direction}\s+{re.escape(message_type)}\s+1\s+1\s+0$", out, re.M
            ), (
                direction,
                message_type,
            )
        assert re.search(rf"^{direction}\s+query\.response\s+2\s+2\s+0$", out, re.M)
    assert re.search(r"^US-CBP -> CA-CBSA\s+enforcement\.risk_alert\s+1\s+1\s+0$", out, re.M)
    assert re.search(r"^total\s+25\s+25\s+0$", out, re.M)
    assert re.search(r"^tampered message .*\s401 SIGNATURE_INVALID\s+ok$", out, re.M)
    assert re.search(r"^old message replayed .*\s422 STALE\s+ok$", out, re.M)
    assert re.search(r"^exact re-send .*\s200 original receipt\s+ok$", out, re.M)
    for party, partner in (("US-CBP", "MX-ANAM"), ("MX-ANAM", "US-CBP"), ("CA-CBSA", "US-CBP")):
        assert re.search(
            rf"^{party} checkpoint \(size [1-9][0-9]*\) cosigned by {partner}\s+"
            r"cosignature verified\s+ok$",
            out,
            re.M,
        ), (party, partner)
    assert "FAILED" not in out
    assert out.rstrip().splitlines()[-1].startswith("all exchanges receipted and verified")
    # The gateways' own files were kept where asked; nothing leaked onto stdout but the report.
    assert (tmp_path / "US-CBP" / "gateway.toml").is_file()
    assert "Traceback" not in result.stderr
