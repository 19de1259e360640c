"""Typed envelope model (PROTOCOL.md section 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

PARTY_ID_RE = re.compile(r"^[A-Z]{2}-[A-Z0-9]{2,16}$")
#: the messages of mutual audit witnessing (PROTOCOL.md section 6, gateway/audit/witnessing.py)
CHECKPOINT_TYPE = "audit.checkpoint"
COSIGNATURE_TYPE = "audit.cosignature"
WITNESSING_TYPES = frozenset({CHECKPOINT_TYPE, COSIGNATURE_TYPE})


def is_party_id(value: object) -> bool:
    return isinstance(value, str) and PARTY_ID_RE.fullmatch(value) is not None


class Priority(StrEnum):
    ROUTINE = "routine"
    URGENT = "urgent"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    message_id: str
    message_type: str
    schema_version: str
    sender: str
    recipient: str
    created_at: datetime
    expires_at: datetime | None = None
    correlation_id: str | None = None
    in_reply_to: str | None = None
    priority: Priority = Priority.ROUTINE
    respond_by: datetime | None = None
    legal_basis: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Envelope:
    header: Header
    payload: dict[str, Any] = field(default_factory=dict)
