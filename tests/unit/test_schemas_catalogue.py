"""The catalogue itself: every schema is Draft 2020-12, self-contained, with valid examples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

import gateway.schemas
from gateway.errors import NackCode, UnsupportedType
from gateway.schemas import CatalogueError, SchemaRegistry

SCHEMA_DIR = Path(gateway.schemas.__file__).resolve().parent
PROTOCOL_TYPES = {
    "shipment.advance_data",
    "shipment.manifest",
    "shipment.export_declaration",
    "shipment.status",
    "enforcement.risk_alert",
    "enforcement.seizure_report",
    "enforcement.assistance_request",
    "enforcement.assistance_response",
    "query.shipment_lookup",
    "query.trader_lookup",
    "query.response",
    "audit.checkpoint",
    "audit.cosignature",
    "receipt",
}
ANSWER_TYPES = {
    "enforcement.assistance_response",
    "query.response",
    "audit.cosignature",
    "receipt",
}
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load_builtin()


def _walk(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            if k != "examples":
                yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_catalogue_holds_every_protocol_type_at_1_0(registry: SchemaRegistry) -> None:
    assert {t for t, v in registry.types() if v == "1.0"} == PROTOCOL_TYPES
    for message_type in PROTOCOL_TYPES:
        assert registry.is_known(message_type, "1.0")
    assert not registry.is_known("shipment.advance_data", "2.0")
    assert not registry.is_known("shipment.nonexistent", "1.0")


@pytest.mark.parametrize("message_type", sorted(PROTOCOL_TYPES))
def test_served_schema_is_valid_draft_2020_12_and_self_contained(
    registry: SchemaRegistry, message_type: str
) -> None:
    doc = registry.schema(message_type, "1.0")
    assert doc["$schema"] == DRAFT_2020_12
    assert doc["$id"] == f"urn:c2c:schema:{message_type}:1.0"
    assert jsonschema_rs.meta.is_valid(doc)
    refs = list(_walk(doc, "$ref"))
    assert refs, "a customs schema reuses the shared definitions"
    for ref in refs:
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in doc["$defs"]
    # Compiles with retrieval disabled: nothing is fetched.
    jsonschema_rs.Draft202012Validator(doc, validate_formats=True, offline=True)


@pytest.mark.parametrize("message_type", sorted(PROTOCOL_TYPES))
def test_source_file_is_valid_draft_2020_12(message_type: str) -> None:
    path = SCHEMA_DIR / message_type / "1.0.schema.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    jsonschema_rs.meta.validate(doc)
    assert doc["title"]
    assert doc["description"]
    assert doc["type"] == "object"
    assert doc.get("additionalProperties") is False


def test_shared_definitions_are_valid_draft_2020_12() -> None:
    doc = json.loads((SCHEMA_DIR / "_shared" / "customs.defs.json").read_text(encoding="utf-8"))
    jsonschema_rs.meta.validate(doc)
    for ref in _walk(doc, "$ref"):
        assert ref.removeprefix("#/$defs/") in doc["$defs"]


@pytest.mark.parametrize("message_type", sorted(PROTOCOL_TYPES))
def test_every_example_validates(registry: SchemaRegistry, message_type: str) -> None:
    examples = registry.examples(message_type, "1.0")
    assert examples
    for example in examples:
        registry.validate(message_type, "1.0", example)
        # The schema alone accepts it too, as a partner's own validator would.
        assert jsonschema_rs.Draft202012Validator(
            registry.schema(message_type, "1.0"), validate_formats=True
        ).is_valid(example)


@pytest.mark.parametrize("message_type", sorted(PROTOCOL_TYPES))
def test_strings_and_arrays_are_bounded(registry: SchemaRegistry, message_type: str) -> None:
    for sub in _subschemas(registry.schema(message_type, "1.0")):
        if sub.get("type") == "string" and "enum" not in sub and "const" not in sub:
            bounded_format = sub.get("format") in ("date", "date-time", "uuid")
            assert "maxLength" in sub or "pattern" in sub or bounded_format, sub
        if sub.get("type") == "array":
            assert "maxItems" in sub, sub
        if "pattern" in sub:
            assert sub["pattern"].startswith("^"), sub
            assert sub["pattern"].endswith("$"), sub
            assert sub["pattern"].isascii()


def _subschemas(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key in ("examples", "enum", "const"):
                continue
            if key in ("properties", "$defs"):
                for sub in value.values():
                    yield from _subschemas(sub)
            else:
                yield from _subschemas(value)
    elif isinstance(node, list):
        for item in node:
            yield from _subschemas(item)


def test_unbounded_pattern_strings_are_length_limited(registry: SchemaRegistry) -> None:
    unbounded = re.compile(r"(?<!\\)[*+]|\{\d+,\}")
    for message_type, version in registry.types():
        for sub in _subschemas(registry.schema(message_type, version)):
            if sub.get("type") == "string" and "pattern" in sub and "maxLength" not in sub:
                assert not unbounded.search(sub["pattern"]), (message_type, sub["pattern"])


def test_index_lists_every_schema_with_its_url(registry: SchemaRegistry) -> None:
    index = registry.index()
    assert [(e["message_type"], e["schema_version"]) for e in index] == registry.types()
    for entry in index:
        assert entry["url"] == f"/c2c/v1/schemas/{entry['message_type']}/{entry['schema_version']}"
        assert entry["title"] == registry.schema(entry["message_type"], "1.0")["title"]


def test_schema_and_examples_are_copies(registry: SchemaRegistry) -> None:
    registry.schema("receipt", "1.0")["title"] = "changed"
    registry.examples("receipt", "1.0")[0]["status"] = "changed"
    assert registry.schema("receipt", "1.0")["title"] != "changed"
    assert registry.examples("receipt", "1.0")[0]["status"] == "ACK"


@pytest.mark.parametrize(
    ("message_type", "version"),
    [
        ("shipment.unknown", "1.0"),
        ("shipment.advance_data", "1.1"),
        ("shipment.advance_data", "2.0"),
        ("audit.checkpoint", "1.1"),
        ("audit.witness", "1.0"),
        ("", ""),
        ("../receipt", "1.0"),
        ("x" * 10_000, "1.0"),
    ],
)
def test_unknown_type_or_version_is_unsupported(
    registry: SchemaRegistry, message_type: str, version: str
) -> None:
    for call in (
        lambda: registry.validate(message_type, version, {}),
        lambda: registry.schema(message_type, version),
        lambda: registry.examples(message_type, version),
        lambda: registry.requires_in_reply_to(message_type, version),
    ):
        with pytest.raises(UnsupportedType) as info:
            call()
        assert info.value.code is NackCode.UNSUPPORTED_TYPE
        assert len(info.value.reason) < 200


def test_answer_types_require_in_reply_to(registry: SchemaRegistry) -> None:
    answers = {t for t, v in registry.types() if registry.requires_in_reply_to(t, v)}
    assert answers == ANSWER_TYPES


def test_receipt_matches_protocol_section_4(registry: SchemaRegistry) -> None:
    doc = registry.schema("receipt", "1.0")
    assert set(doc["required"]) == {
        "status",
        "ref_message_id",
        "ref_digest",
        "received_at",
        "code",
        "detail",
    }
    assert set(doc["properties"]["code"]["enum"]) == {None} | {c.value for c in NackCode}


# A catalogue directory built in tmp_path, to show what loading refuses.
def _write_catalogue(root: Path, schema: dict[str, Any], name: str = "test.sample") -> None:
    shared = SCHEMA_DIR / "_shared" / "customs.defs.json"
    (root / "_shared").mkdir(parents=True)
    (root / "_shared" / "customs.defs.json").write_text(shared.read_text(encoding="utf-8"))
    (root / name).mkdir()
    (root / name / "1.0.schema.json").write_text(json.dumps(schema))


def _minimal(**extra: Any) -> dict[str, Any]:
    return {
        "$schema": DRAFT_2020_12,
        "title": "t",
        "type": "object",
        "properties": {"hs": {"$ref": "#/$defs/hs_code"}},
        "examples": [{"hs": "123456"}],
        **extra,
    }


def test_adding_a_type_is_adding_a_file(tmp_path: Path) -> None:
    _write_catalogue(tmp_path, _minimal())
    registry = SchemaRegistry.load_from(tmp_path)
    assert registry.types() == [("test.sample", "1.0")]
    registry.validate("test.sample", "1.0", {"hs": "1234567890"})
    assert registry.schema("test.sample", "1.0")["$defs"] == {
        "hs_code": SchemaRegistry.load_builtin().schema("shipment.advance_data", "1.0")["$defs"][
            "hs_code"
        ]
    }


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (_minimal(properties={"x": {"$ref": "https://example.invalid/s.json"}}), "not local"),
        (_minimal(properties={"x": {"$ref": "#/$defs/no_such_def"}}), "names no local or shared"),
        (_minimal(**{"$defs": {"hs_code": {"type": "string"}}}), "redefine shared"),
        (_minimal(type="objekt"), "not a usable Draft 2020-12 schema"),
        (_minimal(examples=[]), "needs a title and examples"),
    ],
)
def test_bad_catalogue_file_is_refused_with_file_and_reason(
    tmp_path: Path, schema: dict[str, Any], reason: str
) -> None:
    _write_catalogue(tmp_path, schema)
    with pytest.raises(CatalogueError) as info:
        SchemaRegistry.load_from(tmp_path)
    assert info.value.file == "test.sample/1.0.schema.json"
    assert reason in info.value.reason


def test_bad_version_file_name_is_refused(tmp_path: Path) -> None:
    _write_catalogue(tmp_path, _minimal())
    (tmp_path / "test.sample" / "1.0.schema.json").rename(
        tmp_path / "test.sample" / "v1.schema.json"
    )
    with pytest.raises(CatalogueError, match="version"):
        SchemaRegistry.load_from(tmp_path)
