"""An answer echoes its request's reference (``ANSWERS``): checked on both sides.

A partner's answer to our request is checked at receipt (``inbound.stages.pair_answer``), and
our answer to a partner's request at submission (``outbound.submission.pair_answer``), with
the same rule: the answer's payload member equals the request's, read from the request's
stored bytes in its partner's format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import structlog

from gateway.adapters.registry import Adapter, to_canonical_off_loop
from gateway.errors import GatewayError
from gateway.schemas.failures import PayloadInvalid

log = structlog.get_logger(__name__)


async def check_echo(
    adapter: Adapter,
    request_body: bytes,
    answer: Mapping[str, Any],
    member: str,
    *,
    request_id: str,
) -> None:
    """PayloadInvalid at ``/member`` unless ``answer`` echoes the request's ``member``. A
    request that no longer reads (its partner's adapter changed since it was stored) leaves
    nothing to compare with, and is no fault of the answer's author: logged, let through."""
    try:
        canonical = await to_canonical_off_loop(adapter, request_body)
        expected = json.loads(canonical)["payload"][member]
    except (GatewayError, ValueError, LookupError, TypeError) as exc:
        log.warning("answer_request_unreadable", request=request_id, error=type(exc).__name__)
        return
    if answer.get(member) != expected:
        raise PayloadInvalid(
            f"/{member}", f"does not echo the {member} of the request named in in_reply_to"
        )
