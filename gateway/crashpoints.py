"""Named crash points for the kill -9 matrix (RELIABILITY-SECURITY T68).

``GW_CRASH_AT=<point>`` or ``GW_CRASH_AT=<point>:<n>`` in the environment of ``c2c-gateway
serve`` makes the process SIGKILL itself the n-th time (default: the first time) it reaches
that point. Before it dies it writes one JSON line to stderr (``"event": "crash_point"``, the
point, the hit and, where the point has one, the message in hand), so a test knows the kill
came from the point it armed. Nothing is flushed, closed or rolled back: the process ends as it
would in a power cut, at a known place.

The points carry the stage names of RELIABILITY-SECURITY section 0; where each one sits:

- ``S2``: the size, rate and media-type guard passed (``stages.check_limits``);
- ``S3``: the detached JWS verified (``stages.verify_signature``);
- ``S5``: the envelope parsed, the signer matched, freshness checked
  (``stages.parse_and_check_freshness``; it runs before the schema here);
- ``S4``: the payload validated against its schema (``stages.validate_schema``);
- ``S6-before-commit``: the inbound row, its receipt and its audit entry written inside the
  store transaction, which is not committed yet (both stores);
- ``S6-after-commit``: that transaction committed, nothing answered yet (``stages.persist``);
- ``S7-after-response``: an HTTPS ACK written to the partner's connection; over AMQP, a
  delivery's ``basic.ack`` handed to the connection (it may not be on the wire yet);
- ``S8-before-confirm``: the relay publishing a batch to the internal bus: reached as each
  record's confirm comes back, so the batch's other records may be published and unconfirmed,
  and none of it is marked relayed;
- ``S8-after-confirm-before-mark``: the batch confirmed, not yet marked relayed;
- ``S9-after-send-before-mark``: a partner answered an outbound message, the answer not yet
  recorded;
- ``S9-after-mark-before-commit``: the outbound attempt's outcome written inside its store
  transaction, not committed (both stores);
- ``S10-outcome-after-confirm-before-mark``: the outcome relay's batch (final states of
  outbound messages) confirmed by the bus, not yet marked published;
- ``audit-append``: audit entries and tree nodes written inside a store transaction, the log's
  head not yet moved, nothing committed (both stores);
- ``checkpoint-sign``: a checkpoint signed, not yet saved.

Unarmed (the variable unset, as in production), a point costs one comparison. An unknown point
name is a ``ConfigError`` at startup, so a misspelt test cannot pass without crashing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping

from gateway.errors import ConfigError

ENV_VAR = "GW_CRASH_AT"

POINTS: tuple[str, ...] = (
    "S2",
    "S3",
    "S5",
    "S4",
    "S6-before-commit",
    "S6-after-commit",
    "S7-after-response",
    "S8-before-confirm",
    "S8-after-confirm-before-mark",
    "S9-after-send-before-mark",
    "S9-after-mark-before-commit",
    "S10-outcome-after-confirm-before-mark",
    "audit-append",
    "checkpoint-sign",
)

_armed: str | None = None
_at_hit = 1
_hits = 0
_lock = threading.Lock()


def arm_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """Arm the point ``GW_CRASH_AT`` names (None when it is unset or empty); returns the
    setting as given."""
    value = environ.get(ENV_VAR, "").strip()
    if not value:
        disarm()
        return None
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ConfigError(
            "environment", ENV_VAR, f"{name!r} is not a crash point (known: {', '.join(POINTS)})"
        )
    at_hit = 1
    if count:
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(
                "environment", ENV_VAR, f"{value!r}: the hit after ':' must be a whole number ≥ 1"
            )
        at_hit = int(count)
    arm(name, at_hit)
    return value


def arm(name: str, at_hit: int = 1) -> None:
    global _armed, _at_hit, _hits
    if name not in POINTS:
        raise ValueError(f"{name!r} is not a crash point")
    with _lock:
        _armed, _at_hit, _hits = name, at_hit, 0


def disarm() -> None:
    global _armed, _hits
    with _lock:
        _armed, _hits = None, 0


def armed() -> str | None:
    """The armed point, or None."""
    return _armed


def crash_point(name: str, **detail: str) -> None:
    """Reached ``name``: SIGKILL this process if that is the armed point's n-th hit. ``detail``
    (what was in hand, e.g. a message id) goes into the crash line."""
    if _armed != name:
        return
    global _hits
    with _lock:
        _hits += 1
        hit = _hits
    if hit != _at_hit:
        return
    line = json.dumps(
        {"event": "crash_point", "level": "critical", "point": name, "hit": hit, **detail}
    )
    os.write(2, line.encode() + b"\n")
    os.kill(os.getpid(), signal.SIGKILL)
