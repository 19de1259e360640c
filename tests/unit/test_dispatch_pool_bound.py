"""The HTTPS client's pool takes as many connections per partner as the dispatcher has
attempts in flight, so no send waits for a connection of ours inside its deadline."""

from __future__ import annotations

import inspect

from gateway.outbound.dispatcher import MAX_IN_FLIGHT, Dispatcher
from gateway.transports.https_client import CONNECTIONS_PER_PARTNER, HttpsTransport


def test_the_https_pool_is_at_least_the_dispatchers_in_flight_bound() -> None:
    batch = inspect.signature(Dispatcher).parameters["batch_size"].default
    pool = inspect.signature(HttpsTransport).parameters["limit_per_host"].default
    assert batch == MAX_IN_FLIGHT
    assert pool == CONNECTIONS_PER_PARTNER
    assert pool >= batch
