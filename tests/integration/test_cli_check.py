"""``c2c-gateway check``: what a configuration ``serve`` accepts should not have in production
(the real CLI, in a subprocess, on a copy of the repository's configuration)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trustme
from config_files import edit_once

G = "gateway.toml"
DEV = "certs/dev"


def _check(tree: Path, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    cli = [sys.executable, "-c", "from gateway.cli.main import main; main()"]
    done = subprocess.run(
        [*cli, "check", "--config", str(tree / G)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stdout.splitlines(), done.stderr


def _where(lines: list[str]) -> list[str]:
    """The setting each finding names (the lines before the summary)."""
    return [line.strip().split(": ", 1)[0] for line in lines[:-1]]


def _production(tree: Path) -> None:
    """The copy made fit for production: a CA of the administration's own (not the
    development PKI's) for our certificate and the partners', OCSP, no token signing key,
    a real audit origin."""
    ca = trustme.CA(organization_name="U.S. Customs and Border Protection")
    leaf = ca.issue_cert("US-CBP", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tree / DEV / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tree / DEV / "US-CBP" / "tls.pem"))
    leaf.private_key_pem.write_to_path(str(tree / DEV / "US-CBP" / "tls.key"))
    (tree / DEV / "US-CBP" / "tls.key").chmod(0o600)
    edit_once(tree / G, "[tls]\n", "[tls]\nocsp = true\n")
    edit_once(tree / G, 'signing_key = "certs/dev/US-CBP/api-token.key"\n', "")
    edit_once(tree / G, '"dev.c2c-gateway.invalid/US-CBP"', '"c2c.cbp.example.gov/US-CBP"')


def test_the_development_configuration_is_not_fit_for_production(tree: Path) -> None:
    code, out, err = _check(tree)
    assert (code, err) == (1, ""), out
    assert _where(out) == [
        "[tls] crls, ocsp",
        "[tls] cert",
        "[tls] ca",
        "partners/CA-CBSA/partner.toml [https] ca",
        "partners/MX-ANAM/partner.toml [https] ca",
        "[api_auth] signing_key",
        "[audit] origin",
    ]
    assert out[0] == (
        "  [tls] crls, ocsp: no revocation check: a partner certificate its CA revoked is"
        " accepted until it expires (give the partner CAs' CRLs, or ocsp = true)"
    )
    assert out[-1] == f"{tree / G}: 7 setting(s) not fit for production"


def test_a_production_configuration_has_nothing_to_say(tree: Path) -> None:
    _production(tree)
    assert _check(tree) == (0, [f"{tree / G}: nothing found unfit for production"], "")


def test_passwords_written_into_gateway_toml_are_named_and_not_shown(tree: Path) -> None:
    _production(tree)
    edit_once(
        tree / G,
        'store_url = "sqlite:///var/c2c.db"',
        'store_url = "postgresql://gw:hunter2@127.0.0.1:5432/c2c"',
    )
    edit_once(tree / G, "[amqp]\n", '[amqp]\nurl = "amqp://gw:s3cret@127.0.0.1:5672/c2c"\n')
    code, out, err = _check(tree)
    assert (code, err) == (1, "")
    assert _where(out) == ["store_url", "[amqp] url"]
    assert "hunter2" not in "\n".join(out)
    assert "s3cret" not in "\n".join(out)
    # from the environment, as the comments in gateway.toml advise: nothing to say
    edit_once(tree / G, 'store_url = "postgresql://gw:hunter2@127.0.0.1:5432/c2c"', "")
    edit_once(tree / G, 'url = "amqp://gw:s3cret@127.0.0.1:5672/c2c"', 'url_env = "C2C_AMQP"')
    env = {"C2C_AMQP": "amqp://gw:s3cret@127.0.0.1:5672/c2c"}
    assert _check(tree, env)[:2] == (0, [f"{tree / G}: nothing found unfit for production"])


def test_a_private_key_file_others_may_read_is_named_with_its_mode(tree: Path) -> None:
    _production(tree)
    key = tree / DEV / "US-CBP" / "tls.key"
    key.chmod(0o640)  # its group alone
    code, out, _ = _check(tree)
    assert code == 1
    assert out[:-1] == [
        f"  tls.key: {key.resolve()} is mode 0640: its group or others may read it (chmod 600)"
    ]


def test_a_configuration_that_does_not_load_is_the_error_serve_gives(tree: Path) -> None:
    edit_once(tree / G, 'party = "US-CBP"', 'party = ""')
    code, out, err = _check(tree)
    assert (code, out) == (2, [])
    assert err.startswith(f"error: {tree / G}: party: "), err
