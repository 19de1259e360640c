"""The partner endpoint over real mutual TLS on loopback, with the dev PKI in a tmp dir.

Covers PROTOCOL.md sections 4 and 5: client-certificate identity, every NACK code with its
HTTP status and a signed receipt (signature and ref_digest verified here), idempotent
re-send, conflicts, rate limiting, store outage, one audit entry per refusal, delivery of
accepted messages to a bus subscriber, and the schema/key endpoints.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from https_env import (
    CA,
    GB,
    LEGAL_BASIS,
    MX,
    US,
    Answer,
    Env,
    assert_nack,
    check_receipt,
    client_with,
    dev_ca,
    issue_cert,
    make_message,
    post,
    post_with_handshake_end,
    rejections,
    running_gateway,
    wait_delivered,
    wait_relayed,
)

from gateway.audit.events import EventKind
from gateway.crypto.jws import sign_detached
from gateway.errors import NackCode
from gateway.store.base import AuditFilter


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path) as running:
        yield running


# --- accepted, duplicates, delivery -------------------------------------------------------


async def test_accepted_message_gets_signed_ack_and_reaches_bus(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body)
    assert answer.status == 202
    receipt = check_receipt(env, answer, message_id=message_id, body=body)
    assert receipt.status == "ACK"
    assert receipt.code is None
    stored = await env.gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.body == body
    assert stored.receipt_body == answer.body
    await wait_delivered(env, 1)
    assert [(r.sender, r.message_id) for r in env.delivered] == [(MX, message_id)]


async def test_exact_resend_returns_original_receipt_bytes(env: Env) -> None:
    _, body = make_message(env)
    first = await post(env, body)
    # A different (fresh) signature over the same bytes is still the same message.
    second = await post(env, body)
    assert first.status == 202
    assert second.status == 200
    assert second.body == first.body
    assert second.headers["C2C-Signature"] == first.headers["C2C-Signature"]
    await wait_delivered(env, 1)
    await wait_relayed(env.gateway.store)
    assert len(env.delivered) == 1


async def test_same_id_different_bytes_is_conflict(env: Env) -> None:
    message_id, body = make_message(env)
    assert (await post(env, body)).status == 202
    _, other = make_message(env, message_id=message_id, payload=None, legal_basis=LEGAL_BASIS)
    assert other != body
    answer = await post(env, other)
    assert answer.status == 409
    receipt = check_receipt(env, answer, message_id=message_id, body=other)
    assert receipt.code == NackCode.DUPLICATE_CONFLICT
    entries = await rejections(env, NackCode.DUPLICATE_CONFLICT)
    assert len(entries) == 1
    assert "with digest" in entries[0]["reason"]
    stored = await env.gateway.store.get_inbound(MX, message_id)
    assert stored is not None
    assert stored.body == body


# --- every NACK code ----------------------------------------------------------------------


async def test_signature_invalid(env: Env) -> None:
    message_id, body = make_message(env)
    signature = sign_detached(body, env.keys[MX])
    tampered = body.replace(b'"US-CBP"', b'"US-CBP" ', 1)
    answer = await post(env, tampered, signature=signature)
    await assert_nack(
        env,
        answer,
        NackCode.SIGNATURE_INVALID,
        401,
        message_id=message_id,
        body=tampered,
        reason_contains="signature",
    )


async def test_missing_signature(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body, signer=None)
    await assert_nack(
        env,
        answer,
        NackCode.SIGNATURE_INVALID,
        401,
        message_id=message_id,
        body=body,
        reason_contains="no detached JWS",
    )


async def test_unknown_key(env: Env) -> None:
    # Signed with CA-CBSA's key while the TLS identity is MX-ANAM: not one of MX-ANAM's keys.
    message_id, body = make_message(env)
    answer = await post(env, body, signer=CA)
    await assert_nack(
        env,
        answer,
        NackCode.UNKNOWN_KEY,
        401,
        message_id=message_id,
        body=body,
        reason_contains=env.keys[CA].kid,
    )


async def test_another_partners_genuine_message_replayed_is_sender_mismatch(env: Env) -> None:
    # T07: CA-CBSA's message, signed with its own key, sent again over MX-ANAM's connection
    # (an hour later, so a check of its age would answer first if it came first)
    message_id, body = make_message(
        env,
        sender=CA,
        legal_basis=None,
        created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )
    answer = await post(env, body, cert=MX, signer=CA)
    await assert_nack(
        env,
        answer,
        NackCode.SENDER_MISMATCH,
        403,
        message_id=message_id,
        body=body,
        reason_contains=f"a message of CA-CBSA, signed with CA-CBSA's key {env.keys[CA].kid}",
    )


async def test_partner_a_certificate_claiming_sender_b(env: Env) -> None:
    message_id, body = make_message(env, sender=CA, legal_basis=None)
    answer = await post(env, body, cert=MX, signer=MX)
    await assert_nack(
        env,
        answer,
        NackCode.SENDER_MISMATCH,
        403,
        message_id=message_id,
        body=body,
        reason_contains="header.sender CA-CBSA differs",
    )


async def test_wrong_recipient(env: Env) -> None:
    message_id, body = make_message(env, recipient="GB-HMRC")
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.SENDER_MISMATCH,
        403,
        message_id=message_id,
        body=body,
        reason_contains="recipient GB-HMRC is not this gateway",
    )


async def test_not_authorized_type(env: Env) -> None:
    message_id, body = make_message(env, message_type="enforcement.seizure_report")
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.NOT_AUTHORIZED,
        403,
        message_id=message_id,
        body=body,
        reason_contains="may not send enforcement.seizure_report",
    )


async def test_missing_legal_basis(env: Env) -> None:
    message_id, body = make_message(env, legal_basis=None)
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.NOT_AUTHORIZED,
        403,
        message_id=message_id,
        body=body,
        reason_contains="legal_basis None",
    )


async def test_schema_invalid(env: Env) -> None:
    payload = env.gateway.registry.examples("shipment.advance_data", "1.0")[0]
    payload.pop(next(iter(payload)))
    message_id, body = make_message(env, payload=payload)
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.SCHEMA_INVALID,
        400,
        message_id=message_id,
        body=body,
        reason_contains="",
    )


async def test_unsupported_type(env: Env) -> None:
    message_id, body = make_message(env, schema_version="9.9")
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.UNSUPPORTED_TYPE,
        400,
        message_id=message_id,
        body=body,
        reason_contains="9.9",
    )


async def test_malformed_envelope_with_readable_id(env: Env) -> None:
    message_id, body = make_message(env)
    document = json.loads(body)
    document["extra"] = 1
    bad = json.dumps(document).encode()
    answer = await post(env, bad)
    await assert_nack(
        env,
        answer,
        NackCode.MALFORMED,
        400,
        message_id=message_id,
        body=bad,
        reason_contains="unknown member 'extra'",
    )


async def test_malformed_json_gets_problem_document(env: Env) -> None:
    body = b'{"header": {"message_id": 1,'
    answer = await post(env, body)
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["code"] == "MALFORMED"
    assert problem["status"] == 400
    entries = await rejections(env, NackCode.MALFORMED)
    assert len(entries) == 1
    assert entries[0]["sender"] == MX
    assert "message_id" not in entries[0]


async def test_content_encoding_refused(env: Env) -> None:
    message_id, body = make_message(env)
    answer = await post(env, body, headers={"Content-Encoding": "gzip"})
    await assert_nack(
        env,
        answer,
        NackCode.MALFORMED,
        400,
        message_id=message_id,
        body=body,
        reason_contains="Content-Encoding 'gzip' refused",
    )


async def test_stale(env: Env) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    message_id, body = make_message(env, created_at=old)
    answer = await post(env, body)
    await assert_nack(
        env,
        answer,
        NackCode.STALE,
        422,
        message_id=message_id,
        body=body,
        reason_contains="beyond the replay window",
    )


async def test_too_large_for_partner(env: Env) -> None:
    # CA-CBSA's limit is 4096 bytes; the body is signed and otherwise fine.
    _, body = make_message(env, sender=CA, legal_basis=None)
    body = body[:-2] + b',"pad":"' + b"x" * 5000 + b'"}}'
    answer = await post(env, body, cert=CA, signer=CA)
    assert answer.status == 413
    problem = answer.json()
    assert problem["code"] == "TOO_LARGE"
    entries = await rejections(env, NackCode.TOO_LARGE)
    assert len(entries) == 1
    assert "over CA-CBSA's limit of 4096" in entries[0]["reason"]


async def test_too_large_for_endpoint_is_cut_off(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        # chunked, so no Content-Length tells its size before it is read
        for _ in range(17):
            yield b"x" * 65_536

    answer = await post(env, chunks(), signer=None)
    assert answer.status == 413
    assert answer.json()["code"] == "TOO_LARGE"
    entries = await rejections(env, NackCode.TOO_LARGE)
    assert len(entries) == 1
    assert "cut off while reading" in entries[0]["reason"]


async def test_rate_limited(env: Env) -> None:
    answers = []
    ids = []
    for _ in range(3):
        message_id, body = make_message(env, sender=GB, legal_basis=None)
        ids.append(message_id)
        answers.append((await post(env, body, cert=GB, signer=GB), body))
    assert [a.status for a, _ in answers] == [202, 202, 429]
    limited, body = answers[2]
    assert int(limited.headers["Retry-After"]) >= 1
    receipt = check_receipt(env, limited, message_id=ids[2], body=body, recipient=GB)
    assert receipt.code == NackCode.RATE_LIMITED
    entries = await rejections(env, NackCode.RATE_LIMITED)
    assert len(entries) == 1
    assert "over its rate" in entries[0]["reason"]
    assert await env.gateway.store.get_inbound(GB, ids[2]) is None


async def test_store_unavailable_acknowledges_nothing(env: Env) -> None:
    message_id, body = make_message(env)
    await env.gateway.store.close()
    try:
        answer = await post(env, body)
    finally:
        await env.gateway.store.open()
    assert answer.status == 503
    receipt = check_receipt(env, answer, message_id=message_id, body=body)
    assert receipt.status == "NACK"
    assert receipt.code == NackCode.UNAVAILABLE
    assert await env.gateway.store.get_inbound(MX, message_id) is None
    # The partner retries once the store is back, and gets its ACK.
    retried = await post(env, body)
    assert retried.status == 202


# --- client certificates ------------------------------------------------------------------


async def _handshake_refused(env: Env, context: ssl.SSLContext, reason: str) -> None:
    """The handshake fails, nothing is stored, and the refusal is counted and audited
    (RELIABILITY-SECURITY T01-T03) with the reason and the peer's address."""
    _, body = make_message(env)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with session.post(env.url, data=body) as response:
                await response.read()
    entries = await tls_refusals(env)
    assert [(e["outcome"], e["transport"]) for e in entries] == [(reason, "https")]
    assert "; from 127.0.0.1:" in entries[0]["reason"]
    metrics = env.gateway.metrics.registry
    assert metrics.get_sample_value("c2c_tls_handshakes_refused_total", {"reason": reason}) == 1
    assert sum((await env.gateway.store.outbox_depth()).values()) == 0
    assert await env.gateway.store.audit_size() == 1


async def tls_refusals(env: Env) -> list[dict[str, Any]]:
    """The ``tls_refused`` entries, once the asynchronous append has landed."""
    store = env.gateway.store
    for _ in range(100):
        rows = await store.audit_entries(AuditFilter(event=EventKind.TLS_REFUSED.value))
        if rows:
            return [json.loads(row.entry) for row in rows]
        await asyncio.sleep(0.02)
    return []


async def test_no_client_certificate_refused(env: Env) -> None:
    await _handshake_refused(env, env.client_ssl(None), "no_cert")
    [entry] = await tls_refusals(env)
    assert entry["reason"].startswith("the client presented no certificate; from 127.0.0.1:")


async def test_plain_http_to_the_tls_port_is_a_protocol_refusal(env: Env) -> None:
    url = urlsplit(env.gateway.partner_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(b"POST /c2c/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    async with asyncio.timeout(5):
        await reader.read()  # closed by the server
    writer.close()
    [entry] = await tls_refusals(env)
    assert entry["outcome"] == "protocol"
    assert entry["reason"].startswith("HTTP_REQUEST; from 127.0.0.1:")
    # Served as before: a valid partner on the same port.
    _, body = make_message(env)
    assert (await post(env, body)).status == 202


async def test_a_request_sent_with_the_last_handshake_bytes_is_served(env: Env) -> None:
    # The server reads application data in the same read as the handshake's end.
    message_id, body = make_message(env)
    answer = await post_with_handshake_end(env, body)
    assert answer.startswith(b"HTTP/1.1 202 "), answer[:200]
    assert await env.gateway.store.get_inbound(MX, message_id) is not None


async def test_a_tls_1_1_client_is_refused_by_the_server(env: Env) -> None:
    # The client is allowed to offer TLS 1.1 (security level 0), so the refusal is the
    # server's: its minimum version is TLS 1.2 (T10).
    context = env.client_ssl(MX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    url = urlsplit(env.gateway.partner_url)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(
            url.hostname, url.port, ssl=context, server_hostname="127.0.0.1"
        )
    [entry] = await tls_refusals(env)
    assert entry["outcome"] == "protocol"
    assert entry["reason"].startswith("UNSUPPORTED_PROTOCOL; from 127.0.0.1:")


async def test_certificate_from_another_ca_refused(env: Env, tmp_path: Path) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    _, _, other_ca, other_key = issue_cert(
        tmp_path, "Other CA", issuer_cert=None, issuer_key=None, not_after=later
    )
    cert_path, key_path, _, _ = issue_cert(
        tmp_path, MX, issuer_cert=other_ca, issuer_key=other_key, not_after=later
    )
    await _handshake_refused(env, client_with(env, cert_path, key_path), "untrusted")


async def test_expired_certificate_refused(env: Env, tmp_path: Path) -> None:
    ca_cert, ca_key = dev_ca(env)
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert_path, key_path, _, _ = issue_cert(
        tmp_path, MX, issuer_cert=ca_cert, issuer_key=ca_key, not_after=expired
    )
    await _handshake_refused(env, client_with(env, cert_path, key_path), "expired")
    [entry] = await tls_refusals(env)
    assert entry["reason"].startswith("certificate has expired (verify error 10); from ")


async def test_valid_certificate_of_no_partner_gets_403_problem(env: Env) -> None:
    # US-CBP's own certificate chains to the CA but identifies no partner.
    _, body = make_message(env)
    answer = await post(env, body, cert=US)
    assert answer.status == 403
    assert answer.json()["code"] == "SENDER_MISMATCH"
    entries = await rejections(env, NackCode.SENDER_MISMATCH)
    assert len(entries) == 1
    assert "(CN 'US-CBP') identifies no configured partner" in entries[0]["reason"]
    assert "sender" not in entries[0]


# --- schemas and keys ---------------------------------------------------------------------


async def _get(env: Env, path: str) -> Answer:
    connector = aiohttp.TCPConnector(ssl=env.client_ssl(MX))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(env.gateway.partner_url + path) as response,
    ):
        return Answer(response.status, await response.read(), dict(response.headers))


async def test_schema_and_key_endpoints(env: Env) -> None:
    index = (await _get(env, "/c2c/v1/schemas")).json()["schemas"]
    assert {"receipt", "shipment.advance_data"} <= {entry["message_type"] for entry in index}
    schema = await _get(env, "/c2c/v1/schemas/receipt/1.0")
    assert schema.status == 200
    assert schema.json()["title"]
    assert (await _get(env, "/c2c/v1/schemas/receipt/9.9")).status == 404
    jwks = (await _get(env, "/c2c/v1/keys")).json()
    assert [key["kid"] for key in jwks["keys"]] == [k.kid for k in env.gateway.signing_keys]
    assert all("d" not in key for key in jwks["keys"])


async def test_an_unknown_path_or_method_is_a_problem_document(env: Env) -> None:
    """The router's 404 and 405 are RFC 9457 problems like every other refusal of the
    partner endpoint (PROTOCOL section 5), not aiohttp's text/plain."""
    connector = aiohttp.TCPConnector(ssl=env.client_ssl(MX))
    async with aiohttp.ClientSession(connector=connector) as session:
        for method, path, status in [
            ("GET", "/c2c/v1/message", 404),
            ("POST", "/c2c/v2/messages", 404),
            ("GET", "/c2c/v1/messages", 405),
            ("DELETE", "/c2c/v1/keys", 405),
        ]:
            async with session.request(method, env.gateway.partner_url + path) as response:
                assert response.status == status, (method, path)
                assert response.headers["Content-Type"] == "application/problem+json"
                problem = await response.json(content_type="application/problem+json")
                assert problem["status"] == status
                assert problem["detail"]
                if status == 405:
                    assert response.headers["Allow"] in {"POST", "GET"}
