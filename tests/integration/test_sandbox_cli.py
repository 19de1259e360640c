"""The conformance sandbox as a partner uses it: a subprocess, the system curl, and a JWS made
by an independent JOSE library (jwcrypto), never by the gateway's own code.
Also: ``serve`` refuses a bad configuration with one clear line and exit status 2.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from jwcrypto import jwk, jws
from outbound_env import free_port

from gateway.cli.main import cli
from gateway.schemas.registry import SchemaRegistry

C2C_GATEWAY = str(Path(sys.executable).with_name("c2c-gateway"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    directory = tmp_path_factory.mktemp("sandbox")
    log_path = tmp_path_factory.mktemp("sandbox-log") / "stderr.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [C2C_GATEWAY, "sandbox", "--dir", str(directory), "--port", "0", "--api-port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        process.wait(timeout=10)
        pytest.fail(f"sandbox did not start: {log_path.read_text()[-2000:]}")
    ready = json.loads(line)
    try:
        yield ready, directory
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        err = log_path.read_text()
        # Exactly one line on stdout, ever; a clean exit on SIGTERM.
        assert out == b"", out
        assert process.returncode == 0, err[-2000:]
        assert "gateway_stopped" in err


def _independent_jws(body: bytes, directory: Path, party: str) -> str:
    key = jwk.JWK.from_pem((directory / party / "sign.key").read_bytes())
    kid = (directory / party / "sign.kid").read_text().strip()
    token = jws.JWS(body)
    token.add_signature(
        key, alg="EdDSA", protected=json.dumps({"alg": "EdDSA", "kid": kid, "typ": "c2c+json"})
    )
    header, _, signature = token.serialize(compact=True).split(".")
    return f"{header}..{signature}"


def _message(sender: str, *, created_at: dt.datetime | None = None) -> tuple[str, bytes]:
    payload = SchemaRegistry.load_builtin().examples("shipment.advance_data", "1.0")[0]
    message_id = str(uuid.uuid4())
    created = (created_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    envelope = {
        "header": {
            "message_id": message_id,
            "message_type": "shipment.advance_data",
            "schema_version": "1.0",
            "sender": sender,
            "recipient": "US-CBP",
            "created_at": created,
            "expires_at": "2999-01-01T00:00:00Z",
            "correlation_id": None,
            "in_reply_to": None,
        },
        "payload": payload,
    }
    return message_id, json.dumps(envelope, separators=(",", ":")).encode()


def _curl(
    url: str, directory: Path, party: str, tmp: Path, *, body: bytes | None, signature: str | None
) -> tuple[int, dict[str, str], bytes]:
    headers_file, body_file = tmp / "headers.txt", tmp / "body.bin"
    command = [
        "curl",
        "--silent",
        "--show-error",
        "--cert",
        str(directory / party / "tls.pem"),
        "--key",
        str(directory / party / "tls.key"),
        "--cacert",
        str(directory / "ca.pem"),
        "--dump-header",
        str(headers_file),
        "--output",
        str(body_file),
        "--write-out",
        "%{http_code}",
    ]
    if body is not None:
        (tmp / "request.json").write_bytes(body)
        command += [
            "--header",
            "Content-Type: application/json",
            "--data-binary",
            f"@{tmp / 'request.json'}",
        ]
    if signature is not None:
        command += ["--header", f"C2C-Signature: {signature}"]
    done = subprocess.run([*command, url], capture_output=True, timeout=30, check=True)
    headers = {}
    for raw in headers_file.read_text().splitlines()[1:]:
        if ":" in raw:
            name, value = raw.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(done.stdout), headers, body_file.read_bytes()


def _verify_receipt(receipt: bytes, signature: str, directory: Path) -> dict[str, Any]:
    """Check US-CBP's detached receipt signature with jwcrypto and the published sign.pub."""
    key = jwk.JWK.from_pem((directory / "US-CBP" / "sign.pub").read_bytes())
    token = jws.JWS()
    token.deserialize(signature)
    token.verify(key, alg="EdDSA", detached_payload=receipt)
    document: dict[str, Any] = json.loads(receipt)
    return document


def test_partner_sends_with_curl_and_an_independent_jws(
    sandbox: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    ready, directory = sandbox
    assert ready["ready"] is True
    assert ready["party"] == "US-CBP"
    assert ready["dir"] == str(directory)
    assert ready["partner_url"].startswith("https://127.0.0.1:")
    assert ready["api_url"].startswith("https://127.0.0.1:")
    for name in ("ca.pem", "api.token", "gateway.toml", "US-CBP/audit.pub", "MX-ANAM/sign.kid"):
        assert (directory / name).is_file(), name
    url = ready["partner_url"] + "/c2c/v1/messages"

    message_id, body = _message("MX-ANAM")
    signature = _independent_jws(body, directory, "MX-ANAM")
    status, headers, receipt = _curl(
        url, directory, "MX-ANAM", tmp_path, body=body, signature=signature
    )
    assert status == 202, receipt
    document = _verify_receipt(receipt, headers["c2c-signature"], directory)
    assert document["header"]["in_reply_to"] == message_id
    assert document["payload"]["status"] == "ACK"
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
    assert document["payload"]["ref_digest"] == f"sha-256:{digest}"

    # The same bytes again: 200 and the very same receipt.
    again_status, again_headers, again = _curl(
        url, directory, "MX-ANAM", tmp_path, body=body, signature=signature
    )
    assert again_status == 200
    assert again == receipt
    assert again_headers["c2c-signature"] == headers["c2c-signature"]

    # One flipped byte: a signed NACK.
    tampered = body.replace(b'"US-CBP"', b'"US-CBP" ', 1)
    bad_status, bad_headers, nack = _curl(
        url, directory, "MX-ANAM", tmp_path, body=tampered, signature=signature
    )
    assert bad_status == 401
    nack_doc = _verify_receipt(nack, bad_headers["c2c-signature"], directory)
    assert nack_doc["payload"]["code"] == "SIGNATURE_INVALID"


def test_keys_and_schemas_with_curl(sandbox: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    ready, directory = sandbox
    status, _, raw = _curl(
        ready["partner_url"] + "/c2c/v1/keys",
        directory,
        "CA-CBSA",
        tmp_path,
        body=None,
        signature=None,
    )
    assert status == 200
    kids = [key["kid"] for key in json.loads(raw)["keys"]]
    assert kids == [(directory / "US-CBP" / "sign.kid").read_text().strip()]
    status, _, raw = _curl(
        ready["partner_url"] + "/c2c/v1/schemas/shipment.advance_data/1.0",
        directory,
        "CA-CBSA",
        tmp_path,
        body=None,
        signature=None,
    )
    assert status == 200
    assert json.loads(raw)["examples"]


def test_protocols_export_example_writes_a_bundle_that_verifies_from_a_pipe(
    sandbox: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """PROTOCOL section 8's own example, `c2c-gateway audit export --config DIR/gateway.toml`,
    as written: the bundle on stdout (the summary on stderr), read by `audit verify -`."""
    _, directory = sandbox
    exported = subprocess.run(
        [C2C_GATEWAY, "audit", "export", "--config", str(directory / "gateway.toml")],
        capture_output=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr.decode()
    summary = exported.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("wrote the bundle to stdout: "), summary
    lines = exported.stdout.splitlines()
    assert json.loads(lines[0])["type"] == "header"
    verified = subprocess.run(
        [C2C_GATEWAY, "audit", "verify", "-", "--key", str(directory / "US-CBP" / "audit.pub")],
        input=exported.stdout,
        capture_output=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stderr.decode()
    assert verified.stdout.decode().startswith("OK stdin: ")
    entries = int(summary.split(": ", 1)[1].split(" entries")[0])
    assert f"OK stdin: {entries} entries, " in verified.stdout.decode()
    # redirected to a file the shell made under its umask: owner-only, as --out makes it
    redirected = tmp_path / "case.jsonl"
    with redirected.open("wb") as out:
        redirected.chmod(0o644)
        done = subprocess.run(
            [C2C_GATEWAY, "audit", "export", "--config", str(directory / "gateway.toml")],
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert stat.S_IMODE(redirected.stat().st_mode) == 0o600
    assert json.loads(redirected.read_bytes().splitlines()[0])["type"] == "header"


def test_serve_bad_config_exits_2_with_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('party = "not a party"\n')
    result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {config}: party:")
    assert "Traceback" not in result.output


def _repository_setup(tmp_path: Path) -> Path:
    """The repository's gateway.toml and partners/ in a fresh folder, after `pki init` (as
    README says), on free ports."""
    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "checkout"
    shutil.copytree(root / "partners", work / "partners")
    text = (root / "gateway.toml").read_text()
    text = text.replace("port = 8443", f"port = {free_port()}").replace(
        "port = 8080", f"port = {free_port()}"
    )
    (work / "gateway.toml").write_text(text)
    made = subprocess.run(
        [str(Path(sys.executable).parent / "c2c-gateway"), "pki", "init"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return work


def test_the_repositorys_configuration_serves_after_pki_init(tmp_path: Path) -> None:
    """Nothing else to make: the store's directory (var/) is created on first start."""
    work = _repository_setup(tmp_path)
    assert not (work / "var").exists()
    with subprocess.Popen(
        [str(Path(sys.executable).parent / "c2c-gateway"), "serve", "--config", "gateway.toml"],
        cwd=work,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stderr is not None
            lines = []
            for line in process.stderr:
                lines.append(line)
                if '"event": "serving"' in line or "Traceback" in line:
                    break
            assert '"event": "serving"' in lines[-1], "".join(lines)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert (work / "var" / "c2c.db").is_file()
    assert (work / "var").stat().st_mode & 0o777 == 0o700


def test_serve_with_an_unreachable_store_exits_1_with_clear_error(tmp_path: Path) -> None:
    work = _repository_setup(tmp_path)
    config = work / "gateway.toml"
    text = config.read_text().replace(
        'store_url = "sqlite:///var/c2c.db"',
        f'store_url = "postgresql://127.0.0.1:{free_port()}/x"',
    )
    config.write_text(text)
    result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "error: cannot serve: postgresql: ConnectionRefusedError" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------- a DIR used again (PROTOCOL.md section 8)


@contextmanager
def _running(directory: Path, *args: str) -> Iterator[tuple[dict[str, Any], str]]:
    """A sandbox on DIR until the block ends; its ready line and, after, its stderr."""
    log_path = directory.parent / f"{directory.name}-stderr.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [C2C_GATEWAY, "sandbox", "--dir", str(directory), *args],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"sandbox did not start: {log_path.read_text()[-2000:]}")
        yield json.loads(line), log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0, log_path.read_text()[-2000:]


def _refused(directory: Path, *args: str) -> str:
    done = subprocess.run(
        [C2C_GATEWAY, "sandbox", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    return done.stderr


def _kids(ready: dict[str, Any], directory: Path, tmp: Path) -> list[str]:
    """GET /c2c/v1/keys with curl, checking the server certificate against the URL's host."""
    status, _, raw = _curl(
        ready["partner_url"] + "/c2c/v1/keys", directory, "MX-ANAM", tmp, body=None, signature=None
    )
    assert status == 200
    return [key["kid"] for key in json.loads(raw)["keys"]]


def _handshake(url: str, directory: Path) -> None:
    """A TLS handshake to the URL's host, its name checked against the certificate."""
    parts = urlsplit(url)
    context = ssl.create_default_context(cafile=directory / "ca.pem")
    context.load_cert_chain(directory / "MX-ANAM" / "tls.pem", directory / "MX-ANAM" / "tls.key")
    assert parts.hostname is not None
    assert parts.port is not None
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=parts.hostname) as tls,
    ):
        assert tls.version() is not None


def test_restarted_on_another_host_it_serves_a_certificate_for_it(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    with _running(directory) as (ready, _):
        _kids(ready, directory, tmp_path)
    with _running(directory, "--host", "127.0.0.2") as (ready, _):
        assert ready["partner_url"].startswith("https://127.0.0.2:")
        _kids(ready, directory, tmp_path)
        _handshake(ready["partner_url"], directory)
        _handshake(ready["api_url"], directory)


def test_a_new_ca_gets_new_certificates(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    with _running(directory):
        pass
    (directory / "ca.pem").unlink()
    (directory / "ca.key").unlink()
    with _running(directory) as (ready, _):
        _kids(ready, directory, tmp_path)
        _handshake(ready["api_url"], directory)


def test_a_rotated_key_and_an_edited_partner_survive_a_restart(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    with _running(directory) as (ready, _):
        assert len(_kids(ready, directory, tmp_path)) == 1
    config = directory / "gateway.toml"
    rotated = subprocess.run(
        [C2C_GATEWAY, "keys", "rotate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stderr
    partner = directory / "partners" / "CA-CBSA" / "partner.toml"
    with partner.open("a", encoding="utf-8") as handle:
        handle.write("# edited by hand\n")
    kept = {path: path.read_bytes() for path in (config, partner)}

    with _running(directory, "--port", "0") as (ready, log):
        assert len(_kids(ready, directory, tmp_path)) == 2
    assert {path: path.read_bytes() for path in kept} == kept
    assert "sandbox_file_kept" in log
    for path in kept:
        assert f'"file": "{path}"' in log

    # What the kept file does not say cannot be applied: said, and nothing is changed.
    port = free_port()
    error = _refused(directory, "--port", str(port))
    assert error == (
        f"error: {config}: partner_listen.port: the file says 0, {port} was asked; kept as it "
        "is (it was not written by the sandbox, or was changed since): edit it, or remove it "
        "to let the sandbox write its own\n"
    )
    assert {path: path.read_bytes() for path in kept} == kept
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_a_hand_written_configuration_is_never_replaced(tmp_path: Path) -> None:
    """DIR holding the repository's own gateway.toml and partners/ (``--dir .`` in a checkout)."""
    root = Path(__file__).resolve().parents[2]
    directory = tmp_path / "dir"
    shutil.copytree(root / "partners", directory / "partners")
    shutil.copy(root / "gateway.toml", directory / "gateway.toml")
    partner = directory / "partners" / "MX-ANAM" / "partner.toml"
    with partner.open("a", encoding="utf-8") as handle:
        handle.write("# my own edit\n")
    mine = {path: path.read_bytes() for path in (directory / "gateway.toml", partner)}
    error = _refused(directory)
    assert error.startswith(f"error: {directory / 'gateway.toml'}: ")
    assert error.endswith("edit it, or remove it to let the sandbox write its own\n")
    assert {path: path.read_bytes() for path in mine} == mine


# ------------------------------------------------------------- --alg ES256 (sign_with)


def _es256_jws(body: bytes, directory: Path, party: str) -> str:
    """A partner's ES256 detached JWS, by jwcrypto, with its sandbox P-256 key."""
    key = jwk.JWK.from_pem((directory / party / "sign-es256.key").read_bytes())
    kid = (directory / party / "sign-es256.kid").read_text().strip()
    token = jws.JWS(body)
    token.add_signature(
        key, alg="ES256", protected=json.dumps({"alg": "ES256", "kid": kid, "typ": "c2c+json"})
    )
    header, _, signature = token.serialize(compact=True).split(".")
    return f"{header}..{signature}"


def _verify_es256_receipt(receipt: bytes, signature: str, directory: Path) -> dict[str, Any]:
    key = jwk.JWK.from_pem((directory / "US-CBP" / "sign-es256.pub").read_bytes())
    token = jws.JWS()
    token.deserialize(signature)
    token.verify(key, alg="ES256", detached_payload=receipt)
    assert token.jose_header["kid"] == (directory / "US-CBP" / "sign-es256.kid").read_text().strip()
    document: dict[str, Any] = json.loads(receipt)
    return document


def test_alg_es256_serves_an_es256_only_peer(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    # made first with the default (Ed25519), then asked for ES256: its files are rewritten
    with _running(directory) as (ready, _):
        assert len(_kids(ready, directory, tmp_path)) == 1
    with _running(directory, "--alg", "ES256") as (ready, log):
        assert "sandbox_file_kept" not in log
        for party in ("US-CBP", "MX-ANAM", "CA-CBSA"):
            for name in ("sign-es256.key", "sign-es256.pub", "sign-es256.kid"):
                assert (directory / party / name).is_file(), (party, name)
        assert stat.S_IMODE((directory / "MX-ANAM" / "sign-es256.key").stat().st_mode) == 0o600
        # the JWKS: the gateway's Ed25519 key and its P-256 one
        assert _kids(ready, directory, tmp_path) == [
            (directory / "US-CBP" / name).read_text().strip()
            for name in ("sign.kid", "sign-es256.kid")
        ]
        url = ready["partner_url"] + "/c2c/v1/messages"
        message_id, body = _message("MX-ANAM")
        signature = _es256_jws(body, directory, "MX-ANAM")
        status, headers, receipt = _curl(
            url, directory, "MX-ANAM", tmp_path, body=body, signature=signature
        )
        assert status == 202, receipt
        document = _verify_es256_receipt(receipt, headers["c2c-signature"], directory)
        assert document["header"]["in_reply_to"] == message_id
        assert document["payload"]["status"] == "ACK"
        # the partner's Ed25519 key is not configured: its EdDSA signature is refused, and
        # the NACK is ES256 too
        _, eddsa_body = _message("MX-ANAM")
        status, headers, nack = _curl(
            url,
            directory,
            "MX-ANAM",
            tmp_path,
            body=eddsa_body,
            signature=_independent_jws(eddsa_body, directory, "MX-ANAM"),
        )
        assert status == 401
        nack_doc = _verify_es256_receipt(nack, headers["c2c-signature"], directory)
        assert nack_doc["payload"]["code"] == "UNKNOWN_KEY"
    partner = (directory / "partners" / "CA-CBSA" / "partner.toml").read_text()
    assert 'sign_with = "ES256"' in partner
    assert "sign-es256.pub" in partner

    # and back to the default: Ed25519 again, the P-256 files kept
    with _running(directory) as (ready, _):
        assert len(_kids(ready, directory, tmp_path)) == 1
        _, body = _message("MX-ANAM")
        status, headers, receipt = _curl(
            ready["partner_url"] + "/c2c/v1/messages",
            directory,
            "MX-ANAM",
            tmp_path,
            body=body,
            signature=_independent_jws(body, directory, "MX-ANAM"),
        )
        assert status == 202, receipt
        _verify_receipt(receipt, headers["c2c-signature"], directory)
    assert (directory / "US-CBP" / "sign-es256.key").is_file()


def test_alg_es256_against_kept_files_is_refused_when_they_do_not_say_it(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "partner-kept"
    with _running(directory):
        pass
    partner = directory / "partners" / "CA-CBSA" / "partner.toml"
    with partner.open("a", encoding="utf-8") as handle:
        handle.write("# edited by hand\n")
    kept = partner.read_bytes()
    error = _refused(directory, "--alg", "ES256")
    assert error == (
        f"error: {partner}: sign_with: the file says 'EdDSA', 'ES256' was asked; kept as it is"
        " (it was not written by the sandbox, or was changed since): edit it, or remove it to"
        " let the sandbox write its own\n"
    )
    assert partner.read_bytes() == kept

    directory = tmp_path / "gateway-kept"
    with _running(directory):
        pass
    config = directory / "gateway.toml"
    with config.open("a", encoding="utf-8") as handle:
        handle.write("# edited by hand\n")
    kept = config.read_bytes()
    error = _refused(directory, "--alg", "ES256")
    assert error == (
        f"error: {config}: signing_keys: the file holds no ES256 key, --alg ES256 was asked;"
        " kept as it is (it was not written by the sandbox, or was changed since): edit it, or"
        " remove it to let the sandbox write its own\n"
    )
    assert config.read_bytes() == kept


def test_pki_init_alg_es256_makes_p256_signing_keys(tmp_path: Path) -> None:
    partners = tmp_path / "partners"
    for party in ("MX-ANAM", "CA-CBSA"):
        (partners / party).mkdir(parents=True)
    pki_dir = tmp_path / "pki"
    args = ["pki", "init", "--dir", str(pki_dir), "--partners-dir", str(partners)]
    made = CliRunner().invoke(cli, [*args, "--alg", "ES256"])
    assert made.exit_code == 0, made.output
    for party in ("US-CBP", "MX-ANAM", "CA-CBSA"):
        assert f"created {pki_dir / party / 'sign-es256.key'}" in made.output
        assert f"created {pki_dir / party / 'sign.key'}" in made.output
        key = jwk.JWK.from_pem((pki_dir / party / "sign-es256.key").read_bytes())
        assert key.get("crv") == "P-256"
        assert key.thumbprint() == (pki_dir / party / "sign-es256.kid").read_text().strip()
    again = CliRunner().invoke(cli, [*args, "--alg", "ES256"])
    assert again.exit_code == 0, again.output
    assert again.output.startswith("nothing to do")
    (pki_dir / "MX-ANAM" / "sign-es256.kid").write_text("not-it\n")
    bad = CliRunner().invoke(cli, [*args, "--alg", "ES256"])
    assert bad.exit_code == 2
    assert (
        bad.output
        == f"error: {pki_dir / 'MX-ANAM' / 'sign-es256.kid'} does not match sign-es256.key\n"
    )
