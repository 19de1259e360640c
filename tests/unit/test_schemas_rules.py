"""Cross-field rules: boundaries that must pass, and the instants they compare."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import SchemaInvalid
from gateway.schemas import SchemaRegistry
from gateway.schemas.rules import _too_precise

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


@pytest.mark.parametrize(
    ("departure", "arrival"),
    [
        # a leap second (RFC 3339 second 60) comes after every instant of 23:59:59
        ("2026-12-31T23:59:59.9Z", "2026-12-31T23:59:60Z"),
        ("2026-12-31T18:59:59.9-05:00", "2026-12-31T18:59:60-05:00"),
        ("2026-12-31T23:59:60Z", "2027-01-01T00:00:00Z"),
    ],
)
def test_a_leap_second_is_after_the_second_before_it(
    registry: SchemaRegistry, departure: str, arrival: str
) -> None:
    payload = _advance(registry)
    payload["estimated_departure"] = departure
    payload["estimated_arrival"] = arrival
    registry.validate(ADVANCE, "1.0", payload)


@pytest.mark.parametrize(
    ("message_type", "earlier", "later"),
    [
        (ADVANCE, "estimated_departure", "estimated_arrival"),
        ("enforcement.risk_alert", "issued_at", "valid_until"),
    ],
)
def test_a_time_before_a_leap_second_is_before_it(
    registry: SchemaRegistry, message_type: str, earlier: str, later: str
) -> None:
    """Read as the header parser reads it: 23:59:60 is not 23:59:59.000, so 23:59:59.5 is
    before it."""
    payload = copy.deepcopy(registry.examples(message_type, "1.0")[0])
    payload[earlier] = "2026-12-31T23:59:60Z"
    payload[later] = "2026-12-31T23:59:59.5Z"
    with pytest.raises(SchemaInvalid) as info:
        registry.validate(message_type, "1.0", payload)
    assert info.value.pointer == f"/{later}"


def test_a_date_time_beyond_the_years_a_datetime_holds_is_refused_where_it_is(
    registry: SchemaRegistry,
) -> None:
    """The format takes the leap second after the last second of 9999; the rule cannot compare
    its instant and says so at its pointer."""
    payload = _advance(registry)
    payload["estimated_departure"] = "9999-12-31T23:59:60Z"
    with pytest.raises(SchemaInvalid) as info:
        registry.validate(ADVANCE, "1.0", payload)
    assert info.value.pointer == "/estimated_departure"
    assert info.value.reason == "/estimated_departure: is out of range (years 0001 to 9999 UTC)"


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


MANIFEST = "shipment.manifest"
EXPORT = "shipment.export_declaration"
LOOKUP = "query.shipment_lookup"
RESPONSE = "query.response"


def _example(registry: SchemaRegistry, message_type: str, index: int = 0) -> dict[str, Any]:
    return copy.deepcopy(registry.examples(message_type, "1.0")[index])


def _refused_at(registry: SchemaRegistry, message_type: str, payload: Any) -> str:
    with pytest.raises(SchemaInvalid) as info:
        registry.validate(message_type, "1.0", payload)
    return info.value.pointer


def _second_item(item: dict[str, Any], count: int, gross_mass_kg: float) -> dict[str, Any]:
    second = copy.deepcopy(item)
    second["sequence"] = 2
    second["packages"] = [{"type_code": "PK", "count": count}]
    second["gross_mass_kg"] = gross_mass_kg
    second.pop("net_mass_kg", None)
    return second


def test_advance_total_packages_counts_later_items_sharing_packages_as_zero(
    registry: SchemaRegistry,
) -> None:
    payload = _advance(registry)
    item = payload["goods_items"][0]
    payload["goods_items"].append(_second_item(item, 0, 0.1))
    item["value"]["amount"] = "30.00"
    payload["goods_items"][1]["value"]["amount"] = "8.50"
    payload["total_gross_mass_kg"] = 0.754
    registry.validate(ADVANCE, "1.0", payload)
    payload["total_packages"] = 2
    assert _refused_at(registry, ADVANCE, payload) == "/total_packages"


@pytest.mark.parametrize(
    ("items_kg", "total_kg", "accepted"),
    [
        ([0.654], 0.664, True),  # 0.01 kg floor above 1 % of 0.654
        ([0.654], 0.644, True),
        ([0.654], 0.665, False),
        ([0.654], 0.643, False),
        ([1000.0, 840.0], 1858.4, True),  # 1 % of 1840 kg
        ([1000.0, 840.0], 1821.6, True),
        ([1000.0, 840.0], 1858.401, False),
        ([1000.0, 840.0], 1821.599, False),
    ],
)
def test_advance_total_gross_mass_within_one_percent_or_ten_grams(
    registry: SchemaRegistry, items_kg: list[float], total_kg: float, accepted: bool
) -> None:
    payload = _advance(registry)
    first = payload["goods_items"][0]
    first.pop("net_mass_kg")
    first["gross_mass_kg"] = items_kg[0]
    payload["goods_items"] += [_second_item(first, 0, kg) for kg in items_kg[1:]]
    for item in payload["goods_items"][1:]:
        item["value"]["amount"] = "0"
    payload["total_gross_mass_kg"] = total_kg
    if accepted:
        registry.validate(ADVANCE, "1.0", payload)
    else:
        assert _refused_at(registry, ADVANCE, payload) == "/total_gross_mass_kg"


@pytest.mark.parametrize(
    ("routing", "pointer"),
    [
        (["MX", "US"], None),
        (["MX"], "/countries_of_routing/0"),
        (["MX", "GT", "US"], None),
        (["US", "MX", "US"], "/countries_of_routing/0"),
        (["MX", "US", "CA"], "/countries_of_routing/2"),
    ],
)
def test_advance_routing_runs_from_departure_to_destination(
    registry: SchemaRegistry, routing: list[str], pointer: str | None
) -> None:
    payload = _advance(registry)
    payload["countries_of_routing"] = routing
    if pointer is None:
        registry.validate(ADVANCE, "1.0", payload)
    else:
        assert _refused_at(registry, ADVANCE, payload) == pointer


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        # the invoice is not the sum of statistical values (terms of delivery differ)
        ({"invoice_amount": {"amount": "1.00", "currency": "CAD"}}, None),
        (
            {"invoice_amount": {"amount": "48200.00", "currency": "USD"}},
            "/goods_items/0/statistical_value/currency",
        ),
        ({"total_gross_mass_kg": 1858.4}, None),
        ({"total_gross_mass_kg": 1858.5}, "/total_gross_mass_kg"),
        ({"total_packages": 5}, "/total_packages"),
    ],
)
def test_export_totals_equal_the_goods_items(
    registry: SchemaRegistry, change: dict[str, Any], pointer: str | None
) -> None:
    payload = _example(registry, EXPORT)
    payload.update(change)
    if pointer is None:
        registry.validate(EXPORT, "1.0", payload)
    else:
        assert _refused_at(registry, EXPORT, payload) == pointer


def test_export_total_packages_unchecked_when_an_item_states_none(
    registry: SchemaRegistry,
) -> None:
    payload = _example(registry, EXPORT)
    second = copy.deepcopy(payload["goods_items"][0])
    second["sequence"] = 2
    second["statistical_value"]["amount"] = "0"
    second["gross_mass_kg"] = 0.001
    second.pop("net_mass_kg")
    second.pop("packages")
    payload["goods_items"].append(second)
    payload["total_packages"] = 5
    registry.validate(EXPORT, "1.0", payload)


def test_manifest_master_pieces_hold_its_houses_pieces(registry: SchemaRegistry) -> None:
    payload = _example(registry, MANIFEST)
    payload["masters"][0]["pieces"] = 9  # pieces outside the houses: allowed
    payload["totals"]["pieces"] = 9
    registry.validate(MANIFEST, "1.0", payload)
    payload["masters"][0]["pieces"] = 1  # fewer than its houses' 1 + 1
    payload["totals"]["pieces"] = 1
    assert _refused_at(registry, MANIFEST, payload) == "/masters/0/pieces"


def test_bulk_goods_without_packages_counted_pass(registry: SchemaRegistry) -> None:
    payload = _advance(registry)
    for item in payload["goods_items"]:
        for package in item["packages"]:
            package["count"] = 0
    payload["total_packages"] = 1
    registry.validate(ADVANCE, "1.0", payload)


@pytest.mark.parametrize(
    ("total_kg", "accepted"),
    [(1.923, True), (1.885, True), (1.924, False), (1.884, False), (9999.0, False)],  # 1 % of 1.904
)
def test_manifest_total_gross_mass_is_the_masters_sum(
    registry: SchemaRegistry, total_kg: float, accepted: bool
) -> None:
    payload = _example(registry, MANIFEST)
    payload["totals"]["gross_mass_kg"] = total_kg
    if accepted:
        registry.validate(MANIFEST, "1.0", payload)
    else:
        assert _refused_at(registry, MANIFEST, payload) == "/totals/gross_mass_kg"


def test_manifest_itinerary_times_follow_the_sequence_not_the_array_order(
    registry: SchemaRegistry,
) -> None:
    payload = _example(registry, MANIFEST)
    itinerary = payload["itinerary"]
    itinerary.reverse()
    registry.validate(MANIFEST, "1.0", payload)
    itinerary[0]["eta"] = "2026-03-02T07:39:59-08:00"  # one second before the loading ETD
    assert _refused_at(registry, MANIFEST, payload) == "/itinerary/0/eta"
    itinerary[0]["eta"] = "2026-03-02T07:40:00-08:00"
    payload["arrival_datetime"] = "2026-03-02T07:40:00-08:00"
    registry.validate(MANIFEST, "1.0", payload)


def test_manifest_departure_from_a_stop_is_not_before_arrival_there(
    registry: SchemaRegistry,
) -> None:
    payload = _example(registry, MANIFEST)
    payload["itinerary"][0]["eta"] = "2026-03-02T09:40:01-06:00"
    assert _refused_at(registry, MANIFEST, payload) == "/itinerary/0/etd"


def test_manifest_arrival_not_before_departure_from_the_port_of_loading(
    registry: SchemaRegistry,
) -> None:
    payload = _example(registry, MANIFEST)
    del payload["itinerary"][1]["eta"]
    payload["arrival_datetime"] = "2026-03-02T07:39:59-08:00"
    assert _refused_at(registry, MANIFEST, payload) == "/arrival_datetime"
    payload["port_of_loading"] = {"name": "Mexico City cargo terminal", "country_code": "MX"}
    registry.validate(MANIFEST, "1.0", payload)


@pytest.mark.parametrize(
    ("date_range", "accepted"),
    [
        ({"from": "2026-03-05", "to": "2026-03-05"}, True),
        ({"from": "2026-03-05", "to": "2026-03-04"}, False),
        ({"from": "2025-12-31", "to": "2026-01-01"}, True),
    ],
)
def test_lookup_date_range_from_not_after_to(
    registry: SchemaRegistry, date_range: dict[str, str], accepted: bool
) -> None:
    payload = _example(registry, LOOKUP)
    payload["date_range"] = date_range
    if accepted:
        registry.validate(LOOKUP, "1.0", payload)
    else:
        assert _refused_at(registry, LOOKUP, payload) == "/date_range/to"


@pytest.mark.parametrize(("valid_until", "accepted"), [("2019-05-01", True), ("2019-04-30", False)])
def test_response_aeo_valid_until_not_before_valid_from(
    registry: SchemaRegistry, valid_until: str, accepted: bool
) -> None:
    payload = _example(registry, RESPONSE)
    payload["results"][0]["aeo"]["valid_until"] = valid_until
    if accepted:
        registry.validate(RESPONSE, "1.0", payload)
    else:
        assert _refused_at(registry, RESPONSE, payload) == "/results/0/aeo/valid_until"


@pytest.mark.parametrize("view", ["advance_data", "manifest", "seizures", "aeo_status"])
def test_response_view_must_match_the_record_type(registry: SchemaRegistry, view: str) -> None:
    payload = _example(registry, RESPONSE, 1)
    payload["results"][0]["view"] = view
    if view == "aeo_status":
        payload["results"][0]["trader"] = {
            "name": "X",
            "address": {"city": "Y", "country_code": "MX"},
        }
        payload["results"][0]["aeo"] = {"programme": "MX_OEA", "status": "certified"}
    assert _refused_at(registry, RESPONSE, payload) == "/results/0/view"


def test_response_every_view_of_a_record_type_is_accepted(registry: SchemaRegistry) -> None:
    pairs = {
        "advance_data": "shipment.advance_data",
        "manifest": "shipment.manifest",
        "export_declaration": "shipment.export_declaration",
        "seizures": "enforcement.seizure_report",
    }
    for view, message_type in pairs.items():
        payload = _example(registry, RESPONSE, 1)
        payload["results"][0] = {
            "view": view,
            "record": {
                "message_type": message_type,
                "schema_version": "1.0",
                "payload": registry.examples(message_type, "1.0")[0],
            },
        }
        registry.validate(RESPONSE, "1.0", payload)


@pytest.mark.parametrize("status", ["error", "not_found", "refused"])
def test_response_without_results_status_refuses_results(
    registry: SchemaRegistry, status: str
) -> None:
    payload = _example(registry, RESPONSE)
    payload["result_status"] = status
    payload["result_count"] = 0
    payload["errors"] = [{"code": "LOOKUP_FAILED", "message": "backend unavailable"}]
    payload["refusal_reason"] = "data_protection"
    assert _refused_at(registry, RESPONSE, payload) == "/results"
    payload["results"] = []
    registry.validate(RESPONSE, "1.0", payload)


def test_response_found_refuses_a_refusal_reason(registry: SchemaRegistry) -> None:
    payload = _example(registry, RESPONSE)
    payload["refusal_reason"] = "data_protection"
    assert _refused_at(registry, RESPONSE, payload) == "/refusal_reason"
    payload["result_status"] = "partial"
    registry.validate(RESPONSE, "1.0", payload)


@pytest.mark.parametrize("reference", ["SZX12345678", "HX77120049", "176-12345675"])
def test_house_awb_is_a_forwarder_number(registry: SchemaRegistry, reference: str) -> None:
    payload = _advance(registry)
    payload["house_transport_document"] = {"type": "house_awb", "reference": reference}
    registry.validate(ADVANCE, "1.0", payload)


def test_master_awb_keeps_the_airline_pattern(registry: SchemaRegistry) -> None:
    payload = _advance(registry)
    payload["master_transport_document"]["reference"] = "SZX12345678"
    assert _refused_at(registry, ADVANCE, payload) == "/master_transport_document/reference"


@pytest.mark.parametrize("rfc", ["PEÑ850315AB1", "A&C010101AB1", "ÑA&8503150A1"])
def test_mexican_rfc_is_a_party_identifier(registry: SchemaRegistry, rfc: str) -> None:
    payload = _advance(registry)
    payload["consignor"]["id"]["value"] = rfc
    registry.validate(ADVANCE, "1.0", payload)


@pytest.mark.parametrize("value", ["PEN\u0303850315AB1", "A C010101AB1", "-AFI010101AB1"])
def test_party_identifier_still_refuses_other_characters(
    registry: SchemaRegistry, value: str
) -> None:
    payload = _advance(registry)
    payload["consignor"]["id"]["value"] = value
    assert _refused_at(registry, ADVANCE, payload) == "/consignor/id/value"


def test_quantity_in_thousand_kilowatt_hours(registry: SchemaRegistry) -> None:
    payload = _advance(registry)
    item = payload["goods_items"][0]
    item["hs_code"] = "2716000000"
    item["quantity"] = {"value": 12.5, "unit": "MWH"}
    registry.validate(ADVANCE, "1.0", payload)


def _floats_with_multiple_of(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        found = [path] if isinstance(node.get("multipleOf"), float) else []
        for key, value in node.items():
            found += _floats_with_multiple_of(value, f"{path}/{key}")
        return found
    if isinstance(node, list):
        return [
            p
            for i, value in enumerate(node)
            for p in _floats_with_multiple_of(value, f"{path}/{i}")
        ]
    return []


def test_no_published_schema_has_a_decimal_multiple_of(registry: SchemaRegistry) -> None:
    """``multipleOf: 0.001`` divides in binary floating point: ajv and Python's jsonschema
    refuse 0.41 (0.41 / 0.001 = 409.99999999999994), which the gateway takes. Partners validate
    with the published schemas, so the 3-decimal rule is a cross-field rule instead."""
    import json
    from pathlib import Path

    root = Path(__import__("gateway.schemas", fromlist=["x"]).__file__).parent
    found = [
        f"{path.relative_to(root)}{pointer}"
        for path in sorted(root.rglob("*.json"))
        for pointer in _floats_with_multiple_of(json.loads(path.read_text()))
    ]
    assert found == []


@pytest.mark.parametrize(
    ("type_", "where"),
    [
        (ADVANCE, ("goods_items", 0, "net_mass_kg")),
        (ADVANCE, ("goods_items", 0, "gross_mass_kg")),
        ("shipment.manifest", ("totals", "gross_mass_kg")),
    ],
)
@pytest.mark.parametrize(
    ("mass", "accepted"),
    [(0.41, True), (1.904, True), (12, True), (0.0005, False), (2.1234, False)],
)
def test_a_mass_has_three_decimals_at_most(
    registry: SchemaRegistry, type_: str, where: tuple[Any, ...], mass: float, accepted: bool
) -> None:
    payload = copy.deepcopy(registry.examples(type_, "1.0")[0])
    node = payload
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = mass
    pointer = "/" + "/".join(str(k) for k in where)
    refusal: SchemaInvalid | None = None
    try:
        registry.validate(type_, "1.0", payload)
    except SchemaInvalid as exc:
        refusal = exc
    # a changed mass may break a total or net <= gross: refused then by another rule
    if accepted:
        assert refusal is None or "decimals" not in str(refusal), refusal
    else:
        assert refusal is not None
        assert (refusal.pointer, refusal.reason) == (
            pointer,
            f"{pointer}: has more than 3 decimals",
        )


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.decimals(min_value=-1e9, max_value=1e9, places=3).map(float),
        st.decimals(min_value=-1e9, max_value=1e9, places=4).map(float),
        st.integers(min_value=-(10**15), max_value=10**15).map(lambda n: n / 1000),
    )
)
def test_the_quick_decimals_check_agrees_with_the_json_text(mass: float) -> None:
    # _too_precise skips the Decimal reading when round(mass, 3) == mass: that must hold
    # exactly for the floats whose shortest repr has 3 decimals at most
    exponent = Decimal(repr(mass)).as_tuple().exponent
    assert isinstance(exponent, int)
    assert _too_precise(mass) is (exponent < -3)


def test_the_first_mass_with_too_many_decimals_in_document_order_is_named(
    registry: SchemaRegistry,
) -> None:
    payload = _advance(registry)
    payload["goods_items"].append(copy.deepcopy(payload["goods_items"][0]))
    payload["goods_items"][-1]["sequence"] = len(payload["goods_items"])
    payload["goods_items"][0]["net_mass_kg"] = 0.0001
    payload["goods_items"][-1]["gross_mass_kg"] = 1.0001
    with pytest.raises(SchemaInvalid) as refused:
        registry.validate(ADVANCE, "1.0", payload)
    assert refused.value.pointer == "/goods_items/0/net_mass_kg"
