"""URLs naming a server (the PostgreSQL store, the RabbitMQ broker), split and checked once.

The configuration is read with these checks, so a malformed URL is an operator's error with a
reason, not a driver's traceback at the first connect (or, worse, a connection to somewhere
the operator did not mean).

A reason never repeats the URL or any piece of it: these URLs may hold a password, and a
mistyped one (``user:pa/ss@host``) puts pieces of the password where the host or port go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MAX_PORT = 65_535


class UrlInvalid(ValueError):
    """A URL is refused; ``reason`` says why without repeating it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class ServerAddress:
    host: str
    #: None: the scheme's default port
    port: int | None


@dataclass(frozen=True, kw_only=True)
class ServerUrl:
    parts: SplitResult
    #: empty when the URL names no host (the caller decides whether one is required)
    addresses: tuple[ServerAddress, ...]


_BRACKETS = "not a valid URL: '[' and ']' must enclose an IPv6 address, e.g. [::1]"
_PORT = f"not a valid URL: the port must be a number from 1 to {MAX_PORT}"
NO_HOST = "not a valid URL: it names no host"


def port_number(text: str) -> int:
    """A port written in a URL; ``UrlInvalid`` unless it is a number from 1 to 65535."""
    # isdecimal() alone would take other scripts' digits, which drivers do not; the length
    # check keeps int() from refusing a thousand digits with an error of its own
    if not (text.isascii() and text.isdecimal() and len(text) <= 5) or not (
        1 <= int(text) <= MAX_PORT
    ):
        raise UrlInvalid(_PORT)
    return int(text)


def _port(text: str) -> int | None:
    # An empty port (``host:``) is the default one, as RFC 3986 and every driver read it.
    return port_number(text) if text else None


def _address(spec: str) -> ServerAddress:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if spec.startswith("["):
        host, closed, rest = spec[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise UrlInvalid(_BRACKETS)
        try:
            # a zone (fe80::1%25eth0) is not part of the address
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise UrlInvalid(_BRACKETS) from None
        return ServerAddress(host=host, port=_port(rest[1:]))
    if "[" in spec or "]" in spec or spec.count(":") > 1:
        raise UrlInvalid(_BRACKETS)
    host, _, port = spec.partition(":")
    if not host:
        raise UrlInvalid(NO_HOST)
    return ServerAddress(host=host, port=_port(port))


def split_server_url(
    url: str, *, schemes: Collection[str], what: str, several_hosts: bool = False
) -> ServerUrl:
    """Split ``url``; ``UrlInvalid`` unless its scheme is one of ``schemes`` (else the reason
    is ``expected <what>``), every host is well formed with its port from 1 to 65535, and it
    has no fragment. ``several_hosts``: a comma-separated host list (libpq's failover form)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit's own message may quote the host, which may be a piece of the password
        raise UrlInvalid(_BRACKETS if "[" in url or "]" in url else "not a valid URL") from None
    if parts.scheme not in schemes:
        raise UrlInvalid(f"expected {what}")
    if "#" in url:
        raise UrlInvalid("not a valid URL: a server URL has no fragment ('#...')")
    if parts.netloc.count("@") > 1:
        # drivers disagree on which '@' ends the credentials (asyncpg: the first, yarl: the
        # last), so each would connect somewhere else
        raise UrlInvalid("not a valid URL: an '@' in the user or password must be written %40")
    spec = parts.netloc.rpartition("@")[2]
    if not spec:
        return ServerUrl(parts=parts, addresses=())
    specs = spec.split(",") if several_hosts else [spec]
    return ServerUrl(parts=parts, addresses=tuple(_address(item) for item in specs))


#: what is shown of such a URL after its scheme
NOT_SHOWN = "(not shown: an '@' after the host; write '/' and '?' in a password as %2F, %3F)"


def userinfo_past_netloc(parts: SplitResult) -> bool:
    """An '@' after the host part: a password holding an unencoded '/' or '?' ended the
    netloc early (``amqp://gw:12/SECRET?x@host/vh``: "gw" is taken for the host, "12" for the
    port, the rest of the password for the path and query). Nothing of such a URL but its
    scheme may be shown."""
    return "@" in parts.path or "@" in parts.query


__all__ = [
    "MAX_PORT",
    "NOT_SHOWN",
    "NO_HOST",
    "ServerAddress",
    "ServerUrl",
    "UrlInvalid",
    "port_number",
    "split_server_url",
    "userinfo_past_netloc",
]
