"""Leases against a real PostgreSQL: exclusive, all or nothing, FIFO within priority, kept alive
by a heartbeat, fenced by epochs, freed when their holder dies."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hil.deadline import wait_until
from hil.errors import InfraError
from hil.lab import db, leases
from hil.lab.db import Connection
from hil.lab.leases import Selector
from tests.lab.helpers import add_rigs, bench_host, done, rig_row

RPI3 = Selector("raspberrypi3")


def test_selector_parses_what_users_write() -> None:
    assert Selector.parse("raspberrypi3,label=b,label=a") == Selector("raspberrypi3", ("a", "b"))
    assert Selector.parse("device_type=bbb,rig=r1") == Selector("bbb", (), "r1")
    with pytest.raises(Exception, match="expected DEVICE_TYPE"):
        Selector.parse("raspberrypi3,colour=red")


def test_concurrent_acquirers_never_share_a_rig(lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, [f"rpi{i}" for i in range(4)])
    held: dict[str, list[tuple[float, float, int]]] = {}
    errors: list[BaseException] = []
    guard = threading.Lock()

    def job() -> None:
        try:
            from hil.lab import db

            with db.connect(lab_dsn) as conn:
                for _ in range(3):
                    lease = leases.acquire(lab_dsn, RPI3, queue_timeout=30, ttl=10)
                    start = time.monotonic()
                    time.sleep(0.01)  # the job's work
                    end = time.monotonic()
                    g = lease.grants[0]
                    with guard:
                        held.setdefault(g.rig, []).append((start, end, g.epoch))
                    done(lease, conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(len(v) for v in held.values()) == 36
    for rig, spans in held.items():
        spans.sort()
        for (_, end, epoch), (start, _, next_epoch) in itertools.pairwise(spans):
            assert start >= end, f"{rig} held twice at once"
            assert next_epoch > epoch
        assert sorted(e for _, _, e in spans) == list(range(1, len(spans) + 1))


def test_n_rigs_are_all_or_nothing(lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["a", "b", "c"])
    one = leases.acquire(lab_dsn, RPI3, ttl=10)
    with pytest.raises(InfraError, match="no 3 rig"):
        leases.acquire(lab_dsn, RPI3, count=3, queue_timeout=0.3, ttl=10)
    free = [n for n in "abc" if n != one.grants[0].rig]
    assert all(rig_row(lab, n)["state"] == "idle" for n in free)
    two = leases.acquire(lab_dsn, RPI3, count=2, queue_timeout=1, ttl=10)
    assert sorted(g.rig for g in two.grants) == free
    for lease in (one, two):
        done(lease, lab)


def test_queue_is_fifo_within_priority(lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["only"])
    first = leases.acquire(lab_dsn, RPI3, ttl=10, holder="first")
    order: list[str] = []

    def waiter(name: str, priority: int) -> None:
        from hil.lab import db

        lease = leases.acquire(lab_dsn, RPI3, ttl=10, holder=name, priority=priority,
                               queue_timeout=30)
        order.append(name)
        with db.connect(lab_dsn) as conn:
            done(lease, conn)

    threads = []
    for i, (name, priority) in enumerate([("low-1", 0), ("low-2", 0), ("high", 5)]):
        threads.append(threading.Thread(target=waiter, args=(name, priority)))
        threads[-1].start()
        wait_until(lambda n=i + 1: lab.execute(  # type: ignore[misc]
            "SELECT count(*) = %s AS ok FROM lease_requests WHERE state = 'waiting'",
            (n,)).fetchone()["ok"] or lab.rollback(), 10, f"{i + 1} queued requests")
        lab.commit()
    done(first, lab)
    for t in threads:
        t.join(30)
    assert order == ["high", "low-1", "low-2"]


def test_a_later_request_takes_only_what_earlier_ones_leave(lab: Connection,
                                                           lab_dsn: str) -> None:
    add_rigs(lab, ["a", "b", "c"])
    first = leases.acquire(lab_dsn, RPI3, ttl=10)  # two rigs left
    pair: list[leases.Lease] = []
    waiter = threading.Thread(target=lambda: pair.append(leases.acquire(
        lab_dsn, RPI3, count=3, ttl=10, queue_timeout=20)))
    waiter.start()
    wait_until(lambda: lab.execute("SELECT count(*) AS n FROM lease_requests WHERE state = "
                                   "'waiting'").fetchone()["n"] == 1 or lab.rollback(),  # type: ignore[index]
               10, "the request for three rigs to queue")
    lab.commit()
    with pytest.raises(InfraError, match="queue position 2"):  # no backfill ahead of it
        leases.acquire(lab_dsn, RPI3, queue_timeout=0.3, ttl=10)
    done(first, lab)
    waiter.join(20)
    assert sorted(g.rig for g in pair[0].grants) == ["a", "b", "c"]
    done(pair[0], lab)


def test_queue_deadline_names_position_and_holders(lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    held = leases.acquire(lab_dsn, RPI3, ttl=10, holder="ci job 42")
    t0 = time.monotonic()
    with pytest.raises(InfraError) as err:
        leases.acquire(lab_dsn, RPI3, queue_timeout=0.5, ttl=10)
    assert time.monotonic() - t0 < 3
    text = str(err.value)
    assert "[lab lease]" in text and "free within 0.5s" in text
    assert "queue position 1" in text
    assert "r1 held by ci job 42 (epoch 1" in text
    done(held, lab)


def test_heartbeat_keeps_a_lease_past_its_ttl_and_the_hard_cap_ends_it(
        lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    lease = leases.acquire(lab_dsn, RPI3, ttl=0.6, hard_cap=2.0)
    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 > 1.2, 5, "two TTLs to pass")
    assert leases.reap(lab) == [] and lease.lost is None  # renewed, alive past its TTL
    wait_until(lambda: lease.lost, 5, "the hard cap to end the lease", seen=lambda: "alive")
    assert 1.6 < time.monotonic() - t0 < 3.5
    with pytest.raises(leases.LeaseLost):
        lease.check()
    wait_until(lambda: leases.reap(lab) or rig_row(lab, "r1")["state"] == "cleaning", 3,
               "the reaper to end the lease")
    row = lab.execute("SELECT outcome FROM jobs WHERE rig = 'r1'").fetchone()
    assert row is not None and row["outcome"] == "lease hard cap"


def test_stale_epoch_release_and_renewal_are_refused(lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    old = leases.acquire(lab_dsn, RPI3, ttl=10)
    done(old, lab)
    new = leases.acquire(lab_dsn, RPI3, ttl=10)
    assert new.grants[0].epoch == old.grants[0].epoch + 1
    with pytest.raises(leases.StaleEpoch, match=r"epoch 1 refused.*epoch 2, leased, held by"):
        leases.release(lab, "r1", old.grants[0].epoch)
    with pytest.raises(leases.LeaseLost):
        old.renew(lab)
    assert rig_row(lab, "r1")["state"] == "leased"  # the live lease is untouched
    done(new, lab)
    # a cleaner of an older epoch cannot make the rig idle either
    assert not leases.clean(lab, old.grants[0], lambda g: None)


def test_a_holder_waits_for_the_agent_to_serve_its_lease_and_is_told_why_not(
        lab: Connection, lab_dsn: str) -> None:
    add_rigs(lab, ["r1"])
    lease = leases.acquire(lab_dsn, RPI3, ttl=10)
    grant = lease.grants[0]
    with pytest.raises(InfraError, match=r"bench host bench1 did not serve r1's endpoints for "
                                         r"lease epoch 1 within 0.5s \(is `hil lab agent`"):
        leases.wait_served(lab_dsn, grant, 0.5)

    def serve(error: str | None) -> None:  # what the agent records once it opened them
        with db.connect(lab_dsn, autocommit=True) as conn:
            conn.execute("UPDATE leases SET served_at = now(), serve_error = %s WHERE rig = 'r1' "
                         "AND epoch = %s", (error, grant.epoch))
            conn.execute("NOTIFY hil_lab")

    timer = threading.Timer(0.5, serve, (None,))
    timer.start()
    started = time.monotonic()
    leases.wait_served(lab_dsn, grant, 30)  # woken by the notification, not a poll's end
    timer.join()
    assert time.monotonic() - started < 5
    serve("ser2net on port 7400 did not start")
    with pytest.raises(InfraError, match=r"bench host bench1 cannot serve r1's endpoints for "
                                         r"lease epoch 1: ser2net on port 7400 did not start"):
        leases.wait_served(lab_dsn, grant, 30)
    done(lease, lab)
    with pytest.raises(leases.LeaseLost, match=r"lease epoch 1 ended before bench host bench1 "
                                               r"served it"):
        leases.wait_served(lab_dsn, grant, 30)


HOLDER = """
import sys, time
from hil.lab import leases
lease = leases.acquire(sys.argv[1], leases.Selector("raspberrypi3"), ttl=float(sys.argv[2]),
                       holder="doomed")
print(lease.grants[0].rig, lease.grants[0].epoch, flush=True)
time.sleep(600)
"""


def test_a_sigkilled_holder_frees_its_rig_through_cleaning_in_ttl_plus_renewal(
        lab: Connection, lab_dsn: str) -> None:
    ttl = 3.0
    add_rigs(lab, ["r1"])
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, lab_dsn, str(ttl)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        rig, epoch = proc.stdout.readline().split()
        time.sleep(ttl / 3 + 0.2)  # let it renew once: death comes mid-lease, not at grant
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    cleaned: list[leases.Grant] = []
    with bench_host(lab_dsn, "bench1", cleaned, interval=ttl / 3):
        lease = leases.acquire(lab_dsn, RPI3, ttl=ttl, queue_timeout=3 * ttl)
        back = time.monotonic() - killed
    assert lease.grants[0].rig == rig and lease.grants[0].epoch == int(epoch) + 1
    assert [(g.rig, g.epoch) for g in cleaned] == [(rig, int(epoch))]
    assert back <= ttl + ttl / 3 + 0.5, f"rig back after {back:.1f}s"
    row = lab.execute("SELECT outcome FROM jobs WHERE rig = %s", (rig,)).fetchone()
    assert row is not None and row["outcome"] == "lease expired"
    done(lease, lab)
