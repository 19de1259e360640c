"""``c2c-gateway partners check`` on a native-format partner (docs/adapters.md): its
``adapter.py`` is loaded and every fixture, in the partner's format, runs through it."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from click.testing import CliRunner

from gateway.cli.main import cli

ADAPTER = Path(__file__).parents[1] / "fixtures" / "xml_partner" / "adapter.py"


def _native_mx(tree: Path) -> Path:
    """MX-ANAM made an XML partner, its fixtures written in XML by the adapter's own mapping."""
    folder = tree / "partners" / "MX-ANAM"
    shutil.copyfile(ADAPTER, folder / "adapter.py")
    toml = folder / "partner.toml"
    text = toml.read_text(encoding="utf-8")
    text = text.replace('adapter = "canonical"', 'adapter = "adapter.py"')
    toml.write_text(text.replace('typ = "c2c+json"', 'typ = "c2c+xml"'), encoding="utf-8")
    for path in list((folder / "fixtures").rglob("*.json")):
        canonical = path.read_bytes()
        path.unlink()
        path.with_suffix(".xml").write_bytes(
            b"<c2c><envelope>" + base64.b64encode(canonical) + b"</envelope></c2c>"
        )
    return folder


def _check(tree: Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["partners", "check", "MX-ANAM", "--config", str(tree / "gateway.toml")]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.stdout


def test_check_loads_the_adapter_and_reads_the_native_fixtures(tree: Path) -> None:
    _native_mx(tree)
    code, out = _check(tree)
    assert code == 0, out
    assert "  ok    adapter     MX-ANAM/adapter.py" in out
    fixtures = [line for line in out.splitlines() if " fixture " in line]
    assert len(fixtures) == 2, out
    assert all(line.split()[0] == "ok" for line in fixtures), out
    assert all(".xml: " in line for line in fixtures)


def test_check_names_an_adapter_that_does_not_load(tree: Path) -> None:
    folder = _native_mx(tree)
    (folder / "adapter.py").write_text("import no_such_module_here\n", encoding="utf-8")
    code, out = _check(tree)
    assert code == 1
    (line,) = [line for line in out.splitlines() if " adapter " in line]
    assert line.startswith("  FAIL  adapter")
    assert str((folder / "adapter.py").resolve()) in line
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in line


def test_check_reports_a_fixture_the_adapter_cannot_read(tree: Path) -> None:
    folder = _native_mx(tree)
    (folder / "fixtures" / "inbound" / "broken.xml").write_bytes(b"<c2c><envelope>")
    code, out = _check(tree)
    assert code == 1
    (line,) = [line for line in out.splitlines() if "broken.xml" in line]
    assert line.startswith("  FAIL  fixture")
    assert "MALFORMED: adapter MX-ANAM/adapter.py to_canonical raised ParseError" in line
    # the parser's own text, left out of the audit log, is shown for the operator's fixture
    assert line.endswith("[ParseError: no element found: line 1, column 15]"), line
