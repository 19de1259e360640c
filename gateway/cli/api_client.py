"""A small blocking client of a running gateway's internal API, for ``send`` and ``query``.

The standard library's urllib is enough for one request per command and keeps the CLI
free of an event loop. Refusals come back as RFC 9457 problem documents; they are turned
into one exact line for the operator, never a traceback, and never echo the token.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Loopback hosts where plain http is tolerated (a TLS-terminating proxy on the same host).
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
#: NACK codes that say "try again later", not "this request is wrong".
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "RATE_LIMITED"})


class ApiCallError(Exception):
    """The call failed. ``refused`` is True when the gateway refused the request itself
    (a NACK-coded problem: fix the message), False for setup or availability problems."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.message = message
        self.refused = refused


@dataclass(frozen=True, kw_only=True)
class ApiAnswer:
    status: int
    document: Any
    #: names in lower case
    headers: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class ApiClient:
    base_url: str
    token: str
    ca: Path | None = None

    @classmethod
    def create(cls, base_url: str, token_file: Path, ca: Path | None) -> ApiClient:
        """Checks the URL and reads the token; raises ApiCallError (not refused) if unusable."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ApiCallError(f"--api-url: {base_url!r} is not an https:// URL", refused=False)
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ApiCallError(
                f"--api-url: {base_url!r}: a bearer token is only sent over https "
                "(plain http only to a loopback address)",
                refused=False,
            )
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiCallError(
                f"--token: {token_file}: cannot read: {exc}", refused=False
            ) from None
        if not token or any(ch.isspace() for ch in token):
            raise ApiCallError(
                f"--token: {token_file}: expected one JWT on one line", refused=False
            )
        return cls(base_url=base_url.rstrip("/"), token=token, ca=ca)

    def _context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise ApiCallError(f"--ca: {self.ca}: cannot load: {exc}", refused=False) from None

    def post(self, path: str, document: dict[str, Any], *, timeout_s: float) -> tuple[int, Any]:
        """POST JSON; returns (status, JSON answer) for 2xx, raises ApiCallError otherwise."""
        answer = self.post_with_headers(path, document, timeout_s=timeout_s)
        return answer.status, answer.document

    def post_with_headers(
        self,
        path: str,
        document: dict[str, Any],
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> ApiAnswer:
        """POST JSON; the 2xx answer with its headers, raises ApiCallError otherwise."""
        request = urllib.request.Request(  # noqa: S310 -- scheme checked in create()
            self.base_url + path,
            data=json.dumps(document).encode("utf-8"),
            method="POST",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/json, application/problem+json",
                **(headers or {}),
            },
        )
        context = self._context() if self.base_url.startswith("https:") else None
        try:
            with urllib.request.urlopen(  # noqa: S310 -- scheme checked in create()
                request, timeout=timeout_s, context=context
            ) as response:
                return ApiAnswer(
                    status=int(response.status),
                    document=_json(response.read()),
                    headers={k.lower(): v for k, v in response.headers.items()},
                )
        except urllib.error.HTTPError as exc:
            raise _problem_error(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            raise ApiCallError(
                f"{self.base_url}: cannot reach the internal API: {exc.reason}", refused=False
            ) from None
        except TimeoutError:
            raise ApiCallError(
                f"{self.base_url}: no answer within {timeout_s:g} s", refused=False
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiCallError(
                f"{self.base_url}: the connection failed: {exc}", refused=False
            ) from None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ApiCallError(
            "the internal API answered with something not JSON", refused=False
        ) from None


def _problem_error(status: int, body: bytes) -> ApiCallError:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return ApiCallError(f"HTTP {status} without a problem document", refused=False)
    detail = str(document.get("detail") or document.get("title") or "")
    code = document.get("code")
    if not isinstance(code, str):
        return ApiCallError(f"HTTP {status}: {detail}", refused=False)
    if "pointer" in document:
        return ApiCallError(
            f"{code} (pointer {str(document['pointer'])!r}): {detail}", refused=True
        )
    return ApiCallError(f"{code}: {detail}", refused=code not in _TRANSIENT_CODES)
