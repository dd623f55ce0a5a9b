"""Rigs and bench hosts put straight into a test's lab database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hil.lab import leases
from hil.lab.db import Connection
from hil.lab.health import heartbeat
from hil.lab.host import serve


def add_rigs(conn: Connection, names: list[str], *, host: str = "bench1",
             device_type: str = "raspberrypi3", labels: tuple[str, ...] = (),
             health: str = "good", host_timeout: float = 60.0) -> None:
    heartbeat(conn, host, host_timeout)
    with conn.transaction():
        for name in names:
            conn.execute("INSERT INTO rigs (name, device_type, labels, host, health, config) "
                         "VALUES (%s, %s, %s, %s, %s, '')",
                         (name, device_type, list(labels), host, health))


def rig_row(conn: Connection, name: str) -> dict[str, object]:
    row = conn.execute("SELECT * FROM rigs WHERE name = %s", (name,)).fetchone()
    conn.commit()
    assert row is not None
    return row


def done(lease: leases.Lease, conn: Connection, outcome: str = "passed") -> None:
    """The holder's whole exit: release, then its own cleaning (nothing to power off here)."""
    lease.release(outcome)
    for g in lease.grants:
        leases.clean(conn, g, lambda g: None)


@contextmanager
def bench_host(dsn: str, host: str, cleaned: list[leases.Grant],
               interval: float = 0.5) -> Iterator[None]:
    """The bench host's loop in a thread, recording what it cleaned."""
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(dsn, host, cleaned.append),
                              kwargs={"interval": interval, "stop": stop}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
