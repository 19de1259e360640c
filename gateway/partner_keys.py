"""Partners' signing keys, taken in again while serving: revoke or rotate one without a restart.

On SIGHUP, ``serve`` reads the configuration again and swaps the partners' verification keys
(the ``[[keys]]`` of each ``partner.toml``) into the key ring that the inbound pipeline and the
dispatcher share. A key removed is refused from the next message on; a key added is accepted.
A ``not_after`` set in the past is not a revocation: PROTOCOL checks a key at the message's
``created_at``, so a message signed before it is still accepted within the replay window.
Nothing else is taken in: other changes (partners added or removed, URLs, limits, message
types, anything in gateway.toml) are named in a warning and wait for a restart. A partner
added is served from the restart on, its keys with it; a partner removed has its keys
removed at once (fail closed), the rest of it at the restart.

A configuration that does not load is refused with its exact error and the keys in force stay.
Each change, and each refusal, is audited as a ``key_change``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import UTC, datetime

from gateway.clock import format_rfc3339
from gateway.config import GatewayConfig
from gateway.crypto.keys import VerificationKey

RELOADED = "partner_keys_reloaded"
REFUSED = "partner_keys_reload_refused"

_Window = tuple[datetime | None, datetime | None]
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _window(windows: tuple[_Window, ...]) -> str:
    def one(window: _Window) -> str:
        start, end = (format_rfc3339(t) if t is not None else "-" for t in window)
        return f"valid {start} to {end}"

    return " and ".join(one(window) for window in windows)


def _windows(keys: Iterable[VerificationKey]) -> dict[tuple[str, str], tuple[_Window, ...]]:
    """Each (party, kid) with all its windows: one key may be listed twice."""
    found: dict[tuple[str, str], list[_Window]] = {}
    for k in keys:
        found.setdefault((k.party, k.kid), []).append((k.not_before, k.not_after))
    return {
        ident: tuple(sorted(windows, key=lambda w: (w[0] or _EARLIEST, w[1] or _LATEST)))
        for ident, windows in found.items()
    }


def key_changes(before: Iterable[VerificationKey], after: Iterable[VerificationKey]) -> list[str]:
    """What differs between two sets of partner keys, one line per key, stable order."""
    old, new = _windows(before), _windows(after)
    changes = []
    for party, kid in sorted(old.keys() | new.keys()):
        was, now = old.get((party, kid)), new.get((party, kid))
        if was == now:
            continue
        if was is None:
            assert now is not None
            changes.append(f"{party}: key {kid} added ({_window(now)})")
        elif now is None:
            changes.append(f"{party}: key {kid} removed")
        else:
            changes.append(f"{party}: key {kid} now {_window(now)} (was {_window(was)})")
    return changes


def served_keys(served: GatewayConfig, keys: Iterable[VerificationKey]) -> list[VerificationKey]:
    """The keys of partners the running gateway serves: a partner added since its start is
    not identified, authorised or routed until a restart, nor are its keys taken in before."""
    return [key for key in keys if key.party in served.partners]


def other_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Partner settings besides keys that differ: they need a restart."""
    found = []
    for pid in sorted(old.partners.keys() | new.partners.keys()):
        was, now = old.partners.get(pid), new.partners.get(pid)
        if was is None:
            found.append(f"{pid} added: served, its keys with it, after a restart")
        elif now is None:
            found.append(f"{pid} removed: its keys no longer accepted, the rest after a restart")
        elif dataclasses.replace(was, keys=()) != dataclasses.replace(now, keys=()):
            found.append(f"{pid} changed")
    return found


#: gateway.toml's settings a SIGHUP does not compare: the file itself, and the partners
#: (``other_changes`` names theirs)
_NOT_SETTINGS = frozenset({"source", "partners"})


def gateway_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """gateway.toml settings that differ, by name (``limits.max_body_bytes``; a section added
    or removed whole by its own), never by value (a URL may hold a password): they need a
    restart. The TLS files' contents are not settings: a SIGHUP takes a renewed pair in."""
    found = []
    for item in dataclasses.fields(old):
        if item.name in _NOT_SETTINGS:
            continue
        was, now = getattr(old, item.name), getattr(new, item.name)
        if was == now:
            continue
        if dataclasses.is_dataclass(was) and dataclasses.is_dataclass(now):
            found += [
                f"{item.name}.{sub.name}"
                for sub in dataclasses.fields(was)
                if getattr(was, sub.name) != getattr(now, sub.name)
            ]
        else:
            found.append(item.name)
    return found
