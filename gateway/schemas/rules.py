"""Cross-field rules that JSON Schema cannot express (CUSTOMS-DOMAIN.md section 10).

Each rule runs only on a payload that already satisfied its schema, so it may rely on the
schema's shapes. A rule raises ``SchemaInvalid`` naming the JSON pointer of the offending
value. Rules stay small loops over the payload: they run on every inbound message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from gateway.schemas.failures import PayloadInvalid

# Validates a payload of another type embedded at a JSON pointer (type, version, payload, pointer).
EmbeddedValidator = Callable[[str, str, Any, str], None]
CrossFieldRule = Callable[[Any, EmbeddedValidator], None]

# Per-line rounding tolerance when a total is compared with the sum of its lines.
_ROUNDING_PER_LINE = Decimal("0.01")
_MASS_EPSILON = 1e-9
# Masses carry 3 decimals; sums of floats may drift by less than a gram.
_MASS_TOLERANCE_KG = 0.001
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _fail(pointer: str, what: str) -> PayloadInvalid:
    return PayloadInvalid(pointer, what)


def _instant(value: str, pointer: str) -> datetime:
    """Parse an RFC 3339 date-time the schema accepted (leap second 60 counts as 59)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.tzinfo is not None:
        return parsed
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise _fail(pointer, "is not a valid date-time")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    offset = timedelta(0)
    if zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            min(int(second), 59),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=timezone(offset),
        )
    except ValueError:
        raise _fail(pointer, "is not a valid date-time") from None


def _check_not_before(payload: Any, earlier: str, later: str) -> None:
    if earlier not in payload or later not in payload:
        return
    if _instant(payload[later], f"/{later}") < _instant(payload[earlier], f"/{earlier}"):
        raise _fail(f"/{later}", f"is before {earlier}")


def _check_net_within_gross(items: list[Any], base: str) -> None:
    for i, item in enumerate(items):
        net = item.get("net_mass_kg")
        if net is not None and net > item["gross_mass_kg"] + _MASS_EPSILON:
            raise _fail(f"{base}/{i}/net_mass_kg", "net mass exceeds gross mass")


def _check_unique_sequences(items: list[Any], base: str) -> None:
    seen: set[int] = set()
    for i, item in enumerate(items):
        if item["sequence"] in seen:
            raise _fail(f"{base}/{i}/sequence", "duplicate sequence number")
        seen.add(item["sequence"])


def _check_lines_total(
    total: Any, total_pointer: str, items: list[Any], base: str, line_key: str
) -> None:
    """Every line in the total's currency; the total equals the lines' sum within rounding."""
    currency = total["currency"]
    line_sum = Decimal(0)
    for i, item in enumerate(items):
        line = item.get(line_key)
        if line is None:
            continue
        if line["currency"] != currency:
            raise _fail(f"{base}/{i}/{line_key}/currency", f"differs from {total_pointer} currency")
        line_sum += Decimal(line["amount"])
    if abs(Decimal(total["amount"]) - line_sum) > _ROUNDING_PER_LINE * len(items):
        raise _fail(f"{total_pointer}/amount", "does not equal the sum of the goods items")


def _check_unique(values: Iterable[tuple[str, Any]], what: str) -> None:
    seen: set[Any] = set()
    for pointer, value in values:
        if value in seen:
            raise _fail(pointer, f"duplicate {what}")
        seen.add(value)


def advance_data(payload: Any, _embedded: EmbeddedValidator) -> None:
    items = payload["goods_items"]
    _check_unique_sequences(items, "/goods_items")
    _check_net_within_gross(items, "/goods_items")
    _check_lines_total(
        payload["total_declared_value"], "/total_declared_value", items, "/goods_items", "value"
    )
    _check_not_before(payload, "estimated_departure", "estimated_arrival")


def manifest(payload: Any, _embedded: EmbeddedValidator) -> None:
    masters = payload["masters"]
    houses = [
        (f"/masters/{m}/houses/{h}/house_document", (d["type"], d["reference"]))
        for m, master in enumerate(masters)
        for h, d in enumerate(house["house_document"] for house in master["houses"])
    ]
    _check_unique(houses, "house transport document in this manifest")
    _check_unique(
        (
            (f"/itinerary/{i}/sequence", stop["sequence"])
            for i, stop in enumerate(payload["itinerary"])
        ),
        "itinerary sequence",
    )
    for m, master in enumerate(masters):
        house_mass = sum(house["gross_mass_kg"] for house in master["houses"])
        if house_mass > master["gross_mass_kg"] + _MASS_TOLERANCE_KG:
            raise _fail(f"/masters/{m}/gross_mass_kg", "is less than the sum of its houses")
    totals = payload["totals"]
    if totals["bills"] != len(houses):
        raise _fail("/totals/bills", "does not equal the number of house consignments")
    if totals["pieces"] != sum(master["pieces"] for master in masters):
        raise _fail("/totals/pieces", "does not equal the sum of the masters' pieces")


def export_declaration(payload: Any, _embedded: EmbeddedValidator) -> None:
    items = payload["goods_items"]
    _check_unique_sequences(items, "/goods_items")
    _check_net_within_gross(items, "/goods_items")
    currency = payload["invoice_amount"]["currency"]
    for i, item in enumerate(items):
        if item["statistical_value"]["currency"] != currency:
            raise _fail(
                f"/goods_items/{i}/statistical_value/currency",
                "differs from /invoice_amount currency",
            )
    _check_not_before(payload, "acceptance_datetime", "exit_datetime")


def seizure_report(payload: Any, _embedded: EmbeddedValidator) -> None:
    _check_unique(
        ((f"/goods/{i}/sequence", g["sequence"]) for i, g in enumerate(payload["goods"])),
        "sequence number",
    )


def risk_alert(payload: Any, _embedded: EmbeddedValidator) -> None:
    _check_not_before(payload, "issued_at", "valid_until")


def assistance_request(payload: Any, _embedded: EmbeddedValidator) -> None:
    requesting = payload["requesting_administration"]["country_code"]
    if payload["requested_administration"]["country_code"] == requesting:
        raise _fail(
            "/requested_administration/country_code", "is the requesting administration's country"
        )


def query_response(payload: Any, embedded: EmbeddedValidator) -> None:
    results = payload.get("results", [])
    if payload["result_count"] != len(results):
        raise _fail("/result_count", "does not equal the number of results")
    for i, result in enumerate(results):
        record = result.get("record")
        if record is not None:
            embedded(
                record["message_type"],
                record["schema_version"],
                record["payload"],
                f"/results/{i}/record",
            )


RULES: dict[tuple[str, str], CrossFieldRule] = {
    ("shipment.advance_data", "1.0"): advance_data,
    ("shipment.manifest", "1.0"): manifest,
    ("shipment.export_declaration", "1.0"): export_declaration,
    ("enforcement.seizure_report", "1.0"): seizure_report,
    ("enforcement.risk_alert", "1.0"): risk_alert,
    ("enforcement.assistance_request", "1.0"): assistance_request,
    ("query.response", "1.0"): query_response,
}
