"""Logging for every entry point (serve, sandbox, demo, CLI): one configuration, no leaks.

structlog renders JSON lines when stderr is not a terminal and readable lines when it is;
stdlib loggers (aiohttp, asyncpg ...) go through the same processors. Before rendering, every
event is scrubbed: fields named like secrets or bodies are replaced, values that look like a
JWS/JWT, a PEM block or a bearer token are replaced wherever they appear, control and bidi
characters are escaped and long fields truncated (T79), so a partner-controlled value can
neither forge log lines nor flood them.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

#: longest rendered field (T79: at most 256 characters)
MAX_FIELD = 256
#: tracebacks are kept longer, scrubbed but not cut to a line
MAX_EXCEPTION = 8192
REDACTED = "[redacted]"
#: field names whose values are never logged (compared lower-cased, by suffix)
SECRET_NAMES = (
    "authorization",
    "token",
    "password",
    "passwd",
    "secret",
    "signature",
    "jws",
    "body",
    "payload",
    "envelope",
    "private_key",
    "cookie",
    "pem",
    "dsn",
)
_SECRET_VALUES = re.compile(
    # compact JWS/JWT (also detached, with an empty payload)
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{16,}"
    # PEM blocks, complete or cut
    r"|-----BEGIN [A-Z ]+-----[^-]*(?:-----END [A-Z ]+-----)?"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
    # credentials in URLs (scheme://user:password@)
    r"|(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"
)
#: C0/C1 controls, DEL, and bidi/format characters that can reorder what a reader sees
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def scrub_text(text: str, *, limit: int = MAX_FIELD) -> str:
    """Secrets replaced, control characters escaped, cut to ``limit`` characters."""
    clean = _UNSAFE.sub(_escape, _SECRET_VALUES.sub(REDACTED, text))
    if len(clean) > limit:
        return f"{clean[:limit]}...(+{len(clean) - limit} chars)"
    return clean


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(SECRET_NAMES)


def _scrub_value(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return scrub_text(value, limit=limit)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, dict):
        return {
            scrub_text(str(k)): REDACTED if _secret_name(str(k)) else _scrub_value(v, limit)
            for k, v in list(value.items())[:50]
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v, limit) for v in list(value)[:50]]
    return scrub_text(str(value), limit=limit)


def scrub_event(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the no-leak and no-injection rules of T79 on every field."""
    for name in list(event):
        if name.startswith("_"):
            # structlog's own bookkeeping (the stdlib record), removed before rendering
            continue
        if name == "exception":
            event[name] = scrub_text(str(event[name]), limit=MAX_EXCEPTION)
        elif name != "event" and _secret_name(name):
            event[name] = REDACTED
        else:
            event[name] = _scrub_value(event[name], MAX_FIELD)
    return event


def _shared_processors() -> list[structlog.typing.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub_event,
    ]


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        del value


class _NoMessageBodies(logging.Filter):
    """aiormq logs a broker message it cannot place (a return it has no publish for) with
    ``%r``, body included: a partner's payload in the log. Such an argument is replaced by
    what identifies it, without its content."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_has_body(arg) for arg in args):
            record.args = tuple(_without_body(arg) for arg in args)
        return True


def _has_body(value: object) -> bool:
    return isinstance(getattr(value, "body", None), bytes | bytearray | memoryview)


def _without_body(value: object) -> object:
    if not _has_body(value):
        return value
    header = getattr(value, "header", None)
    properties = getattr(header, "properties", None)
    message_id = getattr(properties, "message_id", None)
    body = getattr(value, "body", b"")
    return _Summary(
        f"<{type(value).__name__} message_id={str(message_id)[:64]!r}, "
        f"body of {len(body)} bytes not logged>"
    )


class _Summary(str):
    """Logged as it reads, with ``%r`` as with ``%s``."""

    def __repr__(self) -> str:
        return str(self)


def _stderr_logger(*args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def configure_logging(
    level: int = logging.INFO, *, json: bool | None = None, cache: bool = True
) -> None:
    """Log to stderr: JSON lines for machines, readable lines on a TTY (``json`` forces it).

    ``cache=False`` (short CLI commands) looks ``sys.stderr`` up on every event.
    """
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr) if cache else _stderr_logger,
        cache_logger_on_first_use=cache,
    )
    handler = _StderrHandler()
    handler.addFilter(_NoMessageBodies())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared_processors()],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # third-party libraries speak only when something is wrong
    root.setLevel(max(level, logging.WARNING))


class _OneLineBadRequests(logging.Filter):
    """aiohttp logs every request its parser refuses (a 400) as an error with a traceback: a
    few kilobytes that any connected peer can make the gateway write per request. The
    refusal itself is expected; this keeps it as one warning line naming the parse error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())[:200]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {reason}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_BAD_REQUESTS = _OneLineBadRequests()


def quiet_bad_requests() -> None:
    """Log aiohttp's refusals of unparseable requests as one line (idempotent)."""
    server = logging.getLogger("aiohttp.server")
    if _BAD_REQUESTS not in server.filters:
        server.addFilter(_BAD_REQUESTS)
