"""The auditors' web page: static files served by the internal API, beside the auditor API.

The page holds no data and needs no token to load: it calls the auditor API with the bearer
token the auditor enters, and checks hashes, proofs and checkpoint signatures in the browser
(``console/verify.js``). The files are a fixed set read from the package once; the headers
keep the page to its own origin (Content-Security-Policy without inline script or style) and
out of frames and caches of other sites.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

from gateway.api.problems import problem

PREFIX = "/console/"
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "client.js": "text/javascript; charset=utf-8",
    "verify.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
#: the files under PREFIX besides the page itself
ASSETS = tuple(name for name in _TYPES if name != "index.html")
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    return resources.files("gateway.api").joinpath("console", name).read_bytes()


def _file(name: str) -> web.Response:
    return web.Response(body=asset(name), headers={"Content-Type": _TYPES[name], **HEADERS})


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect(PREFIX)


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        return problem(404, f"the console has no file {name[:80]!r}")
    return _file(name)
