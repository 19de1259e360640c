"""Fixtures for every test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway.crypto.pki import init_dev_pki

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands run in-process (CliRunner) configure structlog globally, e.g. filtering
    below WARNING; later tests that capture log events must not inherit that."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pki_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev PKI for the repository's parties (``certs/dev`` under the returned ``certs``),
    made once: copying it is far cheaper than making keys and certificates per test."""
    root = tmp_path_factory.mktemp("pki")
    init_dev_pki(root / "certs" / "dev", ["US-CBP", "MX-ANAM", "CA-CBSA"])
    return root / "certs"


@pytest.fixture
def tree(tmp_path: Path, pki_template: Path) -> Path:
    """A copy of the repository's gateway.toml and partners/ with a dev PKI beside them, as
    README says they work after ``c2c-gateway pki init``."""
    shutil.copy(REPO / "gateway.toml", tmp_path / "gateway.toml")
    shutil.copytree(REPO / "partners", tmp_path / "partners")
    shutil.copytree(pki_template, tmp_path / "certs")
    return tmp_path
