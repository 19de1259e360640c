"""Adapters map a partner's native wire format to and from the canonical envelope.

The signature always covers the bytes on the wire; an adapter only runs after it verified.
Canonical partners use the pass-through. A native-format partner names its adapter module in
``partner.toml`` (``adapter = "adapter.py"``, a file in the partner's folder); it is imported
once, at start, and its contract is checked then (docs/adapters.md):

- ``content_types``: a non-empty collection of media types (``"application/xml"``); the
  first listed is what we send, any of them is accepted inbound;
- ``to_canonical(body: bytes) -> bytes`` and ``from_canonical(body: bytes) -> bytes``.

``to_canonical`` and ``from_canonical`` here are the only way the gateway calls an adapter: any
exception or a result that is not ``bytes`` becomes ``Malformed`` (PROTOCOL.md section 4,
"native format unparseable") whose reason names the adapter, never an internal error. The
``*_off_loop`` forms run a native adapter in a worker thread so that a slow one does not stall
the event loop; the pass-through stays inline.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import structlog

from gateway.config import PartnerConfig
from gateway.errors import ConfigError, GatewayError, Malformed

CANONICAL = "canonical"
#: what a partner is told when its native message cannot be mapped (PROTOCOL.md section 4)
NATIVE_UNPARSEABLE = "native format unparseable"
#: the longest exception message quoted in a refusal's reason
_MAX_QUOTED = 160

log = structlog.get_logger(__name__)


class Adapter(Protocol):
    name: str
    #: media types (without parameters) this partner's messages arrive with
    content_types: frozenset[str]

    def to_canonical(self, body: bytes) -> bytes:
        """Native wire bytes -> canonical envelope bytes; raises ``Malformed``."""
        ...

    def from_canonical(self, body: bytes) -> bytes:
        """Canonical envelope bytes -> native wire bytes."""
        ...


class CanonicalAdapter:
    """Pass-through for partners that speak the PROTOCOL.md envelope natively."""

    name = CANONICAL
    content_types = frozenset({"application/json"})
    #: the media type we send with
    content_type = "application/json"

    def to_canonical(self, body: bytes) -> bytes:
        return body

    def from_canonical(self, body: bytes) -> bytes:
        return body


class ModuleAdapter:
    """A partner's ``adapter.py``, loaded and checked."""

    def __init__(self, *, name: str, module: ModuleType, content_types: tuple[str, ...]) -> None:
        self.name = name
        self.module = module
        self.content_type = content_types[0]
        self.content_types = frozenset(content_types)
        self._to: Callable[[bytes], Any] = module.to_canonical
        self._from: Callable[[bytes], Any] = module.from_canonical

    def to_canonical(self, body: bytes) -> bytes:
        return _checked(self.name, "to_canonical", self._to, body)

    def from_canonical(self, body: bytes) -> bytes:
        return _checked(self.name, "from_canonical", self._from, body)


_CANONICAL_ADAPTER = CanonicalAdapter()
#: loaded adapter modules by resolved file: each is imported once per process
_LOADED: dict[Path, ModuleAdapter] = {}
_LOADING = threading.Lock()


def cut_text(exc: BaseException) -> str:
    """An exception's text, cut to ``_MAX_QUOTED`` characters (``...`` when cut)."""
    text = str(exc)
    return text[:_MAX_QUOTED] + "..." if len(text) > _MAX_QUOTED else text


def _quoted(exc: BaseException) -> str:
    return repr(cut_text(exc))


def _checked(name: str, method: str, call: Callable[[bytes], Any], body: bytes) -> bytes:
    """``call(body)``, its failures and a result other than bytes turned into ``Malformed``."""
    try:
        result = call(body)
    except Malformed as exc:
        raise Malformed(
            f"adapter {name} {method}: {exc.reason}", detail=NATIVE_UNPARSEABLE
        ) from None
    except Exception as exc:
        if not isinstance(exc, ValueError | GatewayError):
            # not a parser's ordinary refusal: likely a bug in the adapter, for its author
            log.error("adapter_failed", adapter=name, method=method, exc_info=exc)
        else:
            # a parser's text quotes what it could not read: a value of the payload, which
            # belongs in neither the audit log (kept for good, hashed into its tree) nor the
            # answer; the operator's log gets it, cut short
            log.warning(
                "adapter_refused",
                adapter=name,
                method=method,
                error=f"{type(exc).__name__}: {_quoted(exc)}",
            )
        raise Malformed(
            f"adapter {name} {method} raised {type(exc).__name__} (its text is in the log,"
            " adapter_refused or adapter_failed)",
            detail=NATIVE_UNPARSEABLE,
        ) from exc  # for `partners check`, which shows a fixture's own text
    if not isinstance(result, bytes):
        raise Malformed(
            f"adapter {name} {method} returned {type(result).__name__}, not bytes",
            detail=NATIVE_UNPARSEABLE,
        )
    return result


def is_canonical(adapter: Adapter) -> bool:
    return adapter.name == CANONICAL


def content_type_of(adapter: Adapter) -> str:
    """The media type sent with this partner's messages and receipts."""
    chosen = getattr(adapter, "content_type", None)
    return chosen if isinstance(chosen, str) else min(adapter.content_types)


def partner_media_type(partners: Mapping[str, PartnerConfig], partner: str) -> str:
    """The media type of a partner's stored bytes. The store keeps the bytes, not the media
    type they came with: they are in the partner's format, the canonical envelope (JSON) or
    its adapter's native one (docs/adapters.md), as configured now; a partner no longer
    configured is ``application/octet-stream``."""
    configured = partners.get(partner)
    if configured is None:
        return "application/octet-stream"
    return content_type_of(adapter_for(configured))


async def to_canonical_off_loop(adapter: Adapter, body: bytes) -> bytes:
    """``adapter.to_canonical`` in a worker thread (inline for the pass-through)."""
    if is_canonical(adapter):
        return adapter.to_canonical(body)
    return await asyncio.to_thread(adapter.to_canonical, body)


async def from_canonical_off_loop(adapter: Adapter, body: bytes) -> bytes:
    """``adapter.from_canonical`` in a worker thread (inline for the pass-through)."""
    if is_canonical(adapter):
        return adapter.from_canonical(body)
    return await asyncio.to_thread(adapter.from_canonical, body)


def _content_types(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str) or not isinstance(value, Iterable):
        return None
    items = tuple(value)
    if not items or not all(isinstance(item, str) and "/" in item for item in items):
        return None
    return tuple(item.split(";", 1)[0].strip().lower() for item in items)


def _load(partner: PartnerConfig, path: Path) -> ModuleAdapter:
    toml = str(partner.directory / "partner.toml")
    # unique per file: two partners (or two gateways in one process) never share a module
    module_name = f"c2c_partner_adapter_{hashlib.sha256(bytes(path)).hexdigest()[:16]}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError("not a loadable Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # what dataclasses and pickle look a module up in
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(
            toml, "adapter", f"{path} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    problems = []
    content_types = _content_types(getattr(module, "content_types", None))
    if content_types is None:
        problems.append("content_types must be a non-empty list of media types")
    problems.extend(
        f"{name} must be a function taking the body bytes"
        for name in ("to_canonical", "from_canonical")
        if not callable(getattr(module, name, None))
    )
    if problems or content_types is None:
        sys.modules.pop(module_name, None)
        raise ConfigError(toml, "adapter", f"{path}: {'; '.join(problems)}")
    name = f"{partner.id}/{partner.adapter}"
    return ModuleAdapter(name=name, module=module, content_types=content_types)


def adapter_for(partner: PartnerConfig) -> Adapter:
    """The partner's adapter; one that cannot be loaded fails at start, not per message."""
    if partner.adapter == CANONICAL:
        return _CANONICAL_ADAPTER
    path = (partner.directory / partner.adapter).resolve()
    with _LOADING:
        loaded = _LOADED.get(path)
        if loaded is None:
            loaded = _LOADED[path] = _load(partner, path)
    return loaded
