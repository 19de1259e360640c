"""``c2c-gateway keys rotate``: a new message-signing key for our party, with an overlap.

The new Ed25519 key is written next to the current one and added to gateway.toml's
``signing_keys`` with ``not_before``; every older key that would outlive the overlap gets
``not_after = not_before + overlap``. Signers pick the newest key valid at the time
(``gateway.outbound.submission.current_signing_key``), so from ``not_before`` on we sign with
the new key while partners still accept the old one for messages already in flight.

gateway.toml is edited as text so that its comments and layout stay: a ``not_after`` line
goes under each changed ``[[signing_keys]]`` header and a new ``[[signing_keys]]`` block
follows the last one. The result is parsed back and must equal the intended change exactly,
it must load as a configuration, the change is audited (``key_change``, actor
``cli:<user>``), and only then does the new file replace the old one (rename). Any failure
on the way leaves the configuration untouched and removes the new key files.
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from gateway.audit.events import AuditEvent, EventKind
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.crypto.keys import Alg
from gateway.crypto.pki import PkiError, generate_signing_key
from gateway.envelope import parse_timestamp
from gateway.errors import ConfigError, Malformed, Unavailable
from gateway.runtime import load_own_signing_keys
from gateway.store import InvalidStoreUrl, open_store

_HEADER_RE = re.compile(r"^\s*\[\[\s*signing_keys\s*\]\]\s*(#.*)?$")
_ANY_HEADER_RE = re.compile(r"^\s*\[")
_NOT_AFTER_RE = re.compile(r"^\s*not_after\s*=")
_CONTENT_RE = re.compile(r"^\s*[^\s#]")
MAX_OVERLAP_DAYS = 365


class RotationRefused(Exception):
    """The rotation cannot be made as asked; nothing was changed."""


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def toml_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class RotationPlan:
    """What a rotation changes: indexes of the keys that get ``not_after``, the new entry."""

    not_before: datetime
    old_not_after: datetime
    shortened: tuple[int, ...]
    new_key: Path
    new_entry: dict[str, Any]


def plan_rotation(
    config: GatewayConfig, *, not_before: datetime, overlap: timedelta, alg: Alg = "EdDSA"
) -> RotationPlan:
    """Rotate our keys of ``alg``: a new one from ``not_before``, and the current ones of that
    algorithm valid until the overlap ends. Keys of the other algorithm are left alone: the
    partners signed with them (``sign_with``) keep theirs."""
    try:
        cutoff = not_before + overlap
    except OverflowError:
        raise RotationRefused(
            f"--not-before {toml_time(not_before)} plus the overlap is after the year 9999"
        ) from None
    for index, key in enumerate(config.signing_keys):
        if key.alg == alg and key.not_before is not None and key.not_before >= not_before:
            raise RotationRefused(
                f"signing_keys[{index}] ({key.path.name}) only becomes valid at "
                f"{toml_time(key.not_before)}: a rotation is already pending"
            )
    shortened = tuple(
        index
        for index, key in enumerate(config.signing_keys)
        if key.alg == alg and (key.not_after is None or key.not_after > cutoff)
    )
    folder = config.signing_keys[-1].path.parent
    prefix = "sign-es256" if alg == "ES256" else "sign"
    new_key = folder / f"{prefix}-{not_before.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}.key"
    for path in (new_key, new_key.with_suffix(".pub")):
        if path.exists():
            raise RotationRefused(f"{path} already exists")
    relative = Path(os.path.relpath(new_key, config.source.parent)).as_posix()
    entry = {"path": relative, "alg": alg, "not_before": not_before}
    return RotationPlan(
        not_before=not_before,
        old_not_after=cutoff,
        shortened=shortened,
        new_key=new_key,
        new_entry=entry,
    )


def _entry_lines(entry: dict[str, Any]) -> list[str]:
    return [
        "[[signing_keys]]\n",
        "# added by c2c-gateway keys rotate\n",
        f'path = "{entry["path"]}"\n',
        f'alg = "{entry["alg"]}"\n',
        f"not_before = {toml_time(entry['not_before'])}\n",
    ]


def edit_config_text(text: str, plan: RotationPlan, key_count: int) -> str:
    """gateway.toml with the rotation applied, comments kept; RotationRefused if the file's
    layout does not allow a safe text edit (the exact lines to add are in the message)."""
    lines = text.splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if _HEADER_RE.match(line)]
    if len(headers) != key_count:
        wanted = "".join(_entry_lines(plan.new_entry))
        raise RotationRefused(
            "signing_keys is not written as [[signing_keys]] tables, so it cannot be edited "
            "without losing the file's comments; edit it by hand: set not_after = "
            f"{toml_time(plan.old_not_after)} on the current key(s) and add\n{wanted}"
            f"(the key files were not created: run again after changing the layout)"
        )
    ends = []
    for header in headers:
        end = header + 1
        while end < len(lines) and not _ANY_HEADER_RE.match(lines[end]):
            end += 1
        ends.append(end)
    out: list[str] = []
    last_block_content = max(
        i for i in range(headers[-1], ends[-1]) if i == headers[-1] or _CONTENT_RE.match(lines[i])
    )
    for i, line in enumerate(lines):
        block = next((b for b, h in enumerate(headers) if h < i < ends[b]), None)
        if block in plan.shortened and _NOT_AFTER_RE.match(line):
            continue
        out.append(line if line.endswith("\n") else line + "\n")
        if i in headers and headers.index(i) in plan.shortened:
            out.append(f"not_after = {toml_time(plan.old_not_after)}\n")
        if i == last_block_content:
            out += ["\n", *_entry_lines(plan.new_entry)]
    return "".join(out)


def check_edit(old_text: str, new_text: str, plan: RotationPlan) -> None:
    """The edited file must parse to exactly the intended change, nothing else."""
    expected = tomllib.loads(old_text)
    keys = expected["signing_keys"]
    for index in plan.shortened:
        keys[index]["not_after"] = plan.old_not_after
    keys.append(copy.deepcopy(plan.new_entry))
    try:
        actual = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:
        raise RotationRefused(f"the edited file would not parse ({exc}); nothing changed") from exc
    if actual != expected:
        raise RotationRefused(
            "the file's layout could not be edited safely (the result differs from the "
            "intended change); nothing changed"
        )


def _write_candidate(source: Path, text: str) -> Path:
    tmp = source.with_name(f".{source.name}.rotate-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, source.stat().st_mode & 0o777)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


async def _audit(config: GatewayConfig, event: AuditEvent) -> None:
    store = open_store(
        config.store_url, clock=SystemClock(), timeout_s=config.limits.store_timeout_s
    )
    await store.open()
    try:
        await store.append_audit([event])
    finally:
        await store.close()


@click.group()
def keys() -> None:
    """Our own message-signing keys."""


@keys.command("rotate")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("gateway.toml"),
    show_default=True,
)
@click.option(
    "--not-before",
    "not_before_text",
    help="RFC 3339 UTC time the new key starts signing (default: now). Give partners the "
    "public key before then.",
)
@click.option(
    "--overlap-days",
    type=click.IntRange(0, MAX_OVERLAP_DAYS),
    default=7,
    show_default=True,
    help="Days the old key stays valid after --not-before (messages in flight).",
)
@click.option(
    "--alg",
    type=click.Choice(["EdDSA", "ES256"]),
    default="EdDSA",
    show_default=True,
    help="Which of our keys to rotate: a new key of this algorithm; only the current keys of "
    "it expire (partners signed with the other, sign_with, keep theirs).",
)
def rotate(config_path: Path, not_before_text: str | None, overlap_days: int, alg: Alg) -> None:
    """Create a new signing key and add it to gateway.toml; the old key of its algorithm
    expires after the overlap. Prints the new kid and what partners must be given."""
    now = SystemClock().now().replace(microsecond=0)
    not_before = now
    if not_before_text is not None:
        try:
            not_before = parse_timestamp(not_before_text, "not_before").replace(microsecond=0)
        except Malformed:
            _fail(f"--not-before: {not_before_text!r} is not an RFC 3339 UTC time")
        if not_before < now:
            _fail(f"--not-before: {toml_time(not_before)} is in the past")
    try:
        config = load_config(config_path)
        old_kids_all = [key.kid for key in load_own_signing_keys(config)]
        text = config.source.read_text(encoding="utf-8")
        plan = plan_rotation(
            config, not_before=not_before, overlap=timedelta(days=overlap_days), alg=alg
        )
        new_text = edit_config_text(text, plan, len(config.signing_keys))
        check_edit(text, new_text, plan)
    except ConfigError as exc:
        _fail(f"{exc.file}: {exc.key}: {exc.reason}")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{config_path}: cannot read: {exc}")
    except RotationRefused as exc:
        _fail(f"{config.source}: signing_keys: {exc}")

    actor = f"cli:{getpass.getuser()}"
    shortened_kids = [old_kids_all[i] for i in plan.shortened]
    candidate: Path | None = None
    committed = False
    try:
        pub_path, kid = generate_signing_key(plan.new_key, alg)
    except (PkiError, OSError) as exc:
        _fail(f"cannot create the new key: {exc}")
    try:
        candidate = _write_candidate(config.source, new_text)
        new_config = load_config(candidate)
        if load_own_signing_keys(new_config)[-1].kid != kid:
            _fail(f"{plan.new_key}: the configured key is not the one just created")
        reason = f"new signing key {kid} ({alg}) valid from {toml_time(not_before)}"
        if shortened_kids:
            reason += (
                f"; key(s) {', '.join(shortened_kids)} valid until {toml_time(plan.old_not_after)}"
            )
        event = AuditEvent(
            event=EventKind.KEY_CHANGE,
            at=SystemClock().now(),
            sender=config.party,
            outcome="rotated",
            reason=reason,
            actor=actor,
        )
        asyncio.run(_audit(config, event))
        os.replace(candidate, config.source)
        committed = True
    except ConfigError as exc:
        _fail(f"the edited configuration does not load: {exc.file}: {exc.key}: {exc.reason}")
    except InvalidStoreUrl as exc:
        _fail(f"{config.source}: store_url: {exc}")
    except Unavailable as exc:
        _fail(f"store unavailable, nothing changed (the change must be audited): {exc.reason}")
    except OSError as exc:
        _fail(f"{config.source}: cannot write: {exc}")
    finally:
        if not committed:
            if candidate is not None:
                candidate.unlink(missing_ok=True)
            plan.new_key.unlink(missing_ok=True)
            pub_path.unlink(missing_ok=True)

    party = config.party
    click.echo(f"new signing key  kid {kid}")
    click.echo(f"  private key    {plan.new_key}  (mode 0600, never leaves this host)")
    click.echo(f"  public key     {pub_path}")
    click.echo(f"  valid from     {toml_time(not_before)}")
    for old_kid in shortened_kids:
        click.echo(f"old signing key  kid {old_kid} valid until {toml_time(plan.old_not_after)}")
    click.echo(f"updated {config.source} (comments and layout kept); audited as {actor}")
    click.echo("")
    click.echo(f"give every partner, before {toml_time(not_before)}:")
    click.echo(f"  the public key {pub_path} and its kid {kid}, for {party} e.g.:")
    click.echo("    [[keys]]")
    click.echo(f'    path = "{party}-{pub_path.name}"')
    click.echo(f'    alg = "{alg}"')
    click.echo(f"    not_before = {toml_time(not_before)}")
    if shortened_kids:
        click.echo(
            f"  and not_after = {toml_time(plan.old_not_after)} on the old key "
            f"({', '.join(shortened_kids)})"
        )
    click.echo("restart the gateway to load the new key: a running gateway keeps its keys.")
