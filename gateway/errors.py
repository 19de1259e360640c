"""One error root for everything a partner or internal system can be refused for.

Each subclass carries a PROTOCOL.md section 4 NACK code and its HTTP status.
``detail`` is what the partner is told (minimal); ``reason`` is the exact cause,
kept for the audit log and the operator, never sent on the wire.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class NackCode(StrEnum):
    MALFORMED = "MALFORMED"
    SCHEMA_INVALID = "SCHEMA_INVALID"
    UNSUPPORTED_TYPE = "UNSUPPORTED_TYPE"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    SENDER_MISMATCH = "SENDER_MISMATCH"
    NOT_AUTHORIZED = "NOT_AUTHORIZED"
    DUPLICATE_CONFLICT = "DUPLICATE_CONFLICT"
    TOO_LARGE = "TOO_LARGE"
    STALE = "STALE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"


HTTP_STATUS: dict[NackCode, int] = {
    NackCode.MALFORMED: 400,
    NackCode.SCHEMA_INVALID: 400,
    NackCode.UNSUPPORTED_TYPE: 400,
    NackCode.SIGNATURE_INVALID: 401,
    NackCode.UNKNOWN_KEY: 401,
    NackCode.SENDER_MISMATCH: 403,
    NackCode.NOT_AUTHORIZED: 403,
    NackCode.DUPLICATE_CONFLICT: 409,
    NackCode.TOO_LARGE: 413,
    NackCode.STALE: 422,
    NackCode.RATE_LIMITED: 429,
    NackCode.UNAVAILABLE: 503,
}

_DEFAULT_DETAIL: dict[NackCode, str] = {
    NackCode.MALFORMED: "message is not a well-formed envelope",
    NackCode.SCHEMA_INVALID: "payload does not satisfy its schema",
    NackCode.UNSUPPORTED_TYPE: "unknown message_type or schema_version",
    NackCode.SIGNATURE_INVALID: "signature missing or invalid",
    NackCode.UNKNOWN_KEY: "signing key not configured for the sender or not valid",
    NackCode.SENDER_MISMATCH: "sender identity does not match",
    NackCode.NOT_AUTHORIZED: "sender may not send this message type",
    NackCode.DUPLICATE_CONFLICT: "message_id already used with different content",
    NackCode.TOO_LARGE: "message exceeds the size limit",
    NackCode.STALE: "message is outside the replay window or expired",
    NackCode.RATE_LIMITED: "rate limit exceeded",
    NackCode.UNAVAILABLE: "the gateway cannot store the message now; retry",
}


class GatewayError(Exception):
    """Root of every refusal. ``code`` and ``http_status`` come from the subclass."""

    code: ClassVar[NackCode]
    #: seconds for the ``Retry-After`` of the answer, where trying again later can succeed
    retry_after_s: int | None = None

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail if detail is not None else _DEFAULT_DETAIL[self.code]

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, reason={self.reason!r})"


class Malformed(GatewayError):
    code = NackCode.MALFORMED


class SchemaInvalid(GatewayError):
    """``pointer`` is an RFC 6901 pointer into the payload (``""``: the payload itself); the
    detail names it in the document the sender wrote, where the payload is ``/payload``
    (a partner's envelope, an internal API submission)."""

    code = NackCode.SCHEMA_INVALID

    def __init__(self, reason: str, *, pointer: str, detail: str | None = None) -> None:
        super().__init__(
            reason, detail=detail if detail is not None else f"schema error at /payload{pointer}"
        )
        self.pointer = pointer


class UnsupportedType(GatewayError):
    code = NackCode.UNSUPPORTED_TYPE


class SignatureInvalid(GatewayError):
    code = NackCode.SIGNATURE_INVALID


class UnknownKey(GatewayError):
    code = NackCode.UNKNOWN_KEY


class SenderMismatch(GatewayError):
    code = NackCode.SENDER_MISMATCH


class NotAuthorized(GatewayError):
    code = NackCode.NOT_AUTHORIZED


class DuplicateConflict(GatewayError):
    code = NackCode.DUPLICATE_CONFLICT


class IdempotencyKeyReused(DuplicateConflict):
    """An internal submitter reused an Idempotency-Key for a different request.

    Not a partner refusal: 422, as draft-ietf-httpapi-idempotency-key-header asks, with the
    DUPLICATE_CONFLICT code (the nearest PROTOCOL.md code: same id, different content).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, detail="Idempotency-Key was already used for a different request")

    @property
    def http_status(self) -> int:
        return 422


class TooLarge(GatewayError):
    code = NackCode.TOO_LARGE


class Stale(GatewayError):
    code = NackCode.STALE


class RateLimited(GatewayError):
    code = NackCode.RATE_LIMITED

    def __init__(self, reason: str, *, retry_after_s: int, detail: str | None = None) -> None:
        super().__init__(reason, detail=detail)
        self.retry_after_s = retry_after_s


class Unavailable(GatewayError):
    code = NackCode.UNAVAILABLE
    # a store or broker outage is usually over in seconds; a client that waits this long
    # before trying again does not add to the load of one that is recovering
    retry_after_s = 5

    def __init__(self, reason: str, *, detail: str | None = None, outage: bool = False) -> None:
        super().__init__(reason, detail=detail)
        #: the cause fails every request alike until it is mended (a full disk, an I/O error,
        #: a lost or closed store), rather than something in this request: a transport holds
        #: the request and tries again instead of counting it as a failure of its own
        self.outage = outage


ERROR_FOR_CODE: dict[NackCode, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        Malformed,
        SchemaInvalid,
        UnsupportedType,
        SignatureInvalid,
        UnknownKey,
        SenderMismatch,
        NotAuthorized,
        DuplicateConflict,
        TooLarge,
        Stale,
        RateLimited,
        Unavailable,
    )
}


class ConfigError(Exception):
    """An operator's configuration is wrong: names the file, the key and the reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason
