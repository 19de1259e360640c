"""Classifying refused TLS handshakes, how many of them are recorded, and whose handshake
starts first."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from gateway.transports.tls_accept import (
    REASONS,
    VOUCHED_RUN,
    HandshakeTurns,
    PeerRefused,
    RefusalWindow,
    check_still_valid,
    classify,
    source_of,
)


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED]")
    exc.verify_code = code
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (23, "certificate revoked", "revoked"),
        (10, "certificate has expired", "expired"),
        (9, "certificate is not yet valid", "not_yet_valid"),
        (12, "CRL has expired", "revocation_unknown"),
        (3, "unable to get certificate CRL", "revocation_unknown"),
        (20, "unable to get local issuer certificate", "untrusted"),
        (18, "self-signed certificate", "untrusted"),
        (7, "certificate signature failure", "bad_certificate"),
    ],
)
def test_verify_errors(code: int, message: str, reason: str) -> None:
    assert classify(verify_error(code, message)) == (reason, f"{message} (verify error {code})")


def test_other_handshake_errors() -> None:
    no_cert = ssl.SSLError(1, "peer did not return a certificate")
    no_cert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert classify(no_cert) == ("no_cert", "the client presented no certificate")
    plain = ssl.SSLError(1, "http request")
    plain.reason = "HTTP_REQUEST"
    assert classify(plain) == ("protocol", "HTTP_REQUEST")
    assert {classify(e)[0] for e in (no_cert, plain)} <= set(REASONS)


def test_first_refusal_per_key_and_window_is_recorded() -> None:
    window = RefusalWindow(window_s=60.0, budget=100)
    key = ("192.0.2.7", "revoked")
    assert window.admit(key, now=0.0) == 0
    assert window.admit(key, now=1.0) is None
    assert window.admit(key, now=59.0) is None
    assert window.admit(("192.0.2.7", "expired"), now=59.0) == 0
    assert window.admit(("192.0.2.8", "revoked"), now=59.0) == 0
    # The next one recorded says how many went unrecorded since the last.
    assert window.admit(key, now=60.0) == 2
    assert window.admit(key, now=61.0) is None


def test_a_flood_from_many_addresses_is_bounded_by_the_budget() -> None:
    window = RefusalWindow(window_s=60.0, budget=3)
    admitted = [window.admit((f"2001:db8::{i}", "untrusted"), now=1.0) for i in range(10)]
    assert admitted == [0, 0, 0] + [None] * 7
    # Another kind of refusal has its own budget: a flood of one cannot hide the other.
    assert window.admit(("2001:db8::99", "revoked"), now=2.0) == 0
    # A new window, a new budget; an address that went unrecorded says so.
    assert window.admit(("2001:db8::5", "untrusted"), now=61.0) == 1


def test_the_table_of_addresses_is_bounded() -> None:
    window = RefusalWindow(window_s=60.0, budget=1_000, max_keys=4)
    for i in range(10):
        window.admit((f"198.51.100.{i}", "protocol"), now=0.0)
    # The oldest were forgotten: the first address is recorded again at once.
    assert window.admit(("198.51.100.0", "protocol"), now=1.0) == 0
    assert window.admit(("198.51.100.9", "protocol"), now=1.0) is None


async def _order_of_turns(turns: HandshakeTurns, hosts: list[str]) -> list[str]:
    """Queue one connection per host, in order, once the burst is spent; the order in which
    they get their turns."""
    loop = asyncio.get_running_loop()
    for _ in range(2):  # the burst (2 at 8 a second)
        await turns.take("spends-the-burst", loop.time() + 5)
    order: list[str] = []

    async def one(host: str) -> None:
        await turns.take(host, loop.time() + 5)
        order.append(host)

    tasks = []
    for host in hosts:
        tasks.append(asyncio.create_task(one(host)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return order


async def test_vouched_for_addresses_take_their_turns_first() -> None:
    turns = HandshakeTurns(8.0)
    turns.vouch("10.0.0.9")
    order = await _order_of_turns(turns, ["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.0.3"])
    assert order == ["10.0.0.9", "10.0.0.1", "10.0.0.2", "10.0.0.3"]


async def test_vouched_for_sources_cannot_keep_the_others_out() -> None:
    turns = HandshakeTurns(8.0)
    turns.vouch("10.0.0.9")
    strangers = ["10.0.0.1", "10.0.0.2"]
    order = await _order_of_turns(turns, [*strangers, *["10.0.0.9"] * 7])
    # While both lanes wait, one turn in VOUCHED_RUN + 1 goes to the strangers ...
    assert VOUCHED_RUN == 3
    assert order[:8] == ["10.0.0.9"] * 3 + ["10.0.0.1"] + ["10.0.0.9"] * 3 + ["10.0.0.2"]
    # ... and the vouched-for lane has the rest once they are served.
    assert order[8:] == ["10.0.0.9"]


async def test_a_vouch_runs_out() -> None:
    turns = HandshakeTurns(8.0, vouched_s=0.05)
    turns.vouch("10.0.0.9")
    await asyncio.sleep(0.06)
    assert await _order_of_turns(turns, ["10.0.0.1", "10.0.0.9"]) == ["10.0.0.1", "10.0.0.9"]


async def test_the_least_recently_vouched_for_is_forgotten_first() -> None:
    turns = HandshakeTurns(8.0, max_vouched=2)
    for host in ("10.0.0.7", "10.0.0.8", "10.0.0.6"):
        turns.vouch(host)
    assert await _order_of_turns(turns, ["10.0.0.7", "10.0.0.8"]) == ["10.0.0.8", "10.0.0.7"]


def test_a_resumed_session_must_hold_a_certificate_still_valid() -> None:
    cert = {"notBefore": "Jan  1 00:00:00 2026 GMT", "notAfter": "Jan  1 00:00:00 2027 GMT"}
    # valid for the seconds left: the connection is served no longer
    assert check_still_valid(cert, ssl.cert_time_to_seconds("Dec 31 23:59:00 2026 GMT")) == 60
    for now, reason in (
        ("Jan  1 00:00:01 2027 GMT", "expired"),
        ("Dec 31 23:59:59 2025 GMT", "not_yet_valid"),
    ):
        with pytest.raises(PeerRefused) as refused:
            check_still_valid(cert, ssl.cert_time_to_seconds(now))
        assert refused.value.reason == reason
    with pytest.raises(PeerRefused) as refused:
        check_still_valid({}, 0.0)
    assert refused.value.reason == "bad_certificate"


@pytest.mark.parametrize(
    ("host", "prefix", "source"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        # an IPv6 peer counts under its /64: its other addresses there are the same source
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
        # an IPv4 peer on a dual-stack socket is its IPv4 address
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("fe80::1:2%eth0", 64, "fe80::/64"),
        ("::1", 64, "::/64"),
        ("unknown", 64, "unknown"),
    ],
)
def test_the_source_a_peer_counts_under(host: str, prefix: int, source: str) -> None:
    assert source_of(host, prefix) == source
