"""The SchemaInvalid raised by the catalogue: reason and detail name the pointer, stay short."""

from __future__ import annotations

from gateway.errors import SchemaInvalid

REASON_MAX = 200
_POINTER_SHOWN_MAX = 100


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_pointer(path: list[str | int]) -> str:
    """RFC 6901 pointer of an instance location given as its path segments."""
    return "".join("/" + str(seg).replace("~", "~0").replace("/", "~1") for seg in path)


class PayloadInvalid(SchemaInvalid):
    """SchemaInvalid that keeps ``what`` apart, so an embedded payload's error can be rebased."""

    def __init__(self, pointer: str, what: str) -> None:
        reason = clip(f"{clip(pointer or '/', _POINTER_SHOWN_MAX)}: {what}", REASON_MAX)
        # The partner's detail: where, in the document it wrote, and what is wrong there.
        # ``what`` quotes the schema and member names only, never a value (PROTOCOL section 4).
        detail = clip(
            f"schema error at {clip('/payload' + pointer, _POINTER_SHOWN_MAX)}: {what}", REASON_MAX
        )
        super().__init__(reason, pointer=pointer, detail=detail)
        self.what = what

    def rebased(self, prefix: str) -> PayloadInvalid:
        """The same failure seen from a document that embeds this payload at ``prefix``."""
        return PayloadInvalid(prefix + self.pointer, self.what)
