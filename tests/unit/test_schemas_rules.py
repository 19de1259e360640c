"""Cross-field rules: boundaries that must pass, and the instants they compare."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.errors import SchemaInvalid
from gateway.schemas import SchemaRegistry

ADVANCE = "shipment.advance_data"


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load_builtin()


def _advance(registry: SchemaRegistry) -> dict[str, Any]:
    return copy.deepcopy(registry.examples(ADVANCE, "1.0")[0])


@pytest.mark.parametrize(
    ("departure", "arrival"),
    [
        ("2026-03-02T09:40:00-06:00", "2026-03-02T07:40:00-08:00"),  # same instant
        ("2026-03-02t15:40:00z", "2026-03-02T15:40:00.5Z"),
        ("2026-03-02T15:40:00.123456789Z", "2026-03-02T15:40:00.123457Z"),
    ],
)
def test_arrival_at_or_after_departure_passes_across_offsets(
    registry: SchemaRegistry, departure: str, arrival: str
) -> None:
    payload = _advance(registry)
    payload["estimated_departure"] = departure
    payload["estimated_arrival"] = arrival
    registry.validate(ADVANCE, "1.0", payload)


def test_arrival_one_second_before_departure_fails(registry: SchemaRegistry) -> None:
    payload = _advance(registry)
    payload["estimated_departure"] = "2026-03-02T09:40:00-06:00"
    payload["estimated_arrival"] = "2026-03-02T07:39:59-08:00"
    with pytest.raises(SchemaInvalid) as info:
        registry.validate(ADVANCE, "1.0", payload)
    assert info.value.pointer == "/estimated_arrival"


def test_net_mass_equal_to_gross_and_rounding_tolerance_pass(registry: SchemaRegistry) -> None:
    payload = _advance(registry)
    item = payload["goods_items"][0]
    item["net_mass_kg"] = item["gross_mass_kg"]
    payload["total_declared_value"] = {"amount": "38.51", "currency": "USD"}
    registry.validate(ADVANCE, "1.0", payload)


def test_manifest_house_masses_may_fill_the_master_exactly(registry: SchemaRegistry) -> None:
    payload = copy.deepcopy(registry.examples("shipment.manifest", "1.0")[0])
    payload["masters"][0]["gross_mass_kg"] = 0.654 + 1.25
    registry.validate("shipment.manifest", "1.0", payload)
