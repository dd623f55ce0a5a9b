"""``--rig=pool:SELECTOR``: one rig leased from the lab for a pytest session (each pytest-xdist
worker leases its own), given back at the end as the session leaves it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

from hil.config import RigConfig
from hil.deadline import Deadline
from hil.errors import InfraError
from hil.lab import db, leases
from hil.lab.health import check_done
from hil.lab.rigs import LEASE_EPOCH, power_down, rig_config

log = logging.getLogger(__name__)
PREFIX = "pool:"


def is_pool(rig: str | None) -> bool:
    return bool(rig) and str(rig).startswith(PREFIX)


def lease_rig(dsn: str, spec: str, *, wait: float, ttl: float = leases.DEFAULT_TTL,
              priority: int = 0, on_wait: Callable[[str], None] | None = None,
              ) -> tuple[leases.Lease, RigConfig]:
    """Lease one rig matching ``pool:SELECTOR`` and load the rig config registered for it."""
    sel = leases.Selector.parse(spec.removeprefix(PREFIX))
    lease = leases.acquire(dsn, sel, queue_timeout=wait, ttl=ttl, priority=priority,
                           on_wait=on_wait)
    try:
        return lease, leased_config(lease)
    except BaseException:
        give_back(lease, "infra", powered_down=False)
        raise


# A bench host's agent opens a rig's endpoints within a pass of its loop once it sees the grant
SERVE_TIMEOUT = 60.0


def leased_config(lease: leases.Lease) -> RigConfig:
    """The rig config a lease's holder drives its rig by, once the rig is reachable: a rig
    file that names the lease's epoch is served per lease by its bench host's agent, so the
    holder waits for that first."""
    grant = lease.grants[0]
    if LEASE_EPOCH in grant.config:
        leases.wait_served(lease.dsn, grant, SERVE_TIMEOUT)
    return rig_config(grant)


def give_back(lease: leases.Lease, outcome: str, *, powered_down: bool,
              record: leases.JobRecord | None = None) -> bool:
    """Release the lease (``infra``: the rig becomes *unknown*) and clean the rig: nothing more
    to do when the session's own teardown powered it off, else through its drivers. Returns
    whether this holder released it (not when the store had already ended it, or could not be
    reached). Never raises: it runs on the way out."""
    try:
        lease.release(outcome, record)
    except InfraError as exc:  # StaleEpoch included: the lab ended the lease before us
        log.error("giving the rig back to the lab: %s", exc)
        return False
    try:
        with db.connect(lease.dsn) as conn:
            for grant in lease.grants:
                leases.clean(conn, grant, (lambda g: None) if powered_down else power_down)
    except InfraError as exc:  # the bench host cleans it instead
        log.error("cleaning the rig after its lease: %s", exc)
    return True


def health_check(dsn: str, rig: str, argv: Sequence[str], *, wait: float = 600.0,
                 timeout: float = 3600.0, env: Mapping[str, str] | None = None,
                 stop: threading.Event | None = None) -> bool | None:
    """Lease ``rig`` for its health check and run ``argv`` with ``HIL_RIG`` naming the rig's
    file (so ``pytest suites/smoke`` runs on it; ``env``: more variables); exit status 0 makes
    the rig good, anything else (or ``timeout`` seconds) bad. Returns whether it passed; None
    when ``stop`` was set first (the command is stopped, the rig stays *unknown*)."""
    with db.connect(dsn) as conn:
        row = conn.execute("SELECT device_type FROM rigs WHERE name = %s", (rig,)).fetchone()
    if row is None:
        raise InfraError(f"no rig named {rig!r} is registered", part=db.PART, rig=rig)
    lease = leases.acquire(dsn, leases.Selector(row["device_type"], rig=rig), purpose="health",
                           queue_timeout=wait)
    try:
        cfg = leased_config(lease)
        status = _run_check(argv, {**os.environ, **(env or {}), "HIL_RIG": str(cfg.source)},
                            timeout, stop or threading.Event())
    except BaseException:
        give_back(lease, "infra", powered_down=False)
        raise
    if status is None:
        give_back(lease, "infra", powered_down=False)
        return None
    passed, detail = status
    give_back(lease, "passed" if passed else "failed", powered_down=False)
    with db.connect(dsn) as conn:
        check_done(conn, rig, passed, detail)
    return passed


def _run_check(argv: Sequence[str], env: dict[str, str], timeout: float,
               stop: threading.Event) -> tuple[bool, str] | None:
    """Run the check's command to its end, its deadline or ``stop`` (None); in a process group
    of its own, stopped whole (SIGTERM: a pytest session unwinds and powers its rig off)."""
    command = " ".join(argv)
    try:
        proc = subprocess.Popen(list(argv), env=env, start_new_session=True)
    except OSError as exc:
        return False, f"{command}: {exc}"
    deadline = Deadline(timeout)
    while proc.poll() is None and not stop.is_set() and not deadline.expired():
        stop.wait(min(0.5, deadline.remaining()))
    if proc.returncode is not None:
        return proc.returncode == 0, f"{command} exited with status {proc.returncode}"
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            break
    if stop.is_set():
        return None
    return False, f"{command} did not end within {timeout:g}s"
