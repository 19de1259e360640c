"""Cross-field rules that JSON Schema cannot express (CUSTOMS-DOMAIN.md section 10).

Each rule runs only on a payload that already satisfied its schema, so it may rely on the
schema's shapes. A rule raises ``SchemaInvalid`` naming the JSON pointer of the offending
value. Rules stay small loops over the payload: they run on every inbound message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from gateway.envelope import TimestampError, TimestampOutOfRange, parse_rfc3339
from gateway.schemas.failures import PayloadInvalid

# Validates a payload of another type embedded at a JSON pointer (type, version, payload, pointer).
EmbeddedValidator = Callable[[str, str, Any, str], None]
CrossFieldRule = Callable[[Any, EmbeddedValidator], None]

# Per-line rounding tolerance when a total is compared with the sum of its lines.
_ROUNDING_PER_LINE = Decimal("0.01")
_MASS_EPSILON = 1e-9
# Masses carry 3 decimals; sums of floats may drift by less than a gram.
_MASS_DECIMALS = 3
_MASS_TOLERANCE_KG = 0.001
# A total gross mass may differ from its lines' sum by 1 % or 10 g, whichever is larger (10.3).
_MASS_TOTAL_SHARE = Decimal("0.01")
_MASS_TOTAL_FLOOR_KG = Decimal("0.01")
# query.response: the view that shows each embeddable message type (the view and record enums).
_VIEW_OF_RECORD = {
    "shipment.advance_data": "advance_data",
    "shipment.manifest": "manifest",
    "shipment.export_declaration": "export_declaration",
    "shipment.status": "status_history",
    "enforcement.seizure_report": "seizures",
}
_STATUSES_WITHOUT_RESULTS = frozenset({"not_found", "refused", "error"})


def _fail(pointer: str, what: str) -> PayloadInvalid:
    return PayloadInvalid(pointer, what)


def _instant(value: str, pointer: str) -> datetime:
    """The instant of an RFC 3339 date-time the schema accepted, read as header times are
    (a leap second is the instant after 23:59:59)."""
    try:
        return parse_rfc3339(value, utc=False)
    except TimestampOutOfRange as exc:
        raise _fail(pointer, str(exc)) from None
    except TimestampError:
        raise _fail(pointer, "is not a valid date-time") from None


def _day(value: str, pointer: str) -> date:
    """Parse an RFC 3339 full-date the schema accepted."""
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _fail(pointer, "is not a valid date") from None


def _check_day_not_before(node: Any, base: str, earlier: str, later: str) -> None:
    if earlier not in node or later not in node:
        return
    if _day(node[later], f"{base}/{later}") < _day(node[earlier], f"{base}/{earlier}"):
        raise _fail(f"{base}/{later}", f"is before {earlier}")


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


def _kg(mass: float) -> Decimal:
    """The mass as its JSON text reads (shortest repr), so 0.664 - 0.654 is exactly 0.01."""
    return Decimal(str(mass))


def _check_mass_decimals(payload: Any) -> None:
    """Every ``*mass_kg`` member has 3 decimals at most (``$defs/mass_kg``), read as its JSON
    text reads (the shortest repr): a schema's ``multipleOf: 0.001`` would divide in binary
    floating point, and validators disagree on 0.41.

    One walk without pointers finds whether any mass has too many; only then a second walk
    names the first one in document order (every payload is walked, few ever fail)."""
    stack: list[Any] = [payload]
    push = stack.append
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, float):
                    if key.endswith("mass_kg") and _too_precise(value):
                        _raise_first_precise_mass(payload)
                elif isinstance(value, _CONTAINERS):
                    push(value)
        elif isinstance(node, list):
            for value in node:
                if isinstance(value, _CONTAINERS):
                    push(value)


#: a tuple: isinstance with it costs half what it does with the union ``dict | list``
_CONTAINERS = (dict, list)


def _too_precise(mass: float) -> bool:
    """More than 3 decimals in the shortest repr. ``round(mass, 3) == mass`` holds exactly when
    the repr has 3 at most (the double nearest a 3-decimal number reads back as that number or
    a shorter one), so the exact Decimal reading runs only for the masses that fail it."""
    if round(mass, _MASS_DECIMALS) == mass:
        return False
    exponent = _kg(mass).as_tuple().exponent
    return isinstance(exponent, int) and exponent < -_MASS_DECIMALS


def _raise_first_precise_mass(node: Any, pointer: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, float) and key.endswith("mass_kg"):
                if _too_precise(value):
                    raise _fail(f"{pointer}/{key}", f"has more than {_MASS_DECIMALS} decimals")
            elif isinstance(value, dict | list):
                _raise_first_precise_mass(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, dict | list):
                _raise_first_precise_mass(value, f"{pointer}/{i}")


def _check_total_mass(total: float, total_pointer: str, masses: Iterable[float], of: str) -> None:
    line_sum = sum((_kg(m) for m in masses), Decimal(0))
    tolerance = max(line_sum * _MASS_TOTAL_SHARE, _MASS_TOTAL_FLOOR_KG)
    if abs(_kg(total) - line_sum) > tolerance:
        raise _fail(total_pointer, f"does not equal the sum of the {of} gross masses")


def _check_total_packages(payload: Any, items: list[Any]) -> None:
    """total_packages = sum of package counts; 0 marks a later item sharing packages (10.4)."""
    if any("packages" not in item for item in items):
        return  # an export item may leave its packages out: the sum is then unknown
    counts = sum(package["count"] for item in items for package in item["packages"])
    if counts == 0:
        return  # bulk only (count 0 on every line): total_packages, at least 1, says nothing more
    if payload["total_packages"] != counts:
        raise _fail("/total_packages", "does not equal the sum of the goods items' package counts")


def _check_routing(payload: Any) -> None:
    """Countries of routing run from the country of departure to that of destination (10.5)."""
    routing = payload.get("countries_of_routing")
    if not routing:
        return
    if routing[0] != payload["country_of_departure"]:
        raise _fail("/countries_of_routing/0", "is not the country of departure")
    if routing[-1] != payload["country_of_destination"]:
        raise _fail(
            f"/countries_of_routing/{len(routing) - 1}", "is not the country of destination"
        )


def _check_itinerary_times(itinerary: list[Any]) -> None:
    """In sequence order, every stop's ETA and ETD are at or after every earlier time (10.5)."""
    latest: datetime | None = None
    for i, stop in sorted(enumerate(itinerary), key=lambda indexed: indexed[1]["sequence"]):
        for key in ("eta", "etd"):
            if key not in stop:
                continue
            pointer = f"/itinerary/{i}/{key}"
            instant = _instant(stop[key], pointer)
            if latest is not None and instant < latest:
                raise _fail(pointer, "is before an earlier time of the itinerary")
            latest = instant


def _check_arrival_after_loading(payload: Any) -> None:
    """The arrival is not before the conveyance leaves the port of loading (10.5)."""
    loading = payload["port_of_loading"].get("unlocode")
    departures = [
        _instant(stop["etd"], f"/itinerary/{i}/etd")
        for i, stop in enumerate(payload["itinerary"])
        if stop["location"] == loading and "etd" in stop
    ]
    if departures and _instant(payload["arrival_datetime"], "/arrival_datetime") < min(departures):
        raise _fail("/arrival_datetime", "is before the departure from the port of loading")


def _check_unique(values: Iterable[tuple[str, Any]], what: str) -> None:
    seen: set[Any] = set()
    for pointer, value in values:
        if value in seen:
            raise _fail(pointer, f"duplicate {what}")
        seen.add(value)


def _check_goods_totals(payload: Any, items: list[Any]) -> None:
    """The package and gross mass totals of advance data and export declarations."""
    _check_total_packages(payload, items)
    _check_total_mass(
        payload["total_gross_mass_kg"],
        "/total_gross_mass_kg",
        (item["gross_mass_kg"] for item in items),
        "goods items'",
    )


def advance_data(payload: Any, _embedded: EmbeddedValidator) -> None:
    _check_mass_decimals(payload)
    items = payload["goods_items"]
    _check_unique_sequences(items, "/goods_items")
    _check_net_within_gross(items, "/goods_items")
    _check_lines_total(
        payload["total_declared_value"], "/total_declared_value", items, "/goods_items", "value"
    )
    _check_not_before(payload, "estimated_departure", "estimated_arrival")
    _check_goods_totals(payload, items)
    _check_routing(payload)


def manifest(payload: Any, _embedded: EmbeddedValidator) -> None:
    _check_mass_decimals(payload)
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
        # Not equal: a master may carry pieces outside its houses (10.3's equality is inferred)
        if sum(house["pieces"] for house in master["houses"]) > master["pieces"]:
            raise _fail(f"/masters/{m}/pieces", "is less than the sum of its houses' pieces")
    totals = payload["totals"]
    if totals["bills"] != len(houses):
        raise _fail("/totals/bills", "does not equal the number of house consignments")
    if totals["pieces"] != sum(master["pieces"] for master in masters):
        raise _fail("/totals/pieces", "does not equal the sum of the masters' pieces")
    _check_total_mass(
        totals["gross_mass_kg"],
        "/totals/gross_mass_kg",
        (master["gross_mass_kg"] for master in masters),
        "masters'",
    )
    _check_itinerary_times(payload["itinerary"])
    _check_arrival_after_loading(payload)


def export_declaration(payload: Any, _embedded: EmbeddedValidator) -> None:
    _check_mass_decimals(payload)
    items = payload["goods_items"]
    _check_unique_sequences(items, "/goods_items")
    _check_net_within_gross(items, "/goods_items")
    # One currency, but no sum: the statistical value is the value at the border (FOB-based),
    # which differs from the invoice whenever its terms are not (CUSTOMS-DOMAIN 10.1 infers
    # the sum rule for exports; real declarations break it).
    currency = payload["invoice_amount"]["currency"]
    for i, item in enumerate(items):
        if item["statistical_value"]["currency"] != currency:
            raise _fail(
                f"/goods_items/{i}/statistical_value/currency",
                "differs from /invoice_amount currency",
            )
    _check_not_before(payload, "acceptance_datetime", "exit_datetime")
    _check_goods_totals(payload, items)


def seizure_report(payload: Any, _embedded: EmbeddedValidator) -> None:
    _check_mass_decimals(payload)
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


def shipment_lookup(payload: Any, _embedded: EmbeddedValidator) -> None:
    if "date_range" in payload:
        _check_day_not_before(payload["date_range"], "/date_range", "from", "to")


def query_response(payload: Any, embedded: EmbeddedValidator) -> None:
    results = payload.get("results", [])
    status = payload["result_status"]
    if results and status in _STATUSES_WITHOUT_RESULTS:
        raise _fail("/results", "must be empty for this result_status")
    if status == "found" and "refusal_reason" in payload:
        raise _fail("/refusal_reason", "is not allowed when result_status is found")
    if payload["result_count"] != len(results):
        raise _fail("/result_count", "does not equal the number of results")
    for i, result in enumerate(results):
        if "aeo" in result:
            _check_day_not_before(result["aeo"], f"/results/{i}/aeo", "valid_from", "valid_until")
        record = result.get("record")
        if record is not None:
            if _VIEW_OF_RECORD[record["message_type"]] != result["view"]:
                raise _fail(f"/results/{i}/view", "does not match the record's message_type")
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
    ("query.shipment_lookup", "1.0"): shipment_lookup,
    ("query.response", "1.0"): query_response,
}
