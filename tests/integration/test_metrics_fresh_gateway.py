"""The first scrape of a fresh ``c2c-gateway serve`` already has every counter series the
alert rules read, at 0, for each label value known in advance (enumerations, configured
partner ids). A series that first appears at 1 has no earlier sample for ``increase()`` to
compare with, so the first clock step, refused TLS reload or revoked certificate would never
alert (deploy/prometheus/c2c-gateway-alerts.yml).
"""

from __future__ import annotations

import itertools
import re
import ssl
from pathlib import Path

import aiohttp
import yaml
from outbound_env import free_port, gateway_config
from prometheus_client.parser import text_string_to_metric_families
from serve_proc import ServeProcess

from gateway import partner_keys
from gateway.errors import NackCode
from gateway.transports import tls_accept, tls_identity

RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "c2c-gateway-alerts.yml"
SELECTOR = re.compile(r"\b(c2c_[a-z0-9_]+_total)\b")


def counters_the_rules_read() -> set[str]:
    document = yaml.safe_load(RULES.read_text())
    exprs = [rule["expr"] for group in document["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in SELECTOR.findall(expr)}


def known_values(name: str, partners: list[str]) -> dict[str, list[str]]:
    """What each label of counter ``name`` can be, as the code that counts writes it, known
    before anything happened."""
    dispatcher = name == "c2c_dispatcher_failures_total"
    key_reloads = name == "c2c_partner_key_reloads_total"
    return {
        "partner": partners,
        # handshake and outbound refusals share tls_accept.REASONS; the dispatcher has its own
        "reason": ["store_unavailable", "internal_error"] if dispatcher else [*tls_accept.REASONS],
        "outcome": (
            [partner_keys.RELOADED, partner_keys.REFUSED]
            if key_reloads
            else [tls_identity.RELOADED, tls_identity.REFUSED]
        ),
        "direction": ["forward", "back"],
        "whose": ["ours", "partner"],
        "code": [code.value for code in NackCode],
        "transport": ["https", "amqp"],
        "result": ["acknowledged", "rejected", "retry", "dead", "handed"],
    }


async def test_a_fresh_gateway_exports_each_alerted_counter_at_zero(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, "US-CBP", partner_port=free_port())
    partners = sorted(config.partners)
    assert partners, "the dev environment configures partners"
    server = ServeProcess(config.source)
    await server.start()
    try:
        api_ca = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=api_ca)) as session,
            session.get(server.api_url + "/metrics") as response,
        ):
            assert response.status == 200
            text = await response.text()
    finally:
        assert await server.stop() == 0, server.stderr_log.decode()[-3000:]

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[key] = sample.value
    read = counters_the_rules_read()
    assert "c2c_clock_steps_total" in read
    for name in sorted(read):
        values = known_values(name, partners)
        assert name in samples, f"{name} is not on a fresh gateway's /metrics"
        series = samples[name]
        assert set(series.values()) == {0.0}, f"{name}: {series}"
        labels = {label for key in series for label, _ in key}
        unknown = labels - values.keys()
        assert not unknown, f"{name}: no known values for the label(s) {unknown}"
        # a key's labels are sorted by name, and so are the choices
        present = {tuple(value for _, value in key) for key in series}
        choices = [values[label] for label in sorted(labels)]
        missing = set(itertools.product(*choices)) - present
        assert not missing, f"{name} lacks the series {sorted(missing)}"
