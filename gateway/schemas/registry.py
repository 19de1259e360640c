"""The message schema catalogue (PROTOCOL.md section 6).

Every ``<message_type>/<version>.schema.json`` under this package is one catalogue entry:
adding a message type is adding a file. A schema refers to the shared customs data elements
of ``_shared/customs.defs.json`` as ``#/$defs/<name>``; loading copies the ones it uses into
its own ``$defs``, so the document served to partners is self-contained and nothing is ever
fetched. Each document is compiled once with jsonschema-rs (formats checked), then the
type's cross-field rules (``rules.py``) run on payloads that passed the schema.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import jsonschema_rs

from gateway.errors import UnsupportedType
from gateway.schemas.failures import PayloadInvalid, clip, json_pointer
from gateway.schemas.rules import RULES, CrossFieldRule

SCHEMA_SUFFIX = ".schema.json"
SHARED_DEFS_FILE = ("_shared", "customs.defs.json")
URL_PREFIX = "/c2c/v1/schemas"
# Annotation keyword naming the types that answer another message (envelope in_reply_to).
IN_REPLY_TO_KEYWORD = "x-c2c-in-reply-to"

#: An answer type -> the request types it answers and the payload member it echoes from its
#: request (the schemas' descriptions: "the payload echoes query_ref / request_ref").
ANSWERS: dict[str, tuple[frozenset[str], str]] = {
    "query.response": (frozenset({"query.shipment_lookup", "query.trader_lookup"}), "query_ref"),
    "enforcement.assistance_response": (
        frozenset({"enforcement.assistance_request"}),
        "request_ref",
    ),
}

_MESSAGE_TYPE_RE = re.compile(r"^[a-z]+(\.[a-z_]+)?$")
_VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+$")
_LOCAL_DEF_REF = "#/$defs/"
_NAME_MAX = 40


class CatalogueError(Exception):
    """A schema file of the catalogue is unusable: names the file and the reason."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True, kw_only=True, slots=True)
class _Entry:
    message_type: str
    version: str
    document: dict[str, Any]
    validator: jsonschema_rs.Validator
    rule: CrossFieldRule | None


def _clip(text: str, limit: int = _NAME_MAX) -> str:
    return clip(text, limit)


def _unexpected(names: list[str]) -> str:
    more = len(names) - 1
    return "is not an allowed property" + (f" ({more} more besides)" if more > 0 else "")


def _failure(error: jsonschema_rs.ValidationError) -> tuple[str, str]:
    """The RFC 6901 pointer of what to fix, and a short description of what is wrong.

    A missing member is pointed at itself, not at the object that lacks it, and an unexpected
    one at itself, so the pointer alone tells a partner where to look. Only the schema and the
    names of members are quoted, never a value.
    """
    path = list(error.instance_path)
    match error.kind:
        case jsonschema_rs.ValidationErrorKind.Required(property=prop):
            return json_pointer([*path, prop]), "is required but missing"
        case (
            jsonschema_rs.ValidationErrorKind.AdditionalProperties(unexpected=names)
            | jsonschema_rs.ValidationErrorKind.UnevaluatedProperties(unexpected=names)
        ) if names:
            return json_pointer([*path, names[0]]), _unexpected(names)
    return json_pointer(path), _describe(error)


def _describe(error: jsonschema_rs.ValidationError) -> str:
    """Short, value-free description of a validation failure (never echoes the instance)."""
    kind = error.kind
    match kind:
        case jsonschema_rs.ValidationErrorKind.Type(types=types):
            return "must be of type " + " or ".join(types)
        case jsonschema_rs.ValidationErrorKind.Enum():
            return "is not one of the allowed values"
        case jsonschema_rs.ValidationErrorKind.Constant():
            return "is not the required constant value"
        case jsonschema_rs.ValidationErrorKind.Pattern(pattern=pattern):
            return f"does not match pattern {_clip(pattern, 80)}"
        case jsonschema_rs.ValidationErrorKind.Format(format=fmt):
            return f"is not a valid {fmt}"
        case (
            jsonschema_rs.ValidationErrorKind.MaxLength(limit=limit)
            | jsonschema_rs.ValidationErrorKind.MinLength(limit=limit)
            | jsonschema_rs.ValidationErrorKind.MaxItems(limit=limit)
            | jsonschema_rs.ValidationErrorKind.MinItems(limit=limit)
            | jsonschema_rs.ValidationErrorKind.MaxProperties(limit=limit)
            | jsonschema_rs.ValidationErrorKind.MinProperties(limit=limit)
            | jsonschema_rs.ValidationErrorKind.Maximum(limit=limit)
            | jsonschema_rs.ValidationErrorKind.Minimum(limit=limit)
            | jsonschema_rs.ValidationErrorKind.ExclusiveMaximum(limit=limit)
            | jsonschema_rs.ValidationErrorKind.ExclusiveMinimum(limit=limit)
        ):
            return f"violates {kind.name} {limit}"
        case jsonschema_rs.ValidationErrorKind.OneOfNotValid():
            return "matches none of the allowed forms"
        case jsonschema_rs.ValidationErrorKind.OneOfMultipleValid():
            return "matches more than one of the allowed forms"
        case jsonschema_rs.ValidationErrorKind.Not():
            return "is present or has a form that is not allowed here"
        case _:
            return f"fails {kind.name}"


def _def_refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` string in a schema document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key not in ("examples", "const", "enum", "default"):
                yield from _def_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _def_refs(item)


def _merge_shared(file: str, doc: dict[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    """Copy into ``doc`` the shared ``$defs`` it refers to (transitively)."""
    local: dict[str, Any] = dict(doc.get("$defs", {}))
    clashes = sorted(set(local) & set(shared))
    if clashes:
        raise CatalogueError(file, f"$defs {clashes} redefine shared definitions")
    merged = dict(local)
    pending = list(_def_refs(doc))
    while pending:
        ref = pending.pop()
        if not ref.startswith(_LOCAL_DEF_REF):
            raise CatalogueError(file, f"$ref {ref!r} is not local: only #/$defs/<name> is allowed")
        name = ref[len(_LOCAL_DEF_REF) :]
        if name in merged:
            continue
        if name not in shared:
            raise CatalogueError(file, f"$ref {ref!r} names no local or shared definition")
        merged[name] = copy.deepcopy(shared[name])
        pending.extend(_def_refs(merged[name]))
    out = dict(doc)
    out["$defs"] = dict(sorted(merged.items()))
    return out


def _read_json(node: Traversable, file: str) -> dict[str, Any]:
    try:
        doc = json.loads(node.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogueError(file, f"unreadable JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CatalogueError(file, "a schema must be a JSON object")
    return doc


def _compile(file: str, doc: dict[str, Any]) -> jsonschema_rs.Validator:
    try:
        jsonschema_rs.meta.validate(doc)
        return jsonschema_rs.Draft202012Validator(doc, validate_formats=True, offline=True)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        raise CatalogueError(file, f"not a usable Draft 2020-12 schema: {exc}") from exc


class SchemaRegistry:
    """Known (message_type, schema_version) pairs, their schemas and their validators."""

    def __init__(self, entries: Mapping[tuple[str, str], _Entry]) -> None:
        self._entries = dict(sorted(entries.items()))

    @classmethod
    def load_builtin(cls) -> SchemaRegistry:
        return cls.load_from(resources.files("gateway.schemas"))

    @classmethod
    def load_from(cls, root: Traversable) -> SchemaRegistry:
        """Load every ``<type>/<version>.schema.json`` below ``root`` (with its ``_shared``)."""
        shared_node = root.joinpath(*SHARED_DEFS_FILE)
        shared = _read_json(shared_node, "/".join(SHARED_DEFS_FILE)).get("$defs", {})
        entries: dict[tuple[str, str], _Entry] = {}
        for type_dir in root.iterdir():
            if not type_dir.is_dir() or not _MESSAGE_TYPE_RE.fullmatch(type_dir.name):
                continue
            for node in type_dir.iterdir():
                if not node.name.endswith(SCHEMA_SUFFIX):
                    continue
                file = f"{type_dir.name}/{node.name}"
                version = node.name[: -len(SCHEMA_SUFFIX)]
                if not _VERSION_RE.fullmatch(version):
                    raise CatalogueError(file, "version must be <major>.<minor>")
                doc = _merge_shared(file, _read_json(node, file), shared)
                if not isinstance(doc.get("title"), str) or not doc.get("examples"):
                    raise CatalogueError(file, "a schema needs a title and examples")
                entries[(type_dir.name, version)] = _Entry(
                    message_type=type_dir.name,
                    version=version,
                    document=doc,
                    validator=_compile(file, doc),
                    rule=RULES.get((type_dir.name, version)),
                )
        return cls(entries)

    def is_known(self, message_type: str, version: str) -> bool:
        return (message_type, version) in self._entries

    def types(self) -> list[tuple[str, str]]:
        return list(self._entries)

    def _entry(self, message_type: str, version: str) -> _Entry:
        entry = self._entries.get((message_type, version))
        if entry is None:
            raise UnsupportedType(
                f"unknown message_type/schema_version {_clip(message_type)!r}/{_clip(version)!r}"
            )
        return entry

    def validate(self, message_type: str, version: str, payload: Any) -> None:
        """Raise ``UnsupportedType`` or ``SchemaInvalid`` (first error, with its pointer)."""
        entry = self._entry(message_type, version)
        try:
            entry.validator.validate(payload)
        except jsonschema_rs.ValidationError as exc:
            raise PayloadInvalid(*_failure(exc)) from None
        except ValueError:
            raise PayloadInvalid("", "payload is not a JSON value") from None
        if entry.rule is not None:
            entry.rule(payload, self._validate_embedded)

    def _validate_embedded(self, message_type: str, version: str, payload: Any, at: str) -> None:
        if not self.is_known(message_type, version):
            raise PayloadInvalid(f"{at}/schema_version", "names no known schema for this type")
        try:
            self.validate(message_type, version, payload)
        except PayloadInvalid as exc:
            raise exc.rebased(f"{at}/payload") from None

    def requires_in_reply_to(self, message_type: str, version: str) -> bool:
        """True for types that answer another message (their envelope names it)."""
        return self._entry(message_type, version).document.get(IN_REPLY_TO_KEYWORD) == "required"

    def schema(self, message_type: str, version: str) -> dict[str, Any]:
        return copy.deepcopy(self._entry(message_type, version).document)

    def examples(self, message_type: str, version: str) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self._entry(message_type, version).document["examples"]))

    def answer_example(
        self, answer_type: str, version: str, request_payload: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``answer_type``'s first example, echoing the request's reference (``ANSWERS``):
        what a partner's back office answers in the demo and the tests."""
        answer = self.examples(answer_type, version)[0]
        _, member = ANSWERS[answer_type]
        answer[member] = request_payload[member]
        return answer

    def index(self, *, url_prefix: str = URL_PREFIX) -> list[dict[str, str]]:
        """Every known type and version, with the URL of its schema under ``url_prefix`` (the
        partner endpoint's, or the internal API's: the same documents)."""
        return [
            {
                "message_type": e.message_type,
                "schema_version": e.version,
                "title": str(e.document["title"]),
                "url": f"{url_prefix}/{e.message_type}/{e.version}",
            }
            for e in self._entries.values()
        ]
