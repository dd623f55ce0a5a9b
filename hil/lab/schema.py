"""The lab database's schema as numbered migrations. ``migrate`` applies the ones a database
lacks, under an advisory lock, so any number of ``hil lab init`` runs at once end in one schema."""

from __future__ import annotations

from hil.lab.db import Connection

# Health as LAVA keeps it: only good rigs take jobs; unknown ones take a health check first.
HEALTH = ("good", "unknown", "bad", "maintenance", "retired")
# What a rig is doing: idle, leased, or being cleaned (power off, mux released) after a lease.
STATES = ("idle", "leased", "cleaning")

MIGRATIONS: tuple[str, ...] = (
    # 1: hosts, rigs, leases, the queue, health events, job records
    f"""
    CREATE TABLE bench_hosts (
        name text PRIMARY KEY,
        last_seen timestamptz NOT NULL DEFAULT now(),
        timeout interval NOT NULL DEFAULT '60 seconds'
    );
    CREATE TABLE rigs (
        name text PRIMARY KEY,
        device_type text NOT NULL,
        labels text[] NOT NULL DEFAULT '{{}}',
        host text NOT NULL REFERENCES bench_hosts(name),
        health text NOT NULL DEFAULT 'unknown' CHECK (health IN {HEALTH!r}),
        state text NOT NULL DEFAULT 'idle' CHECK (state IN {STATES!r}),
        epoch bigint NOT NULL DEFAULT 0,
        config text NOT NULL,
        registered_at timestamptz NOT NULL DEFAULT now(),
        idle_since timestamptz
    );
    CREATE INDEX rigs_by_type ON rigs (device_type, state, health);
    CREATE TABLE lease_requests (
        id bigserial PRIMARY KEY,
        holder text NOT NULL,
        count int NOT NULL CHECK (count > 0),
        device_type text NOT NULL,
        labels text[] NOT NULL DEFAULT '{{}}',
        rig text,
        purpose text NOT NULL DEFAULT 'job' CHECK (purpose IN ('job', 'health')),
        priority int NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now(),
        deadline timestamptz NOT NULL,
        alive_until timestamptz NOT NULL,
        state text NOT NULL DEFAULT 'waiting'
            CHECK (state IN ('waiting', 'granted', 'timed out', 'abandoned'))
    );
    CREATE INDEX waiting_requests ON lease_requests (priority DESC, id) WHERE state = 'waiting';
    CREATE TABLE leases (
        id bigserial PRIMARY KEY,
        rig text NOT NULL REFERENCES rigs(name),
        epoch bigint NOT NULL,
        holder text NOT NULL,
        request bigint REFERENCES lease_requests(id),
        purpose text NOT NULL,
        granted_at timestamptz NOT NULL DEFAULT now(),
        ttl interval NOT NULL,
        expires_at timestamptz NOT NULL,
        hard_cap_at timestamptz NOT NULL,
        ended_at timestamptz,
        end_reason text,
        UNIQUE (rig, epoch)
    );
    -- the store itself refuses a second live lease on a rig, whatever a client does
    CREATE UNIQUE INDEX one_live_lease_per_rig ON leases (rig) WHERE ended_at IS NULL;
    CREATE TABLE health_events (
        id bigserial PRIMARY KEY,
        rig text NOT NULL REFERENCES rigs(name),
        at timestamptz NOT NULL DEFAULT now(),
        old text NOT NULL,
        new text NOT NULL,
        reason text NOT NULL
    );
    CREATE TABLE jobs (
        id bigserial PRIMARY KEY,
        rig text NOT NULL REFERENCES rigs(name),
        epoch bigint NOT NULL,
        holder text NOT NULL,
        purpose text NOT NULL,
        started_at timestamptz NOT NULL,
        ended_at timestamptz NOT NULL DEFAULT now(),
        outcome text NOT NULL
    );
    """,
    # 2: what a job ran, for the release matrix: the release under test and each suite's
    # outcome (passed, failed or infra) on the rig the job held
    """
    ALTER TABLE jobs ADD COLUMN release text;
    ALTER TABLE jobs ADD COLUMN suites jsonb NOT NULL DEFAULT '{}';
    CREATE INDEX jobs_by_release ON jobs (release) WHERE release IS NOT NULL;
    """,
    # 3: a bench host's agent serves a rig's endpoints per lease: when it has opened them for a
    # lease (or failed to, and why), so a session waits for them instead of racing the agent
    """
    ALTER TABLE leases ADD COLUMN served_at timestamptz;
    ALTER TABLE leases ADD COLUMN serve_error text;
    """,
)


def version(conn: Connection) -> int:
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL AS present").fetchone()
    if not row or not row["present"]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_version").fetchone()
    return int(row["v"]) if row else 0


def migrate(conn: Connection) -> tuple[int, int]:
    """Bring the schema to the newest version; returns (version before, version after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('hil lab schema'))")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version int PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        before = version(conn)
        for number, sql in enumerate(MIGRATIONS[before:], start=before + 1):
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
    return before, len(MIGRATIONS)
