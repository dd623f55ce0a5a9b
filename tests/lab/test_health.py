"""Health as LAVA keeps it, bench-host liveness, and a database that does not answer."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.errors import InfraError
from hil.lab import checks, db, leases
from hil.lab.db import Connection
from hil.lab.health import check_done, heartbeat, set_health
from hil.lab.leases import Selector
from hil.lab.rigs import register
from tests.lab.helpers import add_rigs, done, rig_row
from tests.lab.test_cli import bench_rig

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


def test_a_waiting_job_does_not_hold_up_the_health_check_of_a_rig_it_cannot_take(
        lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["r1", "r2"])
    held = job_gets(lab_dsn, Selector("raspberrypi3", rig="r2"))
    assert held is not None
    with lab.transaction():
        set_health(lab, "r1", "unknown", "infrastructure error")
    waiter = threading.Thread(target=job_gets_within, args=(lab_dsn, 10.0))
    waiter.start()
    wait_until(lambda: lab.execute("SELECT count(*) AS n FROM lease_requests WHERE state = "
                                   "'waiting'").fetchone()["n"] == 1 or lab.rollback(),  # type: ignore[index]
               10, "the job's request to queue")
    lab.commit()
    check = job_gets(lab_dsn, purpose="health")  # r1: the queued job could not take it
    assert check is not None
    done(check, lab)
    done(held, lab)  # r2 is free: the queued job gets it
    waiter.join(15)
    assert rig_row(lab, "r2")["epoch"] == 2


def job_gets_within(dsn: str, wait: float) -> None:
    lease = leases.acquire(dsn, Selector("raspberrypi3"), queue_timeout=wait, ttl=10)
    with db.connect(dsn) as conn:
        done(lease, conn)


def test_a_good_rig_is_due_for_its_check_after_n_jobs_or_h_hours(lab: Connection,
                                                               lab_dsn: str) -> None:
    add_rigs(lab, ["r1", "r2"])
    every_two = checks.Policy(("true",), every_jobs=2)
    for _ in range(2):
        assert checks.mark_due(lab, "bench1", every_two) == []
        lease = job_gets(lab_dsn)
        assert lease is not None
        done(lease, lab)
    assert checks.mark_due(lab, "bench1", every_two) == ["r1"]
    assert rig_row(lab, "r1")["health"] == "unknown"
    assert job_gets(lab_dsn) is None  # no job until its check passed
    lab.execute("UPDATE rigs SET registered_at = now() - interval '25 hours' WHERE name = 'r2'")
    lab.commit()
    assert checks.mark_due(lab, "bench1", checks.Policy(("true",), every_hours=24)) == ["r2"]
    reasons = [r["reason"] for r in lab.execute("SELECT reason FROM health_events ORDER BY id")]
    assert reasons == ["periodic health check due: 2 jobs since the last check (every 2)",
                       "periodic health check due: 25.0 h since the last check (every 24 h)"]


def test_the_bench_host_checks_its_unknown_rigs_by_itself(
        lab: Connection, lab_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    files = [bench_rig(tmp_path, name) for name in ("pi-1", "pi-2")]
    register(lab, "bench1", [str(rig) for rig, _ in files])  # new rigs: unknown
    lab.execute("UPDATE rigs SET config = replace(config, 'a Raspberry', 'a broken Raspberry') "
                "WHERE name = 'pi-2'")
    lab.commit()
    checker = checks.Checker(lab_dsn, "bench1", checks.Policy(
        ("sh", "-c", '! grep -q broken "$HIL_RIG" && test -d "$HIL_RUNTIME_DIR"')))
    checker(lab)
    checker.stop(cancel=False)
    assert {r: rig_row(lab, r)["health"] for r in ("pi-1", "pi-2")} == {
        "pi-1": "good", "pi-2": "bad"}
    assert all(rig_row(lab, r)["state"] == "idle" for r in ("pi-1", "pi-2"))
    history = lab.execute("SELECT rig, purpose, outcome FROM jobs ORDER BY rig").fetchall()
    assert [(j["rig"], j["purpose"], j["outcome"]) for j in history] == [
        ("pi-1", "health", "passed"), ("pi-2", "health", "failed")]
    checker(lab)  # good and bad rigs take no check
    assert not any(t.is_alive() for t in checker.running.values())
    assert len(lab.execute("SELECT id FROM jobs").fetchall()) == 2
