"""Startup self-test (RELIABILITY-SECURITY.md T80(b), section 1.1): refuse to serve on a
runtime or configuration known to be unsafe.

Checked before anything listens: the installed aiohttp, PyJWT and cryptography are at or above
the floors of the advisories the gateway relies on being fixed; aiohttp's C HTTP parser is
loaded (several request-smuggling bugs hit only the pure-Python one); and no algorithm
allow-list, the built-in one or the configuration's, names anything but EdDSA or ES256 (an HS*
entry reopens the public-key-as-HMAC-secret class). ``serve`` and ``sandbox`` run it and exit 2
with every problem listed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata

from aiohttp import http
from aiohttp.http_parser import HttpRequestParserPy

from gateway.config import GatewayConfig
from gateway.crypto.keys import ALGORITHMS

#: Minimum safe versions (distribution name -> release), from section 1.1 of the research.
FLOORS: Mapping[str, tuple[int, ...]] = {
    "aiohttp": (3, 14, 3),
    "PyJWT": (2, 13, 0),
    "cryptography": (48, 0, 1),
}
#: The only signature algorithms PROTOCOL.md section 3 allows.
ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256"})

_RELEASE = re.compile(r"(\d+(?:\.\d+)*)(.*)")


class SelfCheckError(Exception):
    """The runtime or configuration failed the self-test; ``problems`` lists every failure."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            "startup self-test failed: " + "; ".join(self.problems) if self.problems else ""
        )


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """What the self-test looks at; ``current()`` reads it from this process."""

    versions: Mapping[str, str | None]
    c_parser_loaded: bool
    no_extensions_env: bool

    @classmethod
    def current(cls) -> Runtime:
        return cls(
            versions={name: _installed(name) for name in FLOORS},
            c_parser_loaded=http.HttpRequestParser is not HttpRequestParserPy,
            no_extensions_env=bool(os.environ.get("AIOHTTP_NO_EXTENSIONS")),
        )


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _floor_text(floor: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in floor)


def below_floor(version: str, floor: tuple[int, ...]) -> bool:
    """True when ``version`` is older than ``floor``; a pre-release of the floor itself
    (``3.14.3rc1``) is older, an unparseable version counts as older (fail closed)."""
    match = _RELEASE.fullmatch(version.strip())
    if match is None:
        return True
    release = tuple(int(part) for part in match.group(1).split("."))
    width = max(len(release), len(floor))
    padded = release + (0,) * (width - len(release))
    wanted = floor + (0,) * (width - len(floor))
    if padded != wanted:
        return padded < wanted
    suffix = match.group(2).lower().lstrip(".-_")
    return suffix.startswith(("a", "b", "c", "rc", "pre", "preview", "dev"))


def runtime_problems(runtime: Runtime) -> list[str]:
    problems: list[str] = []
    for name, floor in FLOORS.items():
        version = runtime.versions.get(name)
        if version is None:
            problems.append(f"{name} is not installed (need >= {_floor_text(floor)})")
        elif below_floor(version, floor):
            problems.append(
                f"{name} {version} is below the safe floor {_floor_text(floor)}: upgrade it"
            )
    if runtime.no_extensions_env:
        problems.append("AIOHTTP_NO_EXTENSIONS is set: unset it, the C HTTP parser is required")
    elif not runtime.c_parser_loaded:
        problems.append(
            "aiohttp's C HTTP parser is not loaded (no compiled extension for this platform):"
            " install an aiohttp wheel with its C extensions"
        )
    return problems


def _bad_algorithms(where: str, algorithms: Iterable[str]) -> list[str]:
    return [
        f"{where} allows {alg!r}: only EdDSA and ES256 may appear"
        for alg in algorithms
        if alg not in ALLOWED_ALGORITHMS
    ]


def config_problems(config: GatewayConfig) -> list[str]:
    """Every algorithm allow-list: built in, the internal API's, our keys' and partners'."""
    source = str(config.source)
    problems = _bad_algorithms("the built-in JWS allow-list", ALGORITHMS)
    problems += _bad_algorithms(f"{source}: api_auth.algorithms", config.api_auth.algorithms)
    for index, key in enumerate(config.signing_keys):
        problems += _bad_algorithms(f"{source}: signing_keys[{index}].alg", [key.alg])
    for partner in config.partners.values():
        partner_file = str(partner.directory / "partner.toml")
        for index, key in enumerate(partner.keys):
            problems += _bad_algorithms(f"{partner_file}: keys[{index}].alg", [key.alg])
    return problems


def run_selfcheck(
    config: GatewayConfig | None = None,
    *,
    runtime: Callable[[], Runtime] = Runtime.current,
) -> None:
    """Raise ``SelfCheckError`` listing every problem; return quietly when there is none."""
    problems = runtime_problems(runtime())
    if config is not None:
        problems += config_problems(config)
    if problems:
        raise SelfCheckError(problems)
