"""A gateway configuration directory for the AMQP tests: dev PKI, gateway.toml, two partners.

``MX-ANAM`` uses AMQP (broker user ``mx-anam``) and ``CA-CBSA`` HTTPS only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from serve_proc import signed_messages

from gateway.config import GatewayConfig, load_config
from gateway.crypto.pki import init_dev_pki

GATEWAY = "US-CBP"
AMQP_PARTNER = "MX-ANAM"
AMQP_USER = "mx-anam"
HTTPS_PARTNER = "CA-CBSA"

#: the message type the backlog and crash tests send
ADVANCE_DATA = "shipment.advance_data"

_TYPES = """[
    "shipment.advance_data", "shipment.status", "enforcement.risk_alert",
    "query.shipment_lookup", "query.response", "receipt", "shipment.manifest",
]"""


def write_config(
    root: Path,
    *,
    amqp_url: str | None,
    amqp_user: str = AMQP_USER,
    delivery_limit: int = 3,
    publish_timeout_s: float = 5.0,
    prefetch: int = 50,
    rate_per_second: float = 10_000.0,
    burst: int = 20_000,
    amqp_partner_https: bool = False,
    partner_max_body_bytes: int | None = None,
) -> Path:
    """Write the configuration under ``root``; returns the path of gateway.toml. With
    ``amqp_partner_https``, MX-ANAM may also send over HTTPS (its dev client certificate);
    ``partner_max_body_bytes``, the partners' ``max_body_bytes``."""
    init_dev_pki(root / "certs", [GATEWAY, AMQP_PARTNER, HTTPS_PARTNER], gateway_party=GATEWAY)
    amqp = f'url = "{amqp_url}"\n' if amqp_url else ""
    (root / "gateway.toml").write_text(
        f"""party = "{GATEWAY}"
partners_dir = "partners"
store_url = "sqlite:///c2c.db"

[partner_listen]
port = 0

[api_listen]
port = 0

[tls]
cert = "certs/{GATEWAY}/tls.pem"
key = "certs/{GATEWAY}/tls.key"
ca = "certs/ca.pem"

[[signing_keys]]
path = "certs/{GATEWAY}/sign.key"
alg = "EdDSA"
not_before = 2020-01-01T00:00:00Z

[amqp]
{amqp}prefetch = {prefetch}
delivery_limit = {delivery_limit}
publish_timeout_s = {publish_timeout_s}

[api_auth]
issuer = "urn:test"
audience = "urn:test:api"
public_keys = ["certs/{GATEWAY}/api-token.pub"]

[audit]
key = "certs/{GATEWAY}/audit.key"
origin = "test/{GATEWAY}"
""",
        "utf-8",
    )
    for partner, transport in (
        (
            AMQP_PARTNER,
            f'[amqp]\nenabled = true\nbroker_user = "{amqp_user}"\n'
            + (
                f'\n[https]\nca = "../../certs/ca.pem"\nclient_cert_subjects = ["{AMQP_PARTNER}"]\n'
                if amqp_partner_https
                else ""
            ),
        ),
        (
            HTTPS_PARTNER,
            '[https]\nurl = "https://127.0.0.1:9/c2c/v1/messages"\nca = "../../certs/ca.pem"\n'
            'allowed_networks = ["127.0.0.1/32"]\n',
        ),
    ):
        folder = root / "partners" / partner
        folder.mkdir(parents=True, exist_ok=True)
        limit = (
            f"max_body_bytes = {partner_max_body_bytes}\n"
            if partner_max_body_bytes is not None
            else ""
        )
        (folder / "partner.toml").write_text(
            f"""id = "{partner}"
name = "{partner} test partner"
inbound_types = {_TYPES}
outbound_types = {_TYPES}
{limit}
[[keys]]
path = "../../certs/{partner}/sign.pub"
alg = "EdDSA"
not_before = 2020-01-01T00:00:00Z

[rate]
per_second = {rate_per_second}
burst = {burst}

{transport}""",
            "utf-8",
        )
    return root / "gateway.toml"


def partner_messages(root: Path, count: int) -> list[tuple[str, bytes, str]]:
    """``count`` signed ``shipment.advance_data`` messages from the AMQP partner to the gateway
    of ``write_config(root, ...)``, as ``(message_id, body, signature)``."""
    return signed_messages(
        root / "certs",
        sender=AMQP_PARTNER,
        recipient=GATEWAY,
        count=count,
        message_type=ADVANCE_DATA,
    )


def config_without_broker(root: Path, **options: Any) -> GatewayConfig:
    """The configuration of ``write_config``, with MX-ANAM on AMQP, but no broker for the
    gateway itself (a gateway.toml without one is refused for that partner): the test runs
    the partner's inbox on a broker connection of its own."""
    config = load_config(write_config(root, amqp_url="amqp://127.0.0.1:5672/unused", **options))
    return dataclasses.replace(config, amqp=dataclasses.replace(config.amqp, url=None))
