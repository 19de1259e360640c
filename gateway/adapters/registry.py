"""Adapters map a partner's native wire format to and from the canonical envelope.

The signature always covers the bytes on the wire; an adapter only runs after it verified.
Canonical partners use the pass-through. Native-format adapters (partners/<id>/adapter.py)
plug in here later without changing the pipelines.
"""

from __future__ import annotations

from typing import Protocol

from gateway.config import PartnerConfig
from gateway.errors import ConfigError

CANONICAL = "canonical"


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

    def to_canonical(self, body: bytes) -> bytes:
        return body

    def from_canonical(self, body: bytes) -> bytes:
        return body


_CANONICAL_ADAPTER = CanonicalAdapter()


def adapter_for(partner: PartnerConfig) -> Adapter:
    """The partner's adapter; an adapter that does not exist fails at start, not per message."""
    if partner.adapter == CANONICAL:
        return _CANONICAL_ADAPTER
    raise ConfigError(
        str(partner.directory / "partner.toml"),
        "adapter",
        f"unknown adapter {partner.adapter!r}; only {CANONICAL!r} is available",
    )
