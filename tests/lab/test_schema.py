"""``hil lab init``: creates the schema, again and at once without harm."""

from __future__ import annotations

import threading
import uuid

from hil.lab import db, schema


def test_migrate_is_idempotent_and_concurrent_runs_agree(pg_server: str) -> None:
    name = f"lab_{uuid.uuid4().hex[:12]}"
    with db.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())  # empty: no schema yet
    dsn = pg_server.replace("dbname=postgres", f"dbname={name}")
    results: list[tuple[int, int]] = []

    def init() -> None:
        with db.connect(dsn) as conn:
            results.append(schema.migrate(conn))

    threads = [threading.Thread(target=init) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    latest = len(schema.MIGRATIONS)
    assert sorted(results) == [(0, latest)] + [(latest, latest)] * 3
    with db.connect(dsn) as conn:
        assert schema.migrate(conn) == (latest, latest)
        assert schema.version(conn) == latest
