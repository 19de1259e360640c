"""``c2c-gateway partners list|check``: what partners are configured, and whether one works.

``check`` loads the configuration (which refuses what ``serve`` refuses across partners: a
client certificate two partners accept, a partner on AMQP with no broker), the partner's keys,
its TLS trust anchor, audit key and adapter, then runs every fixture message in
``partners/<id>/fixtures/{inbound,outbound}/`` through the same steps the gateway applies
(adapter, strict envelope, direction, authorisation, schema).
Exit codes: 0 all good, 1 a check failed, 2 the configuration does not load or no such partner.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import click

from gateway.adapters.registry import Adapter, adapter_for, cut_text
from gateway.cli.params import config_option
from gateway.clock import SystemClock, format_rfc3339
from gateway.config import GatewayConfig, PartnerConfig, load_config
from gateway.crypto.notes import load_note_verifier
from gateway.crypto.x509 import cert_subject_cn, load_certificate
from gateway.envelope import parse_envelope
from gateway.errors import ConfigError, GatewayError
from gateway.model import Direction
from gateway.schemas.registry import SchemaRegistry

FIXTURES_DIR = "fixtures"
_NAME_WIDTH = 40


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _load(config_path: Path) -> GatewayConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))


def _when(value: datetime | None) -> str:
    return format_rfc3339(value) if value is not None else "-"


def _transports(partner: PartnerConfig) -> str:
    names = []
    if partner.https.url or partner.https.ca:
        names.append("https")
    if partner.amqp.enabled:
        names.append("amqp")
    return ",".join(names)


def _kid(partner: PartnerConfig, index: int) -> str:
    key = partner.keys[index]
    try:
        loaded = partner.load_key(key)
    except ConfigError as exc:
        return f"UNREADABLE ({exc.reason})"
    return loaded.kid


@click.group()
def partners() -> None:
    """Configured partner administrations."""


@partners.command("list")
@config_option
def list_command(config_path: Path) -> None:
    """Table of partners: transports, message types, signing keys and their validity."""
    config = _load(config_path)
    header = ("ID", "NAME", "TRANSPORTS", "IN", "OUT", "KEY ID (kid)", "ALG", "FROM", "UNTIL")
    rows: list[tuple[str, ...]] = []
    unreadable = False
    for partner in config.partners.values():
        name = partner.name if len(partner.name) <= _NAME_WIDTH else partner.name[:39] + "…"
        for index, key in enumerate(partner.keys):
            kid = _kid(partner, index)
            unreadable = unreadable or kid.startswith("UNREADABLE")
            first = index == 0
            rows.append(
                (
                    partner.id if first else "",
                    name if first else "",
                    _transports(partner) if first else "",
                    str(len(partner.inbound_types)) if first else "",
                    str(len(partner.outbound_types)) if first else "",
                    kid,
                    key.alg,
                    _when(key.not_before),
                    _when(key.not_after),
                )
            )
    if not rows:
        click.echo(f"no partners in {config.partners_dir}")
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo("  ".join(cells).rstrip())
    if unreadable:
        sys.exit(1)


@dataclass(frozen=True, kw_only=True)
class _Result:
    ok: bool
    what: str
    detail: str


def _check_keys(partner: PartnerConfig, now: datetime) -> Iterator[_Result]:
    valid_now = 0
    for key in partner.keys:
        try:
            loaded = partner.load_key(key)
        except ConfigError as exc:
            yield _Result(ok=False, what="key", detail=str(exc))
            continue
        window = f"valid {_when(key.not_before)} .. {_when(key.not_after)}"
        yield _Result(ok=True, what="key", detail=f"{loaded.kid} {loaded.alg} {window}")
        valid_now += loaded.valid_at(now)
    if not valid_now:
        # every message the partner signs now would be refused UNKNOWN_KEY
        yield _Result(ok=False, what="key", detail=f"no key is valid now ({format_rfc3339(now)})")


def _check_tls(partner: PartnerConfig) -> Iterator[_Result]:
    if partner.https.ca is None:
        return
    try:
        ca = load_certificate(partner.https.ca)
    except ConfigError as exc:
        yield _Result(ok=False, what="tls ca", detail=str(exc))
        return
    expiry = format_rfc3339(ca.not_valid_after_utc)
    yield _Result(
        ok=True,
        what="tls ca",
        detail=f"{partner.https.ca} (CN {cert_subject_cn(ca)}, expires {expiry})",
    )
    accepted = [*partner.https.client_cert_subjects, *partner.https.client_cert_fingerprints]
    if partner.https.url or partner.https.ca:
        yield _Result(
            ok=bool(accepted),
            what="tls client",
            detail=(
                "accepts " + ", ".join(accepted)
                if accepted
                else "no client_cert_subjects or client_cert_fingerprints: no client is accepted"
            ),
        )


def _check_audit(partner: PartnerConfig) -> Iterator[_Result]:
    """The partner's audit key, loaded as witnessing loads it when ``serve`` starts."""
    if partner.audit is None:
        return
    path, origin = partner.audit.public_key, partner.audit.origin
    try:
        load_note_verifier(path, origin)
        load_note_verifier(path, origin, cosignature=True)
    except ConfigError as exc:
        yield _Result(ok=False, what="audit key", detail=str(exc))
        return
    yield _Result(ok=True, what="audit key", detail=f"{path} (Ed25519, origin {origin})")


def _check_fixture(
    path: Path,
    direction: Direction,
    *,
    config: GatewayConfig,
    partner: PartnerConfig,
    adapter: Adapter,
    registry: SchemaRegistry,
) -> _Result:
    name = path.relative_to(partner.directory).as_posix()
    try:
        wire = path.read_bytes()
        envelope = parse_envelope(
            adapter.to_canonical(wire),
            max_bytes=partner.max_body_bytes,
            is_known_type=registry.is_known,
        )
        header = envelope.header
        registry.validate(header.message_type, header.schema_version, envelope.payload)
    except OSError as exc:
        return _Result(ok=False, what="fixture", detail=f"{name}: {exc.strerror or exc}")
    except GatewayError as exc:
        # an adapter's exception: its text (kept out of the audit log, where it could quote a
        # partner's payload) is the point here, on the operator's own fixture
        why = exc.__cause__
        cause = "" if why is None else f" [{type(why).__name__}: {cut_text(why)}]"
        return _Result(ok=False, what="fixture", detail=f"{name}: {exc.code}: {exc.reason}{cause}")
    if direction is Direction.INBOUND:
        expected = (partner.id, config.party)
        allowed = partner.inbound_types
    else:
        expected = (config.party, partner.id)
        allowed = partner.outbound_types
    problems = []
    if (header.sender, header.recipient) != expected:
        problems.append(
            f"{direction.value} message must go {expected[0]} -> {expected[1]}, "
            f"not {header.sender} -> {header.recipient}"
        )
    if header.message_type not in allowed:
        problems.append(f"{header.message_type} is not in {direction.value}_types")
    if partner.legal_basis is not None and header.legal_basis != partner.legal_basis:
        problems.append(f"legal_basis must be {partner.legal_basis!r}")
    if registry.requires_in_reply_to(header.message_type, header.schema_version) and (
        header.in_reply_to is None
    ):
        problems.append(f"{header.message_type} needs in_reply_to")
    summary = (
        f"{name}: {header.message_type} {header.schema_version} "
        f"{header.sender} -> {header.recipient}"
    )
    if problems:
        return _Result(ok=False, what="fixture", detail=f"{summary}: {'; '.join(problems)}")
    return _Result(ok=True, what="fixture", detail=summary)


def _check_fixtures(
    config: GatewayConfig, partner: PartnerConfig, adapter: Adapter
) -> Iterator[_Result]:
    registry = SchemaRegistry.load_builtin()
    found = False
    for direction in (Direction.INBOUND, Direction.OUTBOUND):
        folder = partner.directory / FIXTURES_DIR / direction.value
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            found = True
            yield _check_fixture(
                path,
                direction,
                config=config,
                partner=partner,
                adapter=adapter,
                registry=registry,
            )
    if not found:
        yield _Result(
            ok=True,
            what="fixtures",
            detail=f"none in {FIXTURES_DIR}/inbound or {FIXTURES_DIR}/outbound",
        )


def _checks(config: GatewayConfig, partner: PartnerConfig) -> Iterator[_Result]:
    yield _Result(ok=True, what="config", detail=str(partner.directory / "partner.toml"))
    yield from _check_keys(partner, SystemClock().now())
    yield from _check_tls(partner)
    yield from _check_audit(partner)
    try:
        adapter = adapter_for(partner)
    except ConfigError as exc:
        yield _Result(ok=False, what="adapter", detail=str(exc))
        return
    yield _Result(ok=True, what="adapter", detail=adapter.name)
    yield from _check_fixtures(config, partner, adapter)


@partners.command("check")
@click.argument("partner_id", metavar="ID")
@config_option
def check_command(partner_id: str, config_path: Path) -> None:
    """Check one partner: config, keys, TLS trust, audit key, adapter and its fixtures."""
    config = _load(config_path)
    partner = config.partners.get(partner_id)
    if partner is None:
        known = ", ".join(config.partners) or "none"
        _fail(f"{config.partners_dir}: no partner {partner_id!r} (configured: {known})")
    click.echo(f"partner {partner.id} ({partner.name})")
    failed = passed = 0
    for result in _checks(config, partner):
        click.echo(f"  {'ok  ' if result.ok else 'FAIL'}  {result.what:<10}  {result.detail}")
        if result.ok:
            passed += 1
        else:
            failed += 1
    click.echo(f"{partner.id}: {passed} ok, {failed} failed")
    if failed:
        sys.exit(1)
