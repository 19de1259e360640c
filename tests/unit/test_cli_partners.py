"""``c2c-gateway partners list|check`` on the shipped samples, on broken fixtures and keys, and
on bad configuration files (exact operator message, exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.stdout, result.stderr


def _kid(tree: Path, party: str) -> str:
    return (tree / "certs" / "dev" / party / "sign.kid").read_text(encoding="ascii").strip()


def test_list_shows_every_partner_with_its_key(tree: Path) -> None:
    code, out, err = _run("partners", "list", "--config", str(tree / "gateway.toml"))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "TRANSPORTS", "IN", "OUT", "KEY", "ID", "(kid)", "ALG", "FROM", "UNTIL"
    ]  # fmt: skip
    assert len(lines) == 3
    assert lines[1].startswith("CA-CBSA  Canada Border Services Agency (CBSA)")
    assert lines[2].startswith("MX-ANAM  Agencia Nacional de Aduanas de México (…")
    for line, party in zip(lines[1:], ("CA-CBSA", "MX-ANAM"), strict=True):
        assert line.split()[-7:] == [
            "https", "14", "14", _kid(tree, party), "EdDSA", "2025-01-01T00:00:00.000Z", "-"
        ]  # fmt: skip


@pytest.mark.parametrize("partner", ["MX-ANAM", "CA-CBSA"])
def test_check_passes_for_the_samples(tree: Path, partner: str) -> None:
    code, out, err = _run("partners", "check", partner, "--config", str(tree / "gateway.toml"))
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert lines[0].startswith(f"partner {partner} (")
    checks = [line.split()[1] for line in lines[1:-1]]
    assert checks == ["config", "key", "tls", "tls", "audit", "adapter", "fixture", "fixture"]
    assert all(line.split()[0] == "ok" for line in lines[1:-1])
    assert f"  ok    key         {_kid(tree, partner)} EdDSA" in out
    assert lines[-1] == f"{partner}: 8 ok, 0 failed"


def _fixture(tree: Path, direction: str) -> Path:
    (path,) = (tree / "partners" / "MX-ANAM" / "fixtures" / direction).iterdir()
    return path


def test_check_fails_on_a_fixture_that_breaks_its_schema(tree: Path) -> None:
    path = _fixture(tree, "inbound")
    document = json.loads(path.read_text(encoding="utf-8"))
    document["payload"]["goods_items"][0]["hs_code"] = "69"
    path.write_text(json.dumps(document), encoding="utf-8")
    code, out, _ = _run("partners", "check", "MX-ANAM", "--config", str(tree / "gateway.toml"))
    assert code == 1
    (failure,) = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert failure.startswith(
        "  FAIL  fixture     fixtures/inbound/shipment.advance_data.json: SCHEMA_INVALID: "
    )
    assert "/goods_items/0/hs_code" in failure
    assert out.splitlines()[-1] == "MX-ANAM: 7 ok, 1 failed"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"sender": "CA-CBSA"}, "inbound message must go MX-ANAM -> US-CBP, not CA-CBSA -> US-CBP"),
        ({"legal_basis": "none"}, "legal_basis must be 'US-MX CMAA (Mexico City, 1976)'"),
    ],
)
def test_check_fails_on_a_fixture_with_the_wrong_header(
    tree: Path, change: dict[str, str], problem: str
) -> None:
    path = _fixture(tree, "inbound")
    document = json.loads(path.read_text(encoding="utf-8"))
    document["header"].update(change)
    path.write_text(json.dumps(document), encoding="utf-8")
    code, out, _ = _run("partners", "check", "MX-ANAM", "--config", str(tree / "gateway.toml"))
    assert code == 1
    (failure,) = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert failure.endswith(problem)


def test_check_fails_on_a_fixture_that_is_not_an_envelope(tree: Path) -> None:
    _fixture(tree, "outbound").write_bytes(b'{"header": {}, "header": {}}')
    code, out, _ = _run("partners", "check", "MX-ANAM", "--config", str(tree / "gateway.toml"))
    assert code == 1
    assert "FAIL  fixture     fixtures/outbound/query.shipment_lookup.json: MALFORMED: " in out


def test_unreadable_key_shows_in_list_and_fails_check(tree: Path) -> None:
    (tree / "certs" / "dev" / "MX-ANAM" / "sign.pub").write_text("not a key\n", encoding="ascii")
    code, out, _ = _run("partners", "list", "--config", str(tree / "gateway.toml"))
    assert code == 1
    assert "UNREADABLE (is not a PEM public key (SubjectPublicKeyInfo))" in out
    code, out, _ = _run("partners", "check", "MX-ANAM", "--config", str(tree / "gateway.toml"))
    assert code == 1
    assert "  FAIL  key         " in out


def test_check_fails_when_no_key_is_valid_now(tree: Path) -> None:
    toml = tree / "partners" / "MX-ANAM" / "partner.toml"
    text = toml.read_text(encoding="utf-8")
    assert text.count("not_before = 2025-01-01T00:00:00Z") == 1
    toml.write_text(
        text.replace(
            "not_before = 2025-01-01T00:00:00Z",
            "not_before = 2025-01-01T00:00:00Z\nnot_after = 2025-06-01T00:00:00Z",
        ),
        encoding="utf-8",
    )
    code, out, _ = _run("partners", "check", "MX-ANAM", "--config", str(tree / "gateway.toml"))
    assert code == 1
    assert "  ok    key         " in out  # the key itself loads
    assert "  FAIL  key         no key is valid now (" in out


def test_check_of_an_unknown_partner(tree: Path) -> None:
    code, out, err = _run("partners", "check", "GB-HMRC", "--config", str(tree / "gateway.toml"))
    assert (code, out) == (2, "")
    assert err == (
        f"error: {tree / 'partners'}: no partner 'GB-HMRC' (configured: CA-CBSA, MX-ANAM)\n"
    )


BAD_CONFIGS = [
    ("gateway.toml", 'party = "US-CBP"', 'party = "US"', "party",
     "'US' is not a party id (^[A-Z]{2}-[A-Z0-9]{2,16}$)"),
    ("gateway.toml", "max_skew_s = 120", "max_skew_s = -5", "limits.max_skew_s",
     "must be >= 0, got -5"),
    ("partners/MX-ANAM/partner.toml", 'alg = "EdDSA"', 'alg = "none"', "keys[0].alg",
     "unsupported algorithm 'none': only EdDSA or ES256"),
    ("partners/CA-CBSA/partner.toml", "[rate]", "[rate]\nper_minute = 5", "rate.per_minute",
     "unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("file", "old", "new", "key", "reason"), BAD_CONFIGS)
@pytest.mark.parametrize("command", [["partners", "list"], ["partners", "check", "MX-ANAM"]])
def test_bad_config_prints_file_key_reason_and_exits_2(
    tree: Path, command: list[str], file: str, old: str, new: str, key: str, reason: str
) -> None:
    path = tree / file
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1
    path.write_text(text.replace(old, new), encoding="utf-8")
    code, out, err = _run(*command, "--config", str(tree / "gateway.toml"))
    assert (code, out) == (2, "")
    assert err == f"error: {path}: {key}: {reason}\n"


def test_real_command_reports_a_bad_file_without_a_traceback(tree: Path) -> None:
    (tree / "gateway.toml").write_text('party = "US-CBP"\nparty = "MX-ANAM"\n', encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", "from gateway.cli.main import main; main()", "partners", "list"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"error: {tree / 'gateway.toml'}: (toml): Cannot overwrite a value (at line 2, column 18)\n"
    )
