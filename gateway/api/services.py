"""What the internal API's handlers use, held in the app under one typed key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.crypto.keys import KeyRing, SigningKey
from gateway.metrics import Metrics
from gateway.outbound.submission import SubmissionServices
from gateway.schemas.registry import SchemaRegistry
from gateway.store.base import Store


@dataclass(frozen=True, kw_only=True)
class ApiServices:
    config: GatewayConfig
    store: Store
    registry: SchemaRegistry
    signing_keys: Sequence[SigningKey]
    token_keys: KeyRing
    clock: Clock
    metrics: Metrics | None = None
    #: tells the dispatcher a message is waiting (submitted or retried)
    wake_dispatcher: Callable[[], None] | None = None
    #: raises ``Unavailable`` when the broker is configured and unreachable
    broker_ping: Callable[[], Awaitable[None]] | None = None
    #: how often a waiting query looks for its answer
    query_poll_s: float = 0.1

    def submission(self) -> SubmissionServices:
        return SubmissionServices(
            config=self.config,
            registry=self.registry,
            signing_keys=self.signing_keys,
            store=self.store,
            clock=self.clock,
        )

    def wake(self) -> None:
        if self.wake_dispatcher is not None:
            self.wake_dispatcher()


SERVICES = web.AppKey("c2c_api_services", ApiServices)
