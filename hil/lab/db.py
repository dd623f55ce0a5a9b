"""Connections to the lab database. Every fault is an ``InfraError`` naming the lab database and
what was expected, within ``connect_timeout``: never a hang, never the DSN's password."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.rows import dict_row

from hil.errors import InfraError

PART = "lab database"
CONNECT_TIMEOUT = 5  # seconds; libpq's own deadline for reaching the server
STATEMENT_TIMEOUT_MS = 10_000  # no statement of ours waits longer on a lock or a slow server
DB_ENV = "HIL_LAB_DB"

_PASSWORD = re.compile(r"(password\s*=\s*)\S+|(://[^:/@\s]+:)[^@\s]+(@)", re.I)

Connection = psycopg.Connection[dict[str, Any]]


def safe_dsn(dsn: str) -> str:
    """The DSN as it may be shown: its password masked."""
    return _PASSWORD.sub(lambda m: (m.group(1) or m.group(2)) + "***" + (m.group(3) or ""), dsn)


def dsn_from(given: str | None) -> str:
    dsn = given or os.environ.get(DB_ENV)
    if not dsn:
        raise InfraError(f"no lab database given: pass --db DSN or set {DB_ENV}", part=PART)
    return dsn


def connect(dsn: str, *, timeout: float = CONNECT_TIMEOUT, autocommit: bool = False) -> Connection:
    try:
        return psycopg.connect(dsn, connect_timeout=max(1, round(timeout)), autocommit=autocommit,
                               row_factory=dict_row,
                               options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
    except psycopg.Error as exc:
        raise InfraError(f"cannot reach {safe_dsn(dsn)} within {timeout:.0f}s (expected a "
                         f"PostgreSQL server accepting connections): "
                         f"{safe_dsn(str(exc)).strip()}", part=PART) from None


def fault(exc: psycopg.Error, doing: str) -> InfraError:
    """A database error met while ``doing`` something, as the infrastructure error it is."""
    return InfraError(f"{doing} failed: {safe_dsn(str(exc)).strip()}", part=PART)
