"""Fixtures for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands run in-process (CliRunner) configure structlog globally, e.g. filtering
    below WARNING; later tests that capture log events must not inherit that."""
    yield
    structlog.reset_defaults()
