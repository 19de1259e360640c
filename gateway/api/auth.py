"""JWT bearer authentication and scope checks for the internal API.

Tokens are verified by ``gateway.crypto.tokens.verify_token``: an asymmetric algorithm
allow-list, the key chosen by exact ``kid`` from configuration, issuer, audience, exp, nbf
and iat checked against the injected clock. 401 says the token is not acceptable and why;
403 says which scope the route needs. Both bodies are RFC 9457 problem documents with an
RFC 6750 ``WWW-Authenticate`` header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.api.problems import problem
from gateway.clock import Clock
from gateway.config import ApiAuthConfig
from gateway.crypto.keys import (
    KeyRing,
    VerificationKey,
    alg_for_key,
    jwk_thumbprint,
    read_public_key,
)
from gateway.crypto.tokens import TokenClaims, TokenInvalid, verify_token
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.model import Direction
from gateway.transports.tls_accept import RefusalWindow

SCOPE_SEND = "c2c:send"
SCOPE_QUERY = "c2c:query"
#: reading what partners sent (inbound messages and their documents): enforcement data of
#: every partner, so not part of sending or querying
SCOPE_RECEIVE = "c2c:receive"
SCOPE_AUDIT = "audit:read"
SCOPE_ADMIN = "admin"
ALL_SCOPES = (SCOPE_SEND, SCOPE_QUERY, SCOPE_RECEIVE, SCOPE_AUDIT, SCOPE_ADMIN)
#: who may read the messages of each direction: ours (their state, attempts and receipts) to
#: whoever sends or queries, what partners sent to c2c:receive
READERS: Mapping[Direction, frozenset[str]] = {
    Direction.OUTBOUND: frozenset({SCOPE_SEND, SCOPE_QUERY, SCOPE_ADMIN}),
    Direction.INBOUND: frozenset({SCOPE_RECEIVE, SCOPE_ADMIN}),
}
#: who may read messages of one direction or the other
ANY_READER: frozenset[str] = frozenset().union(*READERS.values())
#: the party name token keys are filed under in their key ring
KEY_OWNER = "internal-api"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLAIMS_KEY = web.RequestKey("c2c_claims", TokenClaims)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class Access:
    """Who may call a route: ``public`` routes need no token; ``any_scope`` ones any valid
    token, whatever its scopes; else a token with any one of ``scopes``."""

    scopes: frozenset[str] = frozenset()
    public: bool = False
    any_scope: bool = False


def load_token_keys(auth: ApiAuthConfig, *, source: str) -> KeyRing:
    """The verification keys for API tokens; each must use an allowed algorithm."""
    keys = []
    for index, path in enumerate(auth.public_keys):
        public = read_public_key(path)
        alg = alg_for_key(public)
        if alg not in auth.algorithms:
            raise ConfigError(
                source,
                f"api_auth.public_keys[{index}]",
                f"{path.name} is an {alg} key but api_auth.algorithms allows only"
                f" {', '.join(auth.algorithms)}",
            )
        keys.append(
            VerificationKey(party=KEY_OWNER, kid=jwk_thumbprint(public), alg=alg, public_key=public)
        )
    return KeyRing(keys)


def _unauthorized(reason: str) -> web.Response:
    description = reason.replace('"', "'")[:200]
    return problem(
        401,
        reason,
        headers={
            "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'
        },
    )


def forbidden(needed: Collection[str], *, what: str = "this operation") -> web.Response:
    """403 naming the scopes ``what`` needs (RFC 6750 ``insufficient_scope``)."""
    names = " ".join(sorted(needed))
    detail = (
        f"{what} needs the scope {names}"
        if len(needed) == 1
        else f"{what} needs one of the scopes {names}"
    )
    return problem(
        403,
        detail,
        headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{names}"'},
    )


def claims_of(request: web.Request) -> TokenClaims:
    return request[CLAIMS_KEY]


def _kind(reason: str) -> str:
    """The ``c2c_api_auth_refused_total`` reason of a refused token's exact reason."""
    if reason.startswith("token expired"):
        return "expired"
    if reason.startswith(("token not valid before", "token issued in the future")):
        return "not_yet_valid"
    return "invalid"


def bearer_middleware(
    *,
    auth: ApiAuthConfig,
    keys: KeyRing,
    clock: Clock,
    access_for: Callable[[web.Request], Access | None],
    metrics: Metrics | None = None,
) -> Middleware:
    """Authenticate every routed request; ``access_for`` gives the route's rule.

    Every refusal is counted (``c2c_api_auth_refused_total{reason}``) and logged
    (``api_auth_refused``: the first per client address and reason in a minute, so a client
    guessing tokens is not a flood of log lines): a CBP system whose token expired shows on
    the gateway's side too, not only in its own errors."""
    logged = RefusalWindow()

    def refused(
        request: web.Request, kind: str, reason: str, response: web.Response
    ) -> web.Response:
        if metrics is not None:
            metrics.api_auth_refused.labels(kind).inc()
        source = request.remote or "unknown"
        unlogged = logged.admit((source, kind), clock.monotonic())
        if unlogged is not None:
            log.warning(
                "api_auth_refused",
                peer=source,
                path=request.path[:200],
                status=response.status,
                reason=reason,
                unlogged_since=unlogged,
            )
        return response

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        access = access_for(request)
        if access is None or access.public:
            # Unrouted requests fall through to aiohttp's own 404/405.
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            reason = "missing Authorization header (expected: Bearer <JWT>)"
            return refused(request, "missing", reason, _unauthorized(reason))
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            reason = "Authorization header must be 'Bearer <JWT>'"
            return refused(request, "malformed", reason, _unauthorized(reason))
        try:
            claims = verify_token(
                token.strip(),
                keys=keys,
                issuer=auth.issuer,
                audience=auth.audience,
                algorithms=auth.algorithms,
                now=clock.now(),
                leeway_s=auth.leeway_s,
            )
        except TokenInvalid as exc:
            return refused(request, _kind(exc.reason), exc.reason, _unauthorized(exc.reason))
        if not access.any_scope and not (claims.scopes & access.scopes):
            reason = f"{claims.subject} lacks the scope {' or '.join(sorted(access.scopes))}"
            return refused(request, "scope", reason, forbidden(access.scopes))
        request[CLAIMS_KEY] = claims
        return await handler(request)

    return middleware


def readable(request: web.Request) -> frozenset[Direction]:
    """The directions whose messages the request's token may read (``READERS``)."""
    scopes = claims_of(request).scopes
    return frozenset(direction for direction, readers in READERS.items() if scopes & readers)
