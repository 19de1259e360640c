"""Invalid payload fixtures: each fails with SchemaInvalid at exactly the expected pointer."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import NackCode, SchemaInvalid
from gateway.schemas import SchemaRegistry, json_pointer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "schemas"
VERSION = "1.0"
KINDS_EVERY_TYPE = {"missing_required", "wrong_type", "bad_enum", "bad_pattern", "extra_property"}
# Types without any date or date-time field are exempt from the bad_date_time requirement.
WITHOUT_DATES = {"query.trader_lookup", "audit.checkpoint", "audit.cosignature"}
# Types without any enumerated field are exempt from the bad_enum requirement.
WITHOUT_ENUMS = {"audit.checkpoint"}
# Types whose cross-field rules (code or if/then) must each be exercised by a fixture.
WITH_CROSS_FIELD = {
    "shipment.advance_data",
    "shipment.manifest",
    "shipment.export_declaration",
    "enforcement.risk_alert",
    "enforcement.seizure_report",
    "enforcement.assistance_request",
    "query.shipment_lookup",
    "query.response",
}


def _tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def _parent(doc: Any, pointer: str) -> tuple[Any, str]:
    *path, last = _tokens(pointer)
    node = doc
    for token in path:
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node, last


def _apply(example: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(example)
    for pointer in case.get("remove", []):
        parent, last = _parent(doc, pointer)
        del parent[int(last) if isinstance(parent, list) else last]
    for pointer, value in case.get("set", []):
        parent, last = _parent(doc, pointer)
        if isinstance(parent, list):
            index = int(last)
            if index == len(parent):
                parent.append(value)
            else:
                parent[index] = value
        else:
            parent[last] = value
    return doc


def _load_cases() -> list[tuple[str, int, dict[str, Any]]]:
    cases = []
    for path in sorted(FIXTURES.glob("*.json")):
        message_type = path.name.removesuffix(".json")
        for number, case in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            cases.append((message_type, number, case))
    return cases


CASES = _load_cases()


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load_builtin()


@pytest.mark.parametrize(
    ("message_type", "number", "case"),
    CASES,
    ids=[f"{t}-{n}-{c['kind']}" for t, n, c in CASES],
)
def test_invalid_fixture_fails_at_expected_pointer(
    registry: SchemaRegistry, message_type: str, number: int, case: dict[str, Any]
) -> None:
    example = registry.examples(message_type, VERSION)[case["example"]]
    payload = _apply(example, case)
    assert payload != example
    with pytest.raises(SchemaInvalid) as info:
        registry.validate(message_type, VERSION, payload)
    error = info.value
    assert error.pointer == case["pointer"], error.reason
    assert error.code is NackCode.SCHEMA_INVALID
    assert error.http_status == 400
    assert error.reason.startswith(f"{case['pointer'] or '/'}: ")
    assert len(error.reason) <= 200
    # the partner's detail: the pointer in its document (payload at /payload), then what
    assert error.detail.startswith(f"schema error at /payload{case['pointer']}: ")
    assert error.detail.endswith(error.reason.split(": ", 1)[1])


def test_every_type_has_fixtures_of_every_required_kind(registry: SchemaRegistry) -> None:
    kinds: dict[str, set[str]] = {}
    for message_type, _, case in CASES:
        kinds.setdefault(message_type, set()).add(case["kind"])
    assert set(kinds) == {t for t, _ in registry.types()}
    for message_type, seen in kinds.items():
        required = set(KINDS_EVERY_TYPE)
        if message_type in WITHOUT_ENUMS:
            required.discard("bad_enum")
        if message_type not in WITHOUT_DATES:
            required.add("bad_date_time")
        if message_type in WITH_CROSS_FIELD:
            required.add("cross_field")
        assert required <= seen, (message_type, required - seen)


def test_reason_never_echoes_a_long_value(registry: SchemaRegistry) -> None:
    example = registry.examples("shipment.advance_data", VERSION)[0]
    secret = "SECRET" + "x" * 5000
    payload = _apply(example, {"set": [["/goods_items/0/hs_code", secret]]})
    with pytest.raises(SchemaInvalid) as info:
        registry.validate("shipment.advance_data", VERSION, payload)
    assert "SECRET" not in info.value.reason
    assert "SECRET" not in info.value.detail


def test_pointer_escapes_slash_and_tilde_in_property_names(registry: SchemaRegistry) -> None:
    example = registry.examples("query.response", VERSION)[1]
    payload = _apply(example, {"set": [["/results/0/record/payload/a~1b~0c", 1]]})
    with pytest.raises(SchemaInvalid) as info:
        registry.validate("query.response", VERSION, payload)
    assert info.value.pointer == "/results/0/record/payload/a~1b~0c"
    assert info.value.reason.endswith(": is not an allowed property")
    assert info.value.detail == (
        "schema error at /payload/results/0/record/payload/a~1b~0c: is not an allowed property"
    )


def test_json_pointer_follows_rfc_6901() -> None:
    assert json_pointer([]) == ""
    assert json_pointer(["goods_items", 0, "hs_code"]) == "/goods_items/0/hs_code"
    assert json_pointer(["a/b", "m~n", ""]) == "/a~1b/m~0n/"
