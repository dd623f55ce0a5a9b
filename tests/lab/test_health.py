"""Health as LAVA keeps it, bench-host liveness, and a database that does not answer."""

from __future__ import annotations

import socket
import time

import pytest

from hil.deadline import wait_until
from hil.errors import InfraError
from hil.lab import db, leases
from hil.lab.db import Connection
from hil.lab.health import check_done, heartbeat, set_health
from hil.lab.leases import Selector
from tests.lab.helpers import add_rigs, done, rig_row

R1 = Selector("raspberrypi3", rig="r1")


def job_gets(dsn: str, sel: Selector = R1, purpose: str = "job") -> leases.Lease | None:
    try:
        return leases.acquire(dsn, sel, queue_timeout=0.2, ttl=10, purpose=purpose)
    except InfraError:
        return None


def test_infra_error_unknown_health_check_then_good_or_bad(lab: Connection,
                                                          lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    lease = job_gets(lab_dsn)
    assert lease is not None
    done(lease, lab, outcome="infra")
    assert rig_row(lab, "r1")["health"] == "unknown"
    assert job_gets(lab_dsn) is None  # an unknown rig takes no job ...
    check = job_gets(lab_dsn, purpose="health")  # ... only its health check
    assert check is not None
    done(check, lab)
    check_done(lab, "r1", passed=False, detail="relay silent")
    assert rig_row(lab, "r1")["health"] == "bad"
    assert job_gets(lab_dsn) is None and job_gets(lab_dsn, purpose="health") is None
    check_done(lab, "r1", passed=True)  # a person fixed it and a check passed
    lease = job_gets(lab_dsn)
    assert lease is not None
    done(lease, lab)
    events = lab.execute("SELECT old, new, reason FROM health_events ORDER BY id").fetchall()
    assert [(e["old"], e["new"]) for e in events] == [
        ("good", "unknown"), ("unknown", "bad"), ("bad", "good")]
    assert "relay silent" in events[1]["reason"]


def test_maintenance_and_retired_rigs_are_never_scheduled(lab: Connection,
                                                         lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    for health in ("maintenance", "retired"):
        with lab.transaction():
            set_health(lab, "r1", health, "by hand")
        assert job_gets(lab_dsn) is None and job_gets(lab_dsn, purpose="health") is None


def test_a_failed_cleaning_leaves_the_rig_unknown(lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    lease = job_gets(lab_dsn)
    assert lease is not None
    lease.release()

    def relay_stuck(grant: leases.Grant) -> None:
        raise InfraError("relay did not switch off", part="power", rig=grant.rig)

    assert not leases.clean(lab, lease.grants[0], relay_stuck)
    row = rig_row(lab, "r1")
    assert (row["state"], row["health"]) == ("idle", "unknown")


def test_a_silent_bench_host_takes_its_rigs_out_of_scheduling(lab: Connection,
                                                             lab_dsn: str) -> None:
    add_rigs(lab, ["r1"], host_timeout=0.5)
    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 > 0.6, 2, "the host's heartbeat to go stale")
    assert job_gets(lab_dsn) is None
    heartbeat(lab, "bench1", 60)
    lease = job_gets(lab_dsn)
    assert lease is not None
    done(lease, lab)


def test_a_database_that_does_not_answer_is_an_infra_error_within_its_deadline() -> None:
    with socket.socket() as silent:  # accepts TCP, never speaks PostgreSQL
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(InfraError) as err:
            db.connect(f"host=127.0.0.1 port={port} user=ci password=hunter22 dbname=lab",
                       timeout=1)
        assert time.monotonic() - t0 < 4
    text = str(err.value)
    assert "[lab database]" in text and "within 1s" in text and "accepting connections" in text
    assert "hunter22" not in text and "password=***" in text
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
    with pytest.raises(InfraError, match=r"\[lab database\] cannot reach"):
        leases.acquire(f"postgresql://ci:hunter22@127.0.0.1:{port}/lab", R1)


def test_safe_dsn_masks_passwords() -> None:
    assert db.safe_dsn("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert db.safe_dsn("host=h password=s3cret dbname=x") == "host=h password=*** dbname=x"
