"""Health checks a bench host runs by itself (``hil lab agent`` / ``hil lab host`` with
``--health-check COMMAND``): every rig of the host that is *unknown* and idle (new, after an
infrastructure error or a failed cleaning, or due for its periodic check) gets its check, as
``hil lab check`` runs it, before it takes another job. Periodic: a good rig is due again after
``every_jobs`` jobs or ``every_hours`` hours since its last check (from the job records); it
is then made *unknown*, so the scheduler gives it no job until the check passed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from hil.cache import runtime_dir
from hil.errors import InfraError
from hil.lab import db
from hil.lab.health import set_health

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """The host's checks: the command (run with ``HIL_RIG``), how often a good rig is checked
    again (None: only when unknown), and the check's deadline."""

    argv: tuple[str, ...]
    every_jobs: int | None = None
    every_hours: float | None = None
    timeout: float = 3600.0


def mark_due(conn: db.Connection, host: str, policy: Policy) -> list[str]:
    """Make the host's idle good rigs that are due for their periodic check *unknown*; returns
    them. The rig's row is locked, so no lease is granted on it meanwhile."""
    if policy.every_jobs is None and policy.every_hours is None:
        return []
    due: list[str] = []
    with conn.transaction():
        rows = conn.execute("""
            SELECT r.name,
                   (SELECT count(*) FROM jobs j WHERE j.rig = r.name AND j.purpose = 'job'
                      AND j.id > coalesce(c.id, 0)) AS jobs,
                   extract(epoch FROM now() - coalesce(c.ended_at, r.registered_at)) / 3600
                     AS hours
            FROM rigs r LEFT JOIN LATERAL (
                SELECT id, ended_at FROM jobs WHERE rig = r.name AND purpose = 'health'
                ORDER BY id DESC LIMIT 1) c ON true
            WHERE r.host = %s AND r.health = 'good' AND r.state = 'idle'
            FOR UPDATE OF r SKIP LOCKED""", (host,)).fetchall()
        for r in rows:
            jobs, hours = int(r["jobs"]), float(r["hours"])
            if policy.every_jobs is not None and jobs >= policy.every_jobs:
                why = f"{jobs} jobs since the last check (every {policy.every_jobs})"
            elif policy.every_hours is not None and hours >= policy.every_hours:
                why = f"{hours:.1f} h since the last check (every {policy.every_hours:g} h)"
            else:
                continue
            set_health(conn, str(r["name"]), "unknown", f"periodic health check due: {why}")
            due.append(str(r["name"]))
    return due


class Checker:
    """Runs the checks of one bench host's rigs, one thread per rig being checked; called at
    every pass of the host's loop."""

    def __init__(self, dsn: str, host: str, policy: Policy) -> None:
        self.dsn, self.host, self.policy = dsn, host, policy
        self.running: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()

    def __call__(self, conn: db.Connection | None) -> None:
        if conn is None or self.stopping.is_set():
            return
        for rig in mark_due(conn, self.host, self.policy):
            log.info("%s: its periodic health check is due", rig)
        rows = conn.execute("SELECT name FROM rigs WHERE host = %s AND health = 'unknown' "
                            "AND state = 'idle' ORDER BY name", (self.host,)).fetchall()
        conn.commit()
        for name in (str(r["name"]) for r in rows):
            if name in self.running and self.running[name].is_alive():
                continue
            thread = threading.Thread(target=self._check, args=(name,), daemon=True,
                                      name=f"health check {name}")
            self.running[name] = thread
            thread.start()

    def _check(self, rig: str) -> None:
        from hil.lab.pool import health_check

        # the check is a session of its own: its files and rig locks apart from the host's
        # (whose lock on the rig stays held while it serves it)
        own = runtime_dir("lab", "checks", rig)
        env = {"HIL_RUNTIME_DIR": str(own), "HIL_LOCK_DIR": str(own / "locks")}
        log.info("%s: health check: %s", rig, " ".join(self.policy.argv))
        try:
            passed = health_check(self.dsn, rig, self.policy.argv, wait=30.0,
                                  timeout=self.policy.timeout, env=env, stop=self.stopping)
        except InfraError as exc:  # taken meanwhile, or the lab unreachable: the next pass
            log.warning("%s: health check not run: %s", rig, exc)
            return
        log.info("%s: health check %s", rig, {True: "passed: good", False: "failed: bad",
                                              None: "stopped: still unknown"}[passed])

    def stop(self, *, cancel: bool = True) -> None:
        """Wait for the running checks; ``cancel``: stop them first (their rigs stay
        unknown)."""
        if cancel:
            self.stopping.set()
        for thread in self.running.values():
            thread.join(60.0 if cancel else self.policy.timeout + 60.0)


def policy_from(argv: Sequence[str] | None, every_jobs: int | None,
                every_hours: float | None) -> Policy | None:
    return Policy(tuple(argv), every_jobs, every_hours) if argv else None
