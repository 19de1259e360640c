"""Credentials in a URL never reach the log, whatever the password holds and wherever the URL
stands in the text (an asyncpg, aiormq or yarl error, a config error); the rest of the line
stays readable: scheme, host and the words around the URL are kept."""

from __future__ import annotations

import re
import time

import pytest

from gateway.logging import REDACTED, scrub_event, scrub_text


def _pieces(secret: str) -> list[str]:
    """The secret's runs between special characters: none of them may be left in the log."""
    return [piece for piece in re.split(r"[^A-Za-z0-9]+", secret) if len(piece) >= 3]


LEAKS = [
    pytest.param(
        "connection to postgresql://c2c:Xq7/Zk9@db.example:5432/c2c failed",
        "Xq7/Zk9",
        ["connection to postgresql://", "@db.example:5432/c2c failed"],
        id="slash-in-a-sentence",
    ),
    pytest.param(
        "amqp://user:Wm2/Rt5?Cv8#Pb6@mq:5671/vh",
        "Wm2/Rt5?Cv8#Pb6",
        ["amqp://", "@mq:5671/vh"],
        id="slash-question-hash",
    ),
    pytest.param(
        "cannot reach postgresql://c2c:Hn4:Kd2@db.example/c2c: timeout",
        "Hn4:Kd2",
        ["cannot reach postgresql://", "@db.example/c2c: timeout"],
        id="colon",
    ),
    pytest.param(
        "cannot reach postgresql://c2c:Hn4@Kd2@db.example/c2c: timeout",
        "Hn4@Kd2",
        ["cannot reach postgresql://", "@db.example/c2c: timeout"],
        id="at-sign",
    ),
    pytest.param(
        "refused amqps://gw:Jv3!$&'()*+,;=Lq8@mq.example:5671/c2c now",
        "Jv3!$&'()*+,;=Lq8",
        ["refused amqps://", "@mq.example:5671/c2c now"],
        id="sub-delims",
    ),
    pytest.param(
        "InvalidDSN('postgresql://c2c:Xq7/Zk9@db.example/c2c')",
        "Xq7/Zk9",
        ["InvalidDSN('postgresql://", "@db.example/c2c')"],
        id="single-quotes",
    ),
    pytest.param(
        '{"url": "amqp://gw:Wm2/Rt5@mq.example/vh", "owner": "ops@partner.example"}',
        "Wm2/Rt5",
        ['{"url": "amqp://', '@mq.example/vh", "owner": "ops@partner.example"}'],
        id="double-quotes",
    ),
    pytest.param(
        "broker unreachable (amqp://gw:Wm2/Rt5@mq.example:5671/vh), retrying",
        "Wm2/Rt5",
        ["broker unreachable (amqp://", "@mq.example:5671/vh), retrying"],
        id="parentheses",
    ),
    pytest.param(
        "broker unreachable (amqp://gw:Wm2)Rt5@mq.example:5671/vh), retrying",
        "Wm2)Rt5",
        ["broker unreachable (amqp://", "@mq.example:5671/vh), retrying"],
        id="parenthesis-in-the-password",
    ),
    pytest.param(
        "store at postgresql://c2c:Xq7/Zk9@[::1]:5432/c2c is down",
        "Xq7/Zk9",
        ["store at postgresql://", "@[::1]:5432/c2c is down"],
        id="ipv6-host",
    ),
    pytest.param(
        "Traceback (most recent call last):\n  await connect('postgresql://c2c:Xq7/Zk9@db/c2c')"
        "\nOSError: refused",
        "Xq7/Zk9",
        ["Traceback (most recent call last):", "await connect('postgresql://", "@db/c2c')"],
        id="traceback-source-line",
    ),
    pytest.param(
        "connect failed: postgresql://db.example/c2c?sslmode=verify-full&password=Hn4/Kd2 (x)",
        "Hn4/Kd2",
        ["connect failed: postgresql://db.example/c2c?sslmode=verify-full&password=", " (x)"],
        id="query-password",
    ),
    pytest.param(
        "connect failed: postgresql://db.example/c2c?PASSWORD=Hn4Kd2&sslmode=require now",
        "Hn4Kd2",
        ["postgresql://db.example/c2c?PASSWORD=", "&sslmode=require now"],
        id="query-password-upper-case",
    ),
    pytest.param(
        "connect failed: postgresql://c2c@db/c2c?sslmode=verify-full&SslPassword=Jv3Lq8 now",
        "Jv3Lq8",
        ["postgresql://c2c@db/c2c?sslmode=verify-full&SslPassword=", " now"],
        id="query-sslpassword",
    ),
    pytest.param(
        "bad conninfo host=db.example password=Hn4Kd2 sslmode=require",
        "Hn4Kd2",
        ["bad conninfo host=db.example password=", " sslmode=require"],
        id="keyword-value",
    ),
    pytest.param(
        "bad conninfo host=db.example password='Hn4 Kd2' sslmode=require",
        "Hn4 Kd2",
        ["bad conninfo host=db.example password=", " sslmode=require"],
        id="keyword-value-quoted",
    ),
    pytest.param(
        "bad conninfo host=db.example password = Hn4Kd2 sslmode=require",
        "Hn4Kd2",
        ["bad conninfo host=db.example password = ", " sslmode=require"],
        id="keyword-value-spaced",
    ),
    pytest.param(
        "bad conninfo host=db.example password\t=\t'Hn4 Kd2' sslmode=require",
        "Hn4 Kd2",
        ["bad conninfo host=db.example password", " sslmode=require"],
        id="keyword-value-tabs-quoted",
    ),
    pytest.param(
        'refused {"user": "c2c", "password": "Hn4 \\"Kd2", "host": "db"}',
        'Hn4 \\"Kd2',
        ['refused {"user": "c2c", "password": ', ', "host": "db"}'],
        id="json-member",
    ),
    pytest.param(
        "store:\n  password: Hn4Kd2\n  host: db",
        "Hn4Kd2",
        ["store:", "password: ", "host: db"],
        id="yaml-member",
    ),
    pytest.param(
        "store.password='Hn4Kd2' is not allowed",
        "Hn4Kd2",
        ["store.password=", " is not allowed"],
        id="toml-quoted",
    ),
]


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
def test_a_password_in_a_url_is_redacted_and_the_rest_stays_readable(
    text: str, secret: str, kept: list[str]
) -> None:
    scrubbed = scrub_text(text, limit=10_000)
    for piece in _pieces(secret):
        assert piece not in scrubbed
    for part in kept:
        assert part in scrubbed
    assert REDACTED in scrubbed


def test_each_of_two_urls_in_one_line_loses_its_password() -> None:
    text = (
        "primary postgresql://a:Xq7/Zk9@db1.example/c2c, "
        "replica postgresql://b:Wm2?Rt5@db2.example/c2c: both down"
    )
    scrubbed = scrub_text(text, limit=10_000)
    assert scrubbed == (
        f"primary postgresql://{REDACTED}@db1.example/c2c, "
        f"replica postgresql://{REDACTED}@db2.example/c2c: both down"
    )


def test_user_and_password_are_replaced_and_the_host_kept() -> None:
    assert scrub_text("postgresql://c2c:pa/ss@db.example/c2c") == (
        f"postgresql://{REDACTED}@db.example/c2c"
    )


@pytest.mark.parametrize(
    "text",
    [
        "https://partner.example/path?x=1",
        "posted to https://partner.example:8443/c2c/v1/messages?x=1&y=2 (201)",
        "store at postgresql://127.0.0.1:5432/c2c is down",
        "mail ops@partner.example about it",
        "see https://partner.example/a and write to ops@partner.example",
        "user@host",
        "c2c@db.example:5432 refused",
        # a user name alone is not a secret, and says which account was refused
        "amqp://guest@mq/",
        "password authentication failed for user c2c at postgresql://c2c@db.example/c2c",
        "sqlite:///var/c2c.db",
    ],
)
def test_text_without_credentials_is_left_as_it_is(text: str) -> None:
    assert scrub_text(text, limit=10_000) == text


def test_a_logged_event_loses_the_password_of_a_url_in_any_field() -> None:
    event = scrub_event(
        None,
        "error",
        {
            "event": "store_unreachable",
            "error": "connection to postgresql://c2c:Xq7/Zk9@db.example:5432/c2c failed",
            "exception": "OSError: amqp://gw:Wm2?Rt5#Pb6@mq.example/vh refused",
        },
    )
    assert event == {
        "event": "store_unreachable",
        "error": f"connection to postgresql://{REDACTED}@db.example:5432/c2c failed",
        "exception": f"OSError: amqp://{REDACTED}@mq.example/vh refused",
    }


@pytest.mark.parametrize(
    "text",
    [
        "://" + "a:" * 50_000,
        "x://" + "@" * 50_000,
        "x://" * 25_000,
        "x://a:" * 20_000,
        "x://a:b@" * 12_500,
        "x:// " * 20_000,
        "?password=" * 10_000,
        "password='" + "\\" * 100_000,
        "password=a&" * 9_000,
        "password" + " " * 100_000,
        "password \t" * 10_000,
        "password" + " " * 50_000 + "=" + " " * 50_000,
        'password="' + "\\" * 100_000,
        "password:" * 11_000,
        "eyJ" * 33_333,
        "eyJabcdefgh." * 8_000,
        "-----BEGIN A" * 8_000,
        "bearer " * 14_000,
        "%3DeyJ" * 16_000,
    ],
)
def test_scrubbing_an_adversarial_line_takes_linear_time(text: str) -> None:
    started = time.perf_counter()
    scrub_text(text)
    assert time.perf_counter() - started < 1.0


JWS = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJjMmMifQ.Q0FOQVJZU0lHTkFUVVJFQ0FOQVJZ"


@pytest.mark.parametrize(
    "text",
    [
        f"{JWS}",
        f"Authorization token={JWS} refused",
        f'{{"jws": "{JWS}"}}',
        f"detached {JWS.split('.')[0]}..{JWS.split('.')[2]} failed",
        f"(token:{JWS})",
        f"GET /cb?access_token%3D{JWS}",
        f"Authorization: Bearer%20{JWS}",
        f"x%22{JWS}%22",
    ],
)
def test_a_compact_jws_is_redacted_where_a_token_can_start(text: str) -> None:
    assert "Q0FOQVJZU0lHTkFUVVJFQ0FOQVJZ" not in scrub_text(text)
    assert REDACTED in scrub_text(text)
