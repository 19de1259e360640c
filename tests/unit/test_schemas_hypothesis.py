"""Generated junk and mutated examples: validation passes or raises a GatewayError, nothing else."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError, SchemaInvalid
from gateway.schemas import SchemaRegistry

REGISTRY = SchemaRegistry.load_builtin()
TYPES = REGISTRY.types()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        ["", "1.0", "USD", "usd", "8518300000", "85183", "2026-03-02T19:15:00Z", "ACK"]
    ),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=12), inner, max_size=5),
    ),
    max_leaves=30,
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _validate(message_type: str, version: str, payload: Any) -> None:
    error: GatewayError | None = None
    try:
        REGISTRY.validate(message_type, version, payload)
    except GatewayError as exc:
        error = exc
    if isinstance(error, SchemaInvalid):
        assert len(error.reason) <= 200
        assert error.pointer == "" or error.pointer.startswith("/")


def _locations(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _locations(value, (*path, index))
    return found


def _resolve(doc: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@given(st.sampled_from(TYPES), junk)
@SETTINGS
def test_junk_payloads_raise_only_gateway_errors(
    type_version: tuple[str, str], payload: Any
) -> None:
    _validate(*type_version, payload)


@given(st.sampled_from(TYPES), st.data())
@SETTINGS
def test_mutated_examples_raise_only_gateway_errors(
    type_version: tuple[str, str], data: st.DataObject
) -> None:
    examples = REGISTRY.examples(*type_version)
    payload = copy.deepcopy(data.draw(st.sampled_from(examples)))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(_locations(payload)))
        if not path:
            payload = data.draw(junk)
            break
        parent = _resolve(payload, path[:-1])
        operation = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if operation == "replace":
            parent[path[-1]] = data.draw(junk)
        elif operation == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = data.draw(junk)
        else:
            parent.append(data.draw(junk))
    _validate(*type_version, payload)


@given(st.sampled_from(TYPES), st.text(max_size=30), st.text(max_size=10))
@SETTINGS
def test_arbitrary_type_names_raise_only_gateway_errors(
    type_version: tuple[str, str], message_type: str, version: str
) -> None:
    payload = REGISTRY.examples(*type_version)[0]
    _validate(message_type, version, payload)
