"""Rig health as LAVA keeps it, and bench-host liveness.

good: takes jobs. unknown: after an infrastructure error (or when new); takes only a health
check, which ends it good or bad. bad: never scheduled. maintenance, retired: set by a person.
A bench host whose heartbeat is older than its timeout takes all its rigs out of scheduling.
"""

from __future__ import annotations

from hil.errors import InfraError
from hil.lab.db import Connection

# which health a lease of each purpose may be granted on
SCHEDULABLE = {"job": ["good"], "health": ["good", "unknown"]}


def set_health(conn: Connection, rig: str, new: str, reason: str) -> str:
    """Set a rig's health, recording the change in its history; returns the old health."""
    row = conn.execute("SELECT health FROM rigs WHERE name = %s FOR UPDATE", (rig,)).fetchone()
    if row is None:
        raise InfraError(f"no rig named {rig!r} is registered", part="lab database", rig=rig)
    old = str(row["health"])
    if old != new:
        conn.execute("UPDATE rigs SET health = %s WHERE name = %s", (new, rig))
        conn.execute("INSERT INTO health_events (rig, old, new, reason) VALUES (%s, %s, %s, %s)",
                     (rig, old, new, reason))
        conn.execute("NOTIFY hil_lab")
    return old


def check_done(conn: Connection, rig: str, passed: bool, detail: str = "") -> None:
    """A health check ended: good if it passed, bad (never scheduled again) if not."""
    with conn.transaction():
        set_health(conn, rig, "good" if passed else "bad",
                   "health check passed" if passed else f"health check failed: {detail}"[:500])


def heartbeat(conn: Connection, host: str, timeout: float = 60.0) -> None:
    """The bench host is alive; its rigs stay schedulable for ``timeout`` seconds more. Waiters
    are woken only when the host comes back (not at every beat: that would wake them all)."""
    with conn.transaction():
        row = conn.execute("SELECT last_seen > now() - timeout AS up FROM bench_hosts "
                           "WHERE name = %s FOR UPDATE", (host,)).fetchone()
        conn.execute("INSERT INTO bench_hosts (name, last_seen, timeout) "
                     "VALUES (%s, now(), make_interval(secs => %s)) ON CONFLICT (name) DO UPDATE "
                     "SET last_seen = now(), timeout = excluded.timeout", (host, timeout))
        if row is None or not row["up"]:
            conn.execute("NOTIFY hil_lab")
