"""Logging for every entry point (serve, sandbox, demo, CLI): one configuration, no leaks.

structlog renders JSON lines when stderr is not a terminal and readable lines when it is;
stdlib loggers (aiohttp, asyncpg ...) go through the same processors. Before rendering, every
event is scrubbed: fields named like secrets or bodies are replaced, values that look like a
JWS/JWT, a PEM block, a bearer token, a URL's user and password or a ``password=`` parameter
are replaced wherever they appear, control and bidi characters are escaped and long fields
truncated (T79), so a partner-controlled value can neither forge log lines nor flood them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from types import TracebackType
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
    # compact JWS/JWT (also detached, with an empty payload), from where a token can start:
    # tried inside a run of base64url characters, each "eyJ" of the run would rescan the rest
    # of it (100 KB of "eyJ" took seconds)
    # (or after a %-escape: a token in URL-encoded text, access_token%3DeyJ...)
    r"(?:(?<![A-Za-z0-9_-])|(?<=%[0-9A-Fa-f]{2}))"
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{16,}"
    # PEM blocks, complete or cut
    r"|-----BEGIN [A-Z ]+-----[^-]*(?:-----END [A-Z ]+-----)?"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"
)
#: a password as a URL query parameter (libpq takes ?password= and &sslpassword=), as a
#: keyword/value pair (libpq allows spaces around "=") or as a JSON or YAML member, quoted or
#: not; group 1, the name and its "=" or ":", is kept. A raw "&" ends an unquoted one (libpq
#: too). Linear: only a "password" starts a match, and its spaces run to the next non-space.
_PASSWORD_VALUES = re.compile(
    r"""((?i:password)["']?[ \t]*[=:][ \t]*)"""
    r"""(?:'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s&]+)"""
)
_WHITESPACE = re.compile(r"\s")
#: C0/C1 controls, DEL, and bidi/format characters that can reorder what a reader sees
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _without_userinfo(text: str) -> str:
    """``text`` with the user and password of each ``scheme://user:password@host`` in it
    replaced, wherever the URL stands and whatever the password holds.

    A mistyped URL's password may hold "/", "?", "#", "@", a quote or a bracket, so its
    userinfo runs to the last "@" before the next whitespace (not to the first "/", nor to a
    closing quote): a later "@" in the same run (in a path, or in a neighbour glued on without
    a space) hides more than the password, never less. Without a ":" there is no password
    (``amqp://guest@mq/``): the user name is kept, it says which account was refused.
    Linear time: each run is searched once, however many "://" and "@" the text holds (T79)."""
    start = text.find("://")
    if start < 0:
        return text
    parts: list[str] = []
    done = 0
    while start >= 0:
        userinfo = start + 3
        space = _WHITESPACE.search(text, userinfo)
        end = space.start() if space else len(text)
        at = text.rfind("@", userinfo, end)
        if at >= 0 and text.find(":", userinfo, at) >= 0:
            parts += (text[done:userinfo], REDACTED)
            done = at
        start = text.find("://", end)
    return "".join(parts) + text[done:]


def _keep_password_name(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def scrub_text(text: str, *, limit: int = MAX_FIELD) -> str:
    """Secrets replaced, control characters escaped, cut to ``limit`` characters."""
    clean = _SECRET_VALUES.sub(REDACTED, _without_userinfo(text))
    clean = _UNSAFE.sub(_escape, _PASSWORD_VALUES.sub(_keep_password_name, clean))
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


#: a traceback logged in full is not logged again in full for this long (per event and place)
REPEAT_WINDOW_S = 60.0
#: distinct tracebacks remembered (the oldest is forgotten first)
REPEAT_KEYS = 256

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info_of(value: Any) -> _ExcInfo | None:
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value
    if value:
        found = sys.exc_info()
        return None if found[1] is None else found
    return None


class RepeatedTracebacks:
    """structlog processor: a traceback is logged in full once per ``window_s`` for the same
    event raised from the same place (exception type and every frame's file and line); the
    repeats in between are one line: the exception's type and message, where it was raised,
    and when the full traceback was logged. The next full one says how many it stood for.

    A bug that one input triggers on every delivery (a poison message tried up to the
    delivery limit, a storm of them) would otherwise write kilobytes of the same trace per
    attempt, and rendering them cost more than the attempt's own work (T53, T79)."""

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        *,
        max_keys: int = REPEAT_KEYS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._max_keys = max_keys
        self._monotonic = monotonic
        #: key -> [monotonic time of the full traceback, wall time of it, repeats since]
        self._seen: OrderedDict[tuple[object, ...], list[Any]] = OrderedDict()
        self._lock = threading.Lock()  # stdlib loggers may log from other threads

    def __call__(
        self, logger: object, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if "exc_info" not in event:
            return event
        exc_info = _exc_info_of(event["exc_info"])
        if exc_info is None:
            return event
        exc_type, exc, tb = exc_info
        # walked, not extracted: extracting reads every frame's source line
        frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(tb)]
        key = (str(event.get("event")), exc_type, tuple(frames))
        now = self._monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or now - seen[0] >= self._window_s:
                repeats = seen[2] if seen is not None else 0
                self._seen[key] = [now, time.time(), 0]
                self._seen.move_to_end(key)
                while len(self._seen) > self._max_keys:
                    self._seen.popitem(last=False)
                if repeats:
                    event["repeats_since_last_traceback"] = repeats
                return event
            seen[2] += 1
            logged_at = seen[1]
        del event["exc_info"]
        place = "{}:{}".format(*frames[-1]) if frames else "unknown"
        text = "".join(traceback.format_exception_only(exc_type, exc)).strip()
        event["exception"] = (
            f"{text} (raised at {place}; the same traceback was logged in full at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(logged_at))})"
        )
        return event


_REPEATED_TRACEBACKS = RepeatedTracebacks()


def _shared_processors() -> list[structlog.typing.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _REPEATED_TRACEBACKS,
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


def _stderr_logger(*args: Any) -> structlog.WriteLogger:
    return structlog.WriteLogger(sys.stderr)


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
        # WriteLogger: a line and its newline in one write (PrintLogger's print makes two, and
        # a line written between them, by another thread or process, joins the two lines)
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr) if cache else _stderr_logger,
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
    for name in _RECONNECT_LOGGERS:
        library = logging.getLogger(name)
        if _RECONNECT_NOISE not in library.filters:
            library.addFilter(_RECONNECT_NOISE)


#: the RabbitMQ client's loggers that report a lost connection and its reconnects as errors
_RECONNECT_LOGGERS = ("aiormq.connection", "aio_pika.tools")


class _ReconnectNoise(logging.Filter):
    """A lost RabbitMQ connection and each failed reconnect attempt are expected and heal by
    themselves; the gateway reports them as ``amqp_connection_lost`` (warning, with the
    reason) and ``amqp_reconnected``. aiormq and aio-pika log the same events as errors, 5 to
    7 lines per reconnect and one a second while the broker stays away, which would page any
    "errors > 0" alert: the broker's own close (its reply code and text) is kept as a
    warning; a failed reconnect attempt, and the robust channels' close callbacks failing on
    the dead connection, are dropped. Any other error of these loggers passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        template = str(record.msg)
        if template.startswith("Unexpected connection close from remote"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if template.startswith("error when creating transport"):
            return False
        return not (
            template.startswith("Callback %r error")
            and bool(record.args)
            and "RobustChannel._on_close" in repr(_first(record.args))
        )


def _first(args: Any) -> Any:
    return args[0] if isinstance(args, tuple) and args else None


_RECONNECT_NOISE = _ReconnectNoise()


class _OneLineBadRequests(logging.Filter):
    """aiohttp logs every request its parser refuses (a 400) as an error with a traceback: a
    few kilobytes that any connected peer can make the gateway write per request. The
    refusal itself is expected; this keeps it as one warning line naming the parse error,
    and at most one line per ``window_s`` for each kind of parse error (a flood of bad
    requests is not a flood of log lines). The next line logged for that kind says how many
    went unlogged since the last one (``unlogged_since``)."""

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        max_kinds: int = 64,
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._monotonic = monotonic
        self._max_kinds = max_kinds
        self._lock = threading.Lock()
        #: kind -> [monotonic time of the last line logged, refusals unlogged since]
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        kind = type(exc).__name__
        now = self._monotonic()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self._window_s:
                seen[1] += 1
                return False
            unlogged = int(seen[1]) if seen is not None else 0
            self._seen[kind] = [now, 0]
            self._seen.move_to_end(kind)
            while len(self._seen) > self._max_kinds:
                self._seen.popitem(last=False)
        reason = " ".join(str(exc.message).split())[:200]
        record.msg = f"{record.getMessage()}: {kind}: {reason}"
        if unlogged:
            record.msg += f" (unlogged_since={unlogged})"
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
