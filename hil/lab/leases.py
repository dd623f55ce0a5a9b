"""Leases on rigs: granted in one transaction (all or nothing, ``FOR UPDATE SKIP LOCKED``), else
queued FIFO within priority until a deadline; kept alive by renewal, judged by the database's
clock; fenced by a per-rig epoch that grows with every grant; ended by a compare-and-set release.

A rig leaves a lease through *cleaning* (powered off, mux released by its own drivers) before it
is idle again, whether its holder released it or died and let the lease expire (``reap``).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from hil.deadline import Deadline
from hil.errors import ConfigError, InfraError
from hil.lab import db
from hil.lab.db import Connection
from hil.lab.health import SCHEDULABLE, set_health

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
DEFAULT_HARD_CAP = 4 * 3600.0
PART = "lab lease"
OUTCOMES = ("passed", "failed", "infra")


@dataclass(frozen=True)
class Selector:
    """Which rigs a lease may take: ``raspberrypi3,label=a,label=b`` (``device_type=`` may be
    spelled out; ``rig=NAME`` asks for one rig by name)."""

    device_type: str
    labels: tuple[str, ...] = ()
    rig: str | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        device_type, labels, rig = "", [], None
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = item.partition("=")
            if not eq and not device_type:
                device_type = key
            elif key == "device_type" and value:
                device_type = value
            elif key == "label" and value:
                labels.append(value)
            elif key == "rig" and value:
                rig = value
            else:
                raise ConfigError(f"{item!r}: expected DEVICE_TYPE, device_type=, label= or "
                                  "rig=", key="pool")
        if not device_type:
            raise ConfigError(f"{text!r} names no device type", key="pool")
        return cls(device_type, tuple(sorted(labels)), rig)

    def __str__(self) -> str:
        return ",".join([self.device_type, *(f"label={x}" for x in self.labels),
                         *([f"rig={self.rig}"] if self.rig else [])])

    @property
    def params(self) -> dict[str, object]:
        return {"dt": self.device_type, "labels": list(self.labels), "rig": self.rig}


@dataclass(frozen=True)
class JobRecord:
    """What a job ran, kept with its record for the release matrix: the release under test
    (None: none named) and each suite's outcome, one of OUTCOMES."""

    release: str | None = None
    suites: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Grant:
    """One rig of a lease: its name, the epoch that fences this lease, the rig file it is
    reached by and its bench host."""

    rig: str
    epoch: int
    config: str
    host: str


def holder_name() -> str:
    """Who holds a lease, as people will read it: CI job, user@host, pid, xdist worker."""
    parts = [f"{getpass.getuser()}@{socket.gethostname()}", f"pid {os.getpid()}"]
    if os.environ.get("CI_JOB_ID"):
        parts.insert(0, f"job {os.environ['CI_JOB_ID']}")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        parts.append(os.environ["PYTEST_XDIST_WORKER"])
    return " ".join(parts)


class StaleEpoch(InfraError):
    """An operation carried an epoch that is not the rig's live lease: refused."""


class LeaseLost(InfraError):
    """The database ended this lease (expired, hard cap reached, released by someone else)."""


# --- the store's side: one transaction each ----------------------------------------------------

_ELIGIBLE = """
    FROM rigs r JOIN bench_hosts h ON h.name = r.host
    WHERE r.device_type = %(dt)s AND r.labels @> %(labels)s::text[]
      AND (%(rig)s::text IS NULL OR r.name = %(rig)s)
"""
_SCHEDULABLE = " AND r.health = ANY(%(health)s) AND h.last_seen > now() - h.timeout"


def reap(conn: Connection) -> list[str]:
    """End every lease the database's clock says is over (TTL or hard cap), moving its rig to
    cleaning, and drop queued requests whose waiter stopped polling or ran out of time. Any
    client may run it at any time; returns the rigs it sent to cleaning."""
    with conn.transaction():
        rows = conn.execute("""
            WITH ended AS (
                UPDATE leases SET ended_at = now(), end_reason =
                    CASE WHEN hard_cap_at <= now() THEN 'hard cap' ELSE 'expired' END
                WHERE ended_at IS NULL AND (expires_at <= now() OR hard_cap_at <= now())
                RETURNING rig, epoch, holder, purpose, granted_at, end_reason),
            job AS (
                INSERT INTO jobs (rig, epoch, holder, purpose, started_at, outcome)
                SELECT rig, epoch, holder, purpose, granted_at, 'lease ' || end_reason FROM ended)
            UPDATE rigs r SET state = 'cleaning' FROM ended e
            WHERE r.name = e.rig AND r.epoch = e.epoch AND r.state = 'leased'
            RETURNING r.name""").fetchall()
        conn.execute("UPDATE lease_requests SET state = CASE WHEN deadline <= now() "
                     "THEN 'timed out' ELSE 'abandoned' END "
                     "WHERE state = 'waiting' AND (deadline <= now() OR alive_until <= now())")
        if rows:
            conn.execute("NOTIFY hil_lab")
    return [str(r["name"]) for r in rows]


def _try_grant(conn: Connection, request: int, sel: Selector, count: int, purpose: str,
               priority: int, ttl: float, hard_cap: float, holder: str) -> list[Grant] | None:
    with conn.transaction():
        # FIFO within priority: earlier requests that could use these rigs are served first,
        # so this one may only take what is left once they have theirs
        ahead = conn.execute(f"""
            SELECT coalesce(sum(q.count), 0) AS n FROM lease_requests q
            WHERE q.state = 'waiting' AND q.alive_until > now() AND q.deadline > now()
              AND (q.priority > %(prio)s OR (q.priority = %(prio)s AND q.id < %(id)s))
              AND q.device_type = %(dt)s
              AND EXISTS (SELECT 1 {_ELIGIBLE} AND r.labels @> q.labels
                          AND r.name = coalesce(q.rig, r.name)
                          AND r.health = ANY(CASE q.purpose WHEN 'job' THEN %(job)s::text[]
                                             ELSE %(health)s::text[] END))""",
            {**sel.params, "prio": priority, "id": request, "job": SCHEDULABLE["job"],
             "health": SCHEDULABLE["health"]}).fetchone()
        reserved = int(ahead["n"]) if ahead else 0
        free = conn.execute(f"""
            SELECT r.name {_ELIGIBLE} AND r.state = 'idle' {_SCHEDULABLE}
            ORDER BY r.idle_since NULLS FIRST, r.name
            FOR UPDATE OF r SKIP LOCKED LIMIT %(n)s""",
            {**sel.params, "health": SCHEDULABLE[purpose], "n": reserved + count}).fetchall()
        if len(free) < reserved + count:
            return None  # all or nothing: the locks go with the transaction
        free = free[reserved:]
        names = [str(r["name"]) for r in free]
        rows = conn.execute(
            "UPDATE rigs SET state = 'leased', epoch = epoch + 1 WHERE name = ANY(%s) "
            "RETURNING name, epoch, config, host", (names,)).fetchall()
        conn.execute("""
            INSERT INTO leases (rig, epoch, holder, request, purpose, ttl, expires_at, hard_cap_at)
            SELECT r.name, r.epoch, %(holder)s, %(id)s, %(purpose)s, make_interval(secs => %(ttl)s),
                   now() + make_interval(secs => %(ttl)s),
                   now() + make_interval(secs => %(cap)s)
            FROM rigs r WHERE r.name = ANY(%(names)s)""",
            {"holder": holder, "id": request, "purpose": purpose, "ttl": ttl, "cap": hard_cap,
             "names": names})
        conn.execute("UPDATE lease_requests SET state = 'granted' WHERE id = %s", (request,))
        conn.execute("NOTIFY hil_lab_grant")  # the bench hosts open the rigs' endpoints
        return [Grant(str(r["name"]), int(r["epoch"]), str(r["config"]), str(r["host"]))
                for r in rows]


def queue_report(conn: Connection, request: int, sel: Selector, priority: int) -> str:
    """Where a request stands: its place in the queue and who holds the rigs it could take."""
    pos = conn.execute("""
        SELECT count(*) AS n FROM lease_requests q WHERE q.state = 'waiting'
          AND q.device_type = %(dt)s
          AND (q.priority > %(prio)s OR (q.priority = %(prio)s AND q.id < %(id)s))""",
        {**sel.params, "prio": priority, "id": request}).fetchone()
    held = conn.execute("""
        SELECT r.name, r.state, r.health, l.holder, l.epoch,
               extract(epoch FROM l.expires_at - now()) AS left
        FROM rigs r LEFT JOIN leases l ON l.rig = r.name AND l.ended_at IS NULL
        WHERE r.device_type = %(dt)s AND r.labels @> %(labels)s::text[]
          AND (%(rig)s::text IS NULL OR r.name = %(rig)s)
        ORDER BY r.name""", sel.params).fetchall()
    rigs = [f"{r['name']} held by {r['holder']} (epoch {r['epoch']}, {float(r['left']):.0f}s "
            "left)" if r["holder"] else f"{r['name']} {r['state']}, health {r['health']}"
            for r in held]
    return (f"queue position {int(pos['n']) + 1 if pos else 1}; matching rigs: "
            + ("; ".join(rigs) or "none registered"))


# --- the holder's side -------------------------------------------------------------------------

def _positive(value: float, what: str) -> None:
    if value <= 0:
        raise ConfigError(f"{what} must be positive, got {value}")


@dataclass
class Lease:
    """Rigs held from the pool. ``heartbeat()`` keeps it alive; ``release()`` ends it."""

    dsn: str
    grants: list[Grant]
    holder: str
    ttl: float
    purpose: str = "job"
    lost: str | None = None  # why the database ended it under us
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        """The renewal interval: a third of the TTL, so two renewals may fail in a row."""
        return self.ttl / 3

    def renew(self, conn: Connection) -> None:
        """Push the expiry out by a TTL (never past the hard cap). A lease the database
        already judged over cannot come back: LeaseLost."""
        with conn.transaction():
            for g in self.grants:
                row = conn.execute("""
                    UPDATE leases SET expires_at = least(now() + ttl, hard_cap_at)
                    WHERE rig = %s AND epoch = %s AND ended_at IS NULL AND expires_at > now()
                      AND hard_cap_at > now()
                    RETURNING id""", (g.rig, g.epoch)).fetchone()
                if row is None:
                    raise LeaseLost(f"lease epoch {g.epoch} is over: expired, hard cap reached "
                                    "or released by someone else", part=PART, rig=g.rig)

    def heartbeat(self) -> None:
        """Renew every TTL/3 from a thread with its own connection, until released or lost."""
        self._thread = threading.Thread(target=self._beat, name="lab-lease-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        conn: Connection | None = None
        while not self._stop.wait(self.interval):
            try:
                conn = conn or db.connect(self.dsn, timeout=self.interval)
                self.renew(conn)
            except LeaseLost as exc:
                self.lost = str(exc)
                log.error("%s", exc)
                break
            except (InfraError, psycopg.Error) as exc:  # try again next beat: TTL covers two
                log.warning("lease renewal failed: %s", db.safe_dsn(str(exc)))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def ended(self) -> str | None:
        """Why the lease is over, asking the database (one renewal, as the heartbeat's next
        would be) when the heartbeat has not seen it yet; None while it holds, or when the
        database cannot say."""
        if self.lost is None:
            try:
                with db.connect(self.dsn) as conn:
                    self.renew(conn)
            except LeaseLost as exc:
                self.lost = str(exc)
            except (InfraError, psycopg.Error):
                pass  # unknown: the caller reports its own failure as it is
        return self.lost

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost, part=PART)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + db.CONNECT_TIMEOUT)

    def release(self, outcome: str = "passed", record: JobRecord | None = None) -> None:
        """End the lease (outcome ``infra`` leaves the rigs *unknown*); each rig goes to
        cleaning. Raises StaleEpoch for a rig the lease no longer holds."""
        self.stop_heartbeat()
        refused: list[StaleEpoch] = []
        with db.connect(self.dsn) as conn:
            for g in self.grants:  # every rig, even after one was refused
                try:
                    release(conn, g.rig, g.epoch, outcome=outcome, by=self.holder,
                            record=record)
                except StaleEpoch as exc:
                    refused.append(exc)
        if refused:
            raise refused[0]


def wait_served(dsn: str, grant: Grant, timeout: float) -> None:
    """Wait until the bench host's agent serves the rig's endpoints for this lease (it opens
    them once it sees the grant): a session that reached them first would meet closed ports."""
    deadline = Deadline(timeout)
    what = f"{grant.rig}'s endpoints for lease epoch {grant.epoch}"
    try:
        with db.connect(dsn, autocommit=True) as conn:
            conn.execute("LISTEN hil_lab")
            while True:
                row = conn.execute(
                    "SELECT served_at IS NOT NULL AS served, serve_error, ended_at, end_reason "
                    "FROM leases WHERE rig = %s AND epoch = %s", (grant.rig, grant.epoch)
                ).fetchone()
                if row is None or row["ended_at"] is not None:
                    raise LeaseLost(f"lease epoch {grant.epoch} ended before bench host "
                                    f"{grant.host} served it ({row and row['end_reason']})",
                                    part=PART, rig=grant.rig)
                if row["served"]:
                    if row["serve_error"]:
                        raise InfraError(f"bench host {grant.host} cannot serve {what}: "
                                         f"{row['serve_error']}", part=PART, rig=grant.rig)
                    return
                if deadline.expired():
                    raise InfraError(f"bench host {grant.host} did not serve {what} within "
                                     f"{timeout:g}s (is `hil lab agent` running there?)",
                                     part=PART, rig=grant.rig)
                for _ in conn.notifies(timeout=min(1.0, deadline.remaining()), stop_after=1):
                    pass
    except psycopg.Error as exc:
        raise db.fault(exc, f"waiting for {what}") from None


def acquire(dsn: str, sel: Selector, *, count: int = 1, holder: str | None = None,
            priority: int = 0, queue_timeout: float = 600.0, ttl: float = DEFAULT_TTL,
            hard_cap: float = DEFAULT_HARD_CAP, purpose: str = "job",
            on_wait: Callable[[str], None] | None = None) -> Lease:
    """Lease ``count`` rigs matching ``sel``, waiting in the queue up to ``queue_timeout``
    seconds; an InfraError naming the queue position and the holders when that runs out."""
    _positive(ttl, "ttl")
    _positive(hard_cap, "hard cap")
    holder = holder or holder_name()
    poll = max(0.05, ttl / 3)  # a waiter also reaps: a dead holder's rig is back within TTL+poll
    deadline = Deadline(queue_timeout)
    with db.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute("""
                INSERT INTO lease_requests (holder, count, device_type, labels, rig, purpose,
                    priority, deadline, alive_until)
                VALUES (%(holder)s, %(n)s, %(dt)s, %(labels)s, %(rig)s, %(purpose)s, %(prio)s,
                        now() + make_interval(secs => %(wait)s),
                        now() + make_interval(secs => %(alive)s))
                RETURNING id""", {**sel.params, "holder": holder, "n": count, "purpose": purpose,
                                  "prio": priority, "wait": queue_timeout,
                                  "alive": 3 * poll + db.CONNECT_TIMEOUT}).fetchone()
            assert row is not None
            request = int(row["id"])
            conn.execute("LISTEN hil_lab")
            told = False
            while True:
                reap(conn)
                grants = _try_grant(conn, request, sel, count, purpose, priority, ttl, hard_cap,
                                    holder)
                if grants is not None:
                    lease = Lease(dsn, grants, holder, ttl, purpose)
                    lease.heartbeat()
                    return lease
                if deadline.expired():
                    where = queue_report(conn, request, sel, priority)
                    conn.execute("UPDATE lease_requests SET state = 'timed out' WHERE id = %s",
                                 (request,))
                    raise InfraError(f"no {count} rig(s) matching {sel} free within "
                                     f"{queue_timeout:g}s: {where}", part=PART)
                if not told and on_wait is not None:
                    on_wait(f"waiting up to {queue_timeout:g}s for {count} rig(s) matching "
                            f"{sel}: {queue_report(conn, request, sel, priority)}")
                    told = True
                for _ in conn.notifies(timeout=min(poll, deadline.remaining()), stop_after=1):
                    pass
                conn.execute("UPDATE lease_requests SET alive_until = now() + "
                             "make_interval(secs => %s) WHERE id = %s",
                             (3 * poll + db.CONNECT_TIMEOUT, request))
        except psycopg.Error as exc:
            raise db.fault(exc, f"leasing {sel}") from None


def release(conn: Connection, rig: str, epoch: int, *, outcome: str = "passed",
            by: str = "", record: JobRecord | None = None) -> None:
    """Compare-and-set on the epoch: end the live lease ``epoch`` of ``rig`` and send the rig to
    cleaning. A stale epoch is refused (StaleEpoch), naming what the rig holds now."""
    if outcome not in OUTCOMES:
        raise ConfigError(f"outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
    record = record or JobRecord()
    if bad := [s for s, o in record.suites.items() if o not in OUTCOMES]:
        raise ConfigError(f"suite outcome {record.suites[bad[0]]!r} of {bad[0]!r}: one of "
                          f"{', '.join(OUTCOMES)}")
    with conn.transaction():
        row = conn.execute("""
            WITH ended AS (
                UPDATE leases SET ended_at = now(), end_reason = 'released'
                    || CASE WHEN %(by)s <> '' AND %(by)s <> holder THEN ' by ' || %(by)s
                            ELSE '' END
                WHERE rig = %(rig)s AND epoch = %(epoch)s AND ended_at IS NULL
                RETURNING rig, epoch, holder, purpose, granted_at),
            job AS (
                INSERT INTO jobs (rig, epoch, holder, purpose, started_at, outcome, release,
                                  suites)
                SELECT rig, epoch, holder, purpose, granted_at, %(outcome)s, %(release)s,
                       %(suites)s::jsonb FROM ended)
            UPDATE rigs r SET state = 'cleaning' FROM ended e
            WHERE r.name = e.rig AND r.epoch = e.epoch RETURNING r.name""",
            {"rig": rig, "epoch": epoch, "outcome": outcome, "by": by,
             "release": record.release, "suites": json.dumps(record.suites)}).fetchone()
        if row is None:
            now = conn.execute("SELECT r.epoch, r.state, l.holder FROM rigs r LEFT JOIN leases l "
                               "ON l.rig = r.name AND l.ended_at IS NULL WHERE r.name = %s",
                               (rig,)).fetchone()
            seen = (f"the rig is at epoch {now['epoch']}, {now['state']}"
                    + (f", held by {now['holder']}" if now["holder"] else "")) if now else \
                "no such rig is registered"
            raise StaleEpoch(f"release with epoch {epoch} refused: not the rig's live lease "
                             f"({seen})", part=PART, rig=rig)
        if outcome == "infra":
            set_health(conn, rig, "unknown", f"infrastructure error in lease epoch {epoch}")
        conn.execute("NOTIFY hil_lab, 'cleaning'")


Cleaner = Callable[[Grant], None]


def clean(conn: Connection, grant: Grant, cleaner: Cleaner) -> bool:
    """Run ``cleaner`` (power off, mux release through the rig's drivers) on a rig in cleaning,
    then make it idle. A cleaner that fails leaves the rig *unknown* (a health check next).
    Fenced like a release: only the epoch the rig was cleaned for may finish it."""
    error = ""
    try:
        cleaner(grant)
    except Exception as exc:  # any failure to power off is the rig's, never the caller's
        error = f"cleaning failed: {exc}"[:500]
    with conn.transaction():
        row = conn.execute("UPDATE rigs SET state = 'idle', idle_since = now() "
                           "WHERE name = %s AND epoch = %s AND state = 'cleaning' RETURNING name",
                           (grant.rig, grant.epoch)).fetchone()
        if row is not None and error:
            set_health(conn, grant.rig, "unknown", error)
        conn.execute("NOTIFY hil_lab")
    return row is not None and not error


def cleaning(conn: Connection, host: str | None = None) -> list[Grant]:
    """The rigs waiting to be cleaned (on one bench host, or all)."""
    rows = conn.execute("SELECT name, epoch, config, host FROM rigs WHERE state = 'cleaning' "
                        "AND (%(host)s::text IS NULL OR host = %(host)s) ORDER BY name",
                        {"host": host}).fetchall()
    conn.commit()
    return [Grant(str(r["name"]), int(r["epoch"]), str(r["config"]), str(r["host"])) for r in rows]
