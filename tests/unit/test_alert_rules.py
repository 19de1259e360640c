"""The shipped Prometheus alerting rules name only what the gateway exports.

`promtool test rules` on the rules' test files (``RULE_TESTS``) tests what the rules do. It
runs here when Prometheus's `promtool` is on PATH; `.ci/run` installs it and sets
`C2C_REQUIRE_PROMTOOL=1`, which makes a missing one a failure. The rest keeps the rules from
drifting from the code: every metric, label, label value and template label in the rules
exists in `gateway.metrics.Metrics`; and every rule that alerts on one event also fires when the
event's counter series first appears, already above 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from gateway import partner_keys
from gateway.errors import NackCode
from gateway.metrics import OUTBOUND_RESULTS, Metrics
from gateway.store.base import OutboundState
from gateway.transports import tls_identity
from gateway.transports.tls_accept import REASONS

RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "c2c-gateway-alerts.yml"
#: promtool's unit tests of the rules; the certificate-expiry ones, which span weeks, have a
#: file of their own with a coarser evaluation step
RULE_TESTS = (
    RULES.with_name("c2c-gateway-alerts.test.yml"),
    RULES.with_name("c2c-gateway-alerts-expiry.test.yml"),
)
#: labels Prometheus adds to every scraped series
TARGET_LABELS = frozenset({"instance", "job"})
#: the values a label can take, where the code fixes them
VALUES = {
    "state": frozenset(state.value for state in OutboundState),
    "reason": frozenset(REASONS),
    "outcome": frozenset(
        {tls_identity.RELOADED, tls_identity.REFUSED, partner_keys.RELOADED, partner_keys.REFUSED}
    ),
    "whose": frozenset({"ours", "partner"}),
    "code": frozenset(code.value for code in NackCode),
    "result": frozenset(OUTBOUND_RESULTS),
}
SELECTOR = re.compile(r"\b(c2c_[a-z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
#: ``increase(x[w]) > 0``: the selector and the window
INCREASE = re.compile(r"increase\((c2c_[a-z0-9_]+(?:\{[^}]*\})?)\[(\w+)\]\) > 0")


def exported() -> dict[str, frozenset[str]]:
    """Every series name /metrics can show, with its labels."""
    names: dict[str, frozenset[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        # prometheus_client keeps a metric's name and label names on these attributes
        name, labels = metric._name, frozenset(metric._labelnames)
        if isinstance(metric, Counter):
            names[f"{name}_total"] = labels
        elif isinstance(metric, Histogram):
            for suffix in ("_sum", "_count"):
                names[name + suffix] = labels
            names[f"{name}_bucket"] = labels | {"le"}
        else:
            names[name] = labels
    return names


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_rules_are_found() -> None:
    assert len(rules()) >= 10
    assert "c2c_tls_certificate_expiry_timestamp_seconds" in exported()


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_a_rule_names_only_what_the_gateway_exports(rule: dict[str, Any]) -> None:
    series = exported()
    expr = rule["expr"]
    selectors = SELECTOR.findall(expr)
    assert selectors, expr
    labels: set[str] = set(TARGET_LABELS)
    for name, matchers in selectors:
        assert name in series, f"{rule['alert']}: {name} is not exported"
        labels |= series[name]
        for label, _, value in MATCHER.findall(matchers):
            assert label in series[name], f"{rule['alert']}: {name} has no label {label}"
            if label in VALUES:
                for choice in value.split("|"):
                    assert choice in VALUES[label], f"{rule['alert']}: {label}={choice!r}"
    for grouped in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in grouped.split(","):
            assert label.strip() in labels, f"{rule['alert']}: by ({label.strip()})"
    for text in rule["annotations"].values():
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in labels, f"{rule['alert']}: $labels.{label}"
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]


def one_event_rules() -> list[dict[str, Any]]:
    """The rules that alert on any rise of a counter, at once (no ``for``)."""
    return [rule for rule in rules() if "for" not in rule and INCREASE.search(rule["expr"])]


def test_the_one_event_rules_are_found() -> None:
    assert {rule["alert"] for rule in one_event_rules()} >= {
        "C2CClockStepped",
        "C2CTlsCertificateReloadRefused",
        "C2CPartnerKeysReloadRefused",
        "C2CPartnerRevocationUnknown",
    }


@pytest.mark.parametrize("rule", one_event_rules(), ids=lambda rule: rule["alert"])
def test_a_one_event_rule_fires_when_its_series_first_appears(rule: dict[str, Any]) -> None:
    """``increase()`` needs two samples: a series first scraped at 1 shows no rise. Each
    ``increase(x[w]) > 0`` also has ``(x > 0 unless x offset w)``, as the rules file says."""
    expr = " ".join(rule["expr"].split())
    for selector, window in INCREASE.findall(expr):
        branch = f"({selector} > 0 unless {selector} offset {window})"
        assert branch in expr, f"{rule['alert']}: no {branch}"


def test_the_rules_pass_their_promtool_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("C2C_REQUIRE_PROMTOOL") == "1":
            pytest.fail("C2C_REQUIRE_PROMTOOL=1 but promtool is not on PATH")
        pytest.skip("promtool (Debian package prometheus) is not on PATH")
    for args in (["check", "rules", RULES.name], ["test", "rules", *(t.name for t in RULE_TESTS)]):
        done = subprocess.run(
            [promtool, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_every_rule_has_a_promtool_test_in_which_it_fires() -> None:
    """A rule left out of the test files, or tested only for staying quiet, is untested."""
    alerts = {rule["alert"] for rule in rules()}
    fired: set[str] = set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    fired.add(case["alertname"])
    assert alerts - fired == set()
    assert fired - alerts == set()
