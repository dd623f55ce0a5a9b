"""A throwaway PostgreSQL for the lab tests: one server per session (``hil.lab.scratch``: a
temporary directory, loopback, an unprivileged user), a fresh database per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from hil.lab import db, scratch
from hil.lab.db import Connection


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The server's base DSN (database postgres, trust on loopback)."""
    if scratch.binaries() is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres) are not installed")
    with scratch.server() as dsn:
        yield dsn


@pytest.fixture
def lab_dsn(pg_server: str) -> str:
    """A fresh, migrated database of its own for one test."""
    return scratch.database(pg_server, f"lab_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def lab(lab_dsn: str) -> Iterator[Connection]:
    with db.connect(lab_dsn) as conn:
        yield conn
