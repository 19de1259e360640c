"""``c2c-gateway amqp setup`` against the real broker: vhost, users, least-privilege permissions.

Also the broker-side identity checks of PROTOCOL section 5 (RELIABILITY-SECURITY T50a, T51):
a partner user can publish only to its own inbound exchange, read only its own ``.out`` queue,
and cannot forge the ``user_id`` property.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest
from amqp_env import AMQP_PARTNER, write_config
from click.testing import CliRunner
from rabbit import HOST, PORT, RabbitVhost, rabbitmqctl

from gateway.cli.main import cli

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def fresh() -> Iterator[tuple[RabbitVhost, str]]:
    """A vhost name and a partner user name that do not exist yet; both removed afterwards."""
    tag = uuid.uuid4().hex[:10]
    vhost, user = RabbitVhost(f"c2c-setup-{tag}"), f"mx-anam-{tag}"
    yield vhost, user
    for args in (("delete_vhost", vhost.name), ("delete_user", user)):
        with contextlib.suppress(RuntimeError):
            rabbitmqctl(*args)


def _setup(config: Path, secrets: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        cli, ["amqp", "setup", "--config", str(config), "--secrets-dir", str(secrets)]
    )
    return result.exit_code, result.stdout, result.stderr


def test_setup_creates_least_privilege_partner_user(
    tmp_path: Path, fresh: tuple[RabbitVhost, str]
) -> None:
    vhost, user = fresh
    config = write_config(tmp_path, amqp_url=vhost.url(), amqp_user=user)
    secrets = tmp_path / "secrets"

    code, out, err = _setup(config, secrets)
    assert code == 0, err
    assert f"created vhost {vhost.name}" in out
    assert f"created user {user} for {AMQP_PARTNER} (password in {secrets / user}.password)" in out
    assert f"set permissions of {user} on {vhost.name}: configure=^$" in out
    assert "declared c2c.partner.MX-ANAM.in" in out
    password_file = secrets / f"{user}.password"
    password = password_file.read_text().strip()
    assert password not in out + err
    assert password_file.stat().st_mode & 0o777 == 0o600

    # Idempotent: a second run keeps the users and their passwords.
    code, out, err = _setup(config, secrets)
    assert code == 0, err
    assert f"vhost {vhost.name} exists" in out
    assert f"user {user} exists (password unchanged)" in out
    assert password_file.read_text().strip() == password

    asyncio.run(_check_partner_rights(vhost, user, password))


def test_setup_gives_the_dead_letter_queues_a_limit_no_replay_reaches(
    tmp_path: Path, fresh: tuple[RabbitVhost, str]
) -> None:
    """RabbitMQ 4 gives a quorum queue declared without a delivery limit one of 20 returns,
    after which a dead-lettered message would be dropped: a policy sets one on the .dead
    queues, and on them only (the others keep the limit they are declared with)."""
    vhost, user = fresh
    config = write_config(tmp_path, amqp_url=vhost.url(), amqp_user=user)
    for _ in range(2):  # idempotent
        code, out, err = _setup(config, tmp_path / "secrets")
        assert code == 0, err
        assert f"set policy c2c-dead-letter-queues on {vhost.name}: the dead-letter queues" in out
    policies = json.loads(rabbitmqctl("list_policies", "-p", vhost.name, "--formatter", "json"))
    assert [(p["name"], p["pattern"], json.loads(p["definition"])) for p in policies] == [
        ("c2c-dead-letter-queues", r"^c2c\..*\.dead$", {"delivery-limit": 1_000_000})
    ]
    queues = json.loads(
        rabbitmqctl("list_queues", "-p", vhost.name, "name", "policy", "--formatter", "json")
    )
    dead = {q["name"] for q in queues if q["name"].endswith(".dead")}
    assert dead >= {"c2c.submit.dead", f"c2c.partner.{AMQP_PARTNER}.in.dead"}, queues
    assert {q["name"]: q["policy"] for q in queues} == {
        q["name"]: "c2c-dead-letter-queues" if q["name"] in dead else "" for q in queues
    }


async def _check_partner_rights(vhost: RabbitVhost, user: str, password: str) -> None:
    # T49: without the generated password the partner's user is refused at login
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(f"amqp://{user}:not-{password}@{HOST}:{PORT}/{vhost.name}")
    url = f"amqp://{user}:{password}@{HOST}:{PORT}/{vhost.name}"
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        inbox = await channel.get_exchange("c2c.partner.MX-ANAM.in", ensure=False)
        await inbox.publish(aio_pika.Message(b"{}", message_id="m-1", user_id=user), routing_key="")
        out_queue = await channel.get_queue("c2c.partner.MX-ANAM.out", ensure=False)
        assert await out_queue.get(fail=False) is None

        # T51: the default exchange would reach any queue, the internal exchanges are not its.
        for exchange, key in (
            ("", "c2c.partner.MX-ANAM.in"),
            ("c2c.inbound", "x"),
            ("c2c.submit", ""),
        ):
            channel = await connection.channel()
            target = (
                channel.default_exchange
                if exchange == ""
                else await channel.get_exchange(exchange, ensure=False)
            )
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await target.publish(aio_pika.Message(b"{}"), routing_key=key)

        # Nor may it read the inbound queue (its own messages before the gateway did).
        channel = await connection.channel()
        in_queue = await channel.get_queue("c2c.partner.MX-ANAM.in", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await in_queue.get(fail=False)

        # T50a: Validated User-ID, the broker refuses a forged user_id.
        channel = await connection.channel()
        inbox = await channel.get_exchange("c2c.partner.MX-ANAM.in", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await inbox.publish(aio_pika.Message(b"{}", user_id="someone-else"), routing_key="")
    finally:
        await connection.close()

    # The one allowed message is in the inbound queue.
    admin = await aio_pika.connect(vhost.url())
    try:
        channel = await admin.channel()
        queue = await channel.get_queue("c2c.partner.MX-ANAM.in", ensure=False)
        message = await queue.get(fail=False)
        assert message is not None
        assert message.message_id == "m-1"
        assert message.user_id == user
        await message.ack()
    finally:
        await admin.close()


def test_setup_needs_an_amqp_url(tmp_path: Path) -> None:
    config = write_config(tmp_path, amqp_url=None, amqp_partner_https=True)
    # a partner on AMQP without a broker: the configuration itself is refused
    partner_file = tmp_path / "partners" / AMQP_PARTNER / "partner.toml"
    code, _, err = _setup(config, tmp_path / "secrets")
    assert code == 2
    assert err.startswith(f"error: {partner_file}: amqp.enabled: true, but {config} has no")
    # no partner on AMQP (MX-ANAM on HTTPS only): setup still needs the broker's URL
    partner_file.write_text(partner_file.read_text().replace("enabled = true", "enabled = false"))
    code, _, err = _setup(config, tmp_path / "secrets")
    assert code == 2
    assert (
        err == f"error: {config}: amqp.url: not set; setup needs the broker URL (with its vhost)\n"
    )


def test_setup_needs_the_partner_broker_user(
    tmp_path: Path, fresh: tuple[RabbitVhost, str]
) -> None:
    vhost, _ = fresh
    config = write_config(tmp_path, amqp_url=vhost.url())
    partner_file = tmp_path / "partners" / AMQP_PARTNER / "partner.toml"
    text = partner_file.read_text()
    partner_file.write_text(
        "\n".join(line for line in text.splitlines() if "broker_user" not in line)
    )
    code, out, err = _setup(config, tmp_path / "secrets")
    assert code == 2
    assert out == ""
    assert err == (
        f"error: {partner_file}: amqp.broker_user: required when amqp.enabled "
        "(the partner's RabbitMQ user)\n"
    )
