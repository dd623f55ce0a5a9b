#!/usr/bin/env python3
"""Lab simulation against a real PostgreSQL: many holders leasing rigs of a pool at once, with
holders that die mid-lease, bench hosts that go silent and rigs that keep failing.

Starts a throwaway server (``hil.lab.scratch``) unless ``--db`` is given, registers ``--rigs``
rigs of three device types on ``--hosts`` bench hosts (each served by the real bench-host loop,
``hil.lab.host.serve``), then runs ``--jobs`` jobs from ``--holders`` threads, each through
``hil.lab.leases.acquire``/``release`` as pytest does. It counts:

- double allocations: a rig granted while a live holder still holds it (in the holders' own
  view, and in the database: two leases of one rig whose lifetimes overlap); must be 0;
- stale-epoch operations accepted: a dead holder "waking up" (a paused VM, a partition healed)
  and releasing or renewing with its old epoch; must be 0;
- reclaim time per death: death until the rig's bench host cleaned it, against TTL + renewal;
- acquire latency p50/p99, queue wait by priority, rig utilisation, and jobs wasted on a rig
  that fails before its health check quarantines it (bad).

    .venv/bin/python bench/lab_sim.py [--jobs 500 --rigs 100 --hosts 5 --holders 40 --ttl 1.5]
                                      [--store-rtt 20]

``--store-rtt MS`` puts the store that far away: every connection goes through a relay on
loopback that holds each chunk, in each direction, for half the round trip (a lab whose
database is in another building or cloud region), in order, as a slow network does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hil.errors import InfraError
from hil.lab import db, leases, scratch
from hil.lab.health import check_done, heartbeat
from hil.lab.host import serve
from hil.lab.leases import Grant, Selector

TYPES = (("raspberrypi3", 0.5), ("beaglebone-black", 0.3), ("intel-nuc", 0.2))


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: dict[str, str] = field(default_factory=dict)  # rig -> holder, as the holders see it
    double: int = 0
    stale_accepted: int = 0
    stale_tried: int = 0
    latency: list[float] = field(default_factory=list)
    wait_by_priority: dict[int, list[float]] = field(default_factory=dict)
    deaths: dict[tuple[str, int], float] = field(default_factory=dict)  # (rig, epoch) -> when
    death_db: dict[tuple[str, int], float] = field(default_factory=dict)  # ... by the store
    lost: int = 0  # live holders whose lease the store ended (renewals starved of CPU)
    cleaned: dict[tuple[str, int], float] = field(default_factory=dict)
    jobs: int = 0
    infra_on_flaky: dict[str, int] = field(default_factory=dict)
    queue_timeouts: int = 0


def pick_type(rng: random.Random) -> str:
    return rng.choices([t for t, _ in TYPES], [w for _, w in TYPES])[0]


def holder(n: int, args: argparse.Namespace, dsn: str, tally: Tally, flaky: set[str],
           budget: Iterator[int], rng: random.Random) -> None:
    with db.connect(dsn) as conn:
        for job in budget:
            priority = 5 if rng.random() < 0.2 else 0
            t0 = time.monotonic()
            try:
                lease = leases.acquire(dsn, Selector(pick_type(rng)), holder=f"h{n}.{job}",
                                       priority=priority, ttl=args.ttl, queue_timeout=30)
            except InfraError:
                with tally.lock:
                    tally.queue_timeouts += 1
                continue
            waited = time.monotonic() - t0
            g = lease.grants[0]
            with tally.lock:
                tally.latency.append(waited)
                tally.wait_by_priority.setdefault(priority, []).append(waited)
                if g.rig in tally.live:
                    tally.double += 1
                tally.live[g.rig] = lease.holder
                tally.jobs += 1
            time.sleep(rng.uniform(0.05, 0.4))  # the job's work on the rig
            if rng.random() < args.death_rate:  # SIGKILL: no release, no more renewals
                lease.stop_heartbeat()
                at = conn.execute("SELECT extract(epoch FROM clock_timestamp()) AS t").fetchone()
                conn.commit()
                with tally.lock:
                    tally.death_db[(g.rig, g.epoch)] = float(at["t"]) if at else 0.0
                    tally.live.pop(g.rig, None)
                    tally.deaths[(g.rig, g.epoch)] = time.monotonic()
                threading.Timer(3 * args.ttl, wake_up, (conn.info.dsn, lease, tally)).start()
                continue
            infra = g.rig in flaky
            with tally.lock:
                tally.live.pop(g.rig, None)
                if infra:
                    tally.infra_on_flaky[g.rig] = tally.infra_on_flaky.get(g.rig, 0) + 1
            try:
                lease.release("infra" if infra else "passed")
            except leases.StaleEpoch:
                with tally.lock:
                    tally.lost += 1


def wake_up(dsn: str, lease: leases.Lease, tally: Tally) -> None:
    """A holder presumed dead comes back and acts on its old epoch: it must be refused."""
    g = lease.grants[0]
    with db.connect(dsn) as conn:
        for op in (lambda: lease.renew(conn), lambda: leases.release(conn, g.rig, g.epoch)):
            try:
                op()
            except InfraError:
                conn.rollback()
                accepted = False
            else:
                accepted = True
            with tally.lock:
                tally.stale_tried += 1
                tally.stale_accepted += accepted


def health_checker(dsn: str, flaky: set[str], stop: threading.Event) -> None:
    """Runs the health check of every unknown rig: a flaky rig fails it and goes bad."""
    with db.connect(dsn) as conn:
        while not stop.wait(0.2):
            rows = conn.execute("SELECT name, device_type FROM rigs WHERE health = 'unknown' "
                                "AND state = 'idle'").fetchall()
            conn.commit()
            for r in rows:
                try:
                    lease = leases.acquire(dsn, Selector(r["device_type"], rig=r["name"]),
                                           purpose="health", queue_timeout=0.5, ttl=5)
                except InfraError:
                    continue
                lease.release()
                check_done(conn, r["name"], passed=r["name"] not in flaky, detail="smoke failed")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace, dsn: str) -> int:
    rng = random.Random(args.seed)
    hosts = [f"bench{i}" for i in range(1, args.hosts + 1)]
    rigs = [(f"rig{i:03}", pick_type(rng), hosts[i % len(hosts)]) for i in range(args.rigs)]
    flaky = {name for name, _, _ in rng.sample(rigs, args.flaky)}
    host_timeout = 3 * args.host_interval
    with db.connect(dsn) as conn:
        for h in hosts:
            heartbeat(conn, h, host_timeout)
        with conn.transaction():
            for name, dtype, h in rigs:
                conn.execute("INSERT INTO rigs (name, device_type, host, health, config) "
                             "VALUES (%s, %s, %s, 'good', '')", (name, dtype, h))
    tally = Tally()

    def cleaner(g: Grant) -> None:
        with tally.lock:
            tally.cleaned.setdefault((g.rig, g.epoch), time.monotonic())

    stops = {h: threading.Event() for h in hosts}
    host_threads: dict[str, threading.Thread] = {}

    def start_host(h: str) -> None:
        stops[h] = threading.Event()
        host_threads[h] = threading.Thread(target=serve, args=(dsn, h, cleaner), kwargs={
            "interval": args.host_interval, "stop": stops[h]}, daemon=True)
        host_threads[h].start()

    for h in hosts:
        start_host(h)
    stop_checks = threading.Event()
    checker = threading.Thread(target=health_checker, args=(dsn, flaky, stop_checks),
                               daemon=True)
    checker.start()
    outages: list[tuple[str, float, float]] = []  # host, down from, back at

    def outage_loop() -> None:  # a host goes silent for a while, now and then
        while not stop_checks.wait(rng.uniform(2, 4)):
            h = rng.choice(hosts)
            stops[h].set()
            host_threads[h].join()
            down = time.monotonic()
            stop_checks.wait(2 * host_timeout)
            outages.append((h, down, time.monotonic()))
            start_host(h)
            if stop_checks.is_set():
                return

    outage = threading.Thread(target=outage_loop, daemon=True)
    outage.start()
    counter = iter(range(args.jobs))
    lock = threading.Lock()

    def budget() -> Iterator[int]:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            yield n

    t0 = time.monotonic()
    workers = [threading.Thread(target=holder, args=(i, args, dsn, tally, flaky, budget(),
                                                     random.Random(args.seed + i)))
               for i in range(args.holders)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - t0
    stop_checks.set()
    outage.join()
    # let the last deaths be reclaimed and cleaned, and every wake-up happen
    end = time.monotonic() + 3 * args.ttl + 2
    for h in hosts:
        if not host_threads[h].is_alive():
            start_host(h)
    while time.monotonic() < end and (
            any(k not in tally.cleaned for k in tally.deaths)
            or tally.stale_tried < 2 * len(tally.deaths)):
        time.sleep(0.1)
    for h in hosts:
        stops[h].set()
    for h in hosts:  # before the server stops under them
        host_threads[h].join()
    checker.join()
    with db.connect(dsn) as conn:
        row = conn.execute("""
            SELECT count(*) AS n FROM leases a JOIN leases b ON a.rig = b.rig AND a.id < b.id
            WHERE b.granted_at < coalesce(a.ended_at, 'infinity')""").fetchone()
        db_double = int(row["n"]) if row else -1
        row = conn.execute("""SELECT coalesce(sum(extract(epoch FROM
            least(coalesce(ended_at, now()), now()) - granted_at)), 0) AS busy FROM leases
            WHERE purpose = 'job'""").fetchone()
        busy = float(row["busy"]) if row else 0.0
        bad = {r["name"] for r in conn.execute("SELECT name FROM rigs WHERE health = 'bad'")}
        ended = {(r["rig"], int(r["epoch"])): float(r["t"]) for r in conn.execute(
            "SELECT rig, epoch, extract(epoch FROM ended_at) AS t FROM leases "
            "WHERE ended_at IS NOT NULL")}
    reaped = [ended[k] - t for k, t in tally.death_db.items() if k in ended]
    reclaim = [tally.cleaned[k] - t for k, t in tally.deaths.items() if k in tally.cleaned]
    host_of = {name: h for name, _, h in rigs}
    late = [k for k, t in tally.deaths.items()
            if k in tally.cleaned and tally.cleaned[k] - t > args.ttl + args.ttl / 3]
    late_host_down = [k for k in late if any(
        h == host_of[k[0]] and down < tally.cleaned[k] and back > tally.deaths[k]
        for h, down, back in outages)]
    bound = args.ttl + args.ttl / 3
    print(f"command: {' '.join(sys.argv)}")
    print(f"{args.jobs} jobs, {args.rigs} rigs ({', '.join(t for t, _ in TYPES)}) on "
          f"{args.hosts} hosts, {args.holders} holders, TTL {args.ttl}s (renewal every "
          f"{args.ttl / 3:.2f}s), wall {wall:.1f}s")
    print(f"jobs run: {tally.jobs}, queue timeouts: {tally.queue_timeouts}")
    print(f"double allocations: {tally.double} (holders' view), {db_double} (database)")
    print(f"stale-epoch operations accepted: {tally.stale_accepted} of {tally.stale_tried}")
    print(f"holder deaths: {len(tally.deaths)}; lease ended by the store after a death: "
          f"median {pct(reaped, 0.5):.2f}s, max {max(reaped, default=0):.2f}s (TTL + renewal = "
          f"{bound:.2f}s; over it: {sum(r > bound for r in reaped)})")
    print(f"rig cleaned and idle after a death: {len(reclaim)} of {len(tally.deaths)}, median "
          f"{pct(reclaim, 0.5):.2f}s, max {max(reclaim, default=0):.2f}s (over TTL + renewal: "
          f"{len(late)}, of which {len(late_host_down)} on a bench host that was down meanwhile)")
    print(f"live leases lost (renewal late, release refused): {tally.lost}")
    print(f"acquire latency: p50 {pct(tally.latency, 0.5) * 1000:.0f} ms, p99 "
          f"{pct(tally.latency, 0.99) * 1000:.0f} ms")
    for prio, waits in sorted(tally.wait_by_priority.items(), reverse=True):
        print(f"queue wait, priority {prio}: n={len(waits)}, mean {statistics.mean(waits):.2f}s, "
              f"p99 {pct(waits, 0.99):.2f}s")
    print(f"host outages: {len(outages)} of {2 * host_timeout:.1f}s "
          f"({', '.join(h for h, _, _ in outages)})")
    print(f"rig utilisation: {100 * busy / (args.rigs * wall):.0f}% of rig-time leased to jobs")
    print(f"flaky rigs: {len(flaky)}, quarantined (bad): {len(bad & flaky)}, good rigs made bad: "
          f"{len(bad - flaky)}; jobs wasted per flaky rig before quarantine: "
          f"{sorted(tally.infra_on_flaky.get(r, 0) for r in flaky)}")
    ok = tally.double == 0 and db_double == 0 and tally.stale_accepted == 0
    return 0 if ok else 1


class Distance:
    """A TCP relay on loopback in front of the store that delays every chunk, each way, by
    half of ``rtt`` seconds, keeping the byte order (a chunk waits for the one before it)."""

    def __init__(self, dsn: str, rtt: float) -> None:
        fields = dict(kv.split("=", 1) for kv in dsn.split())
        self.upstream = (fields["host"], int(fields["port"]))
        self.delay = rtt / 2
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=self.loop.run_until_complete, args=(start(),),
                         daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the store's relay did not start")
        fields["port"] = str(self.port)
        self.dsn = " ".join(f"{k}={v}" for k, v in fields.items())

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self.loop.time() + self.delay, data))
        except OSError:
            pass
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError):
            await sender
            writer.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", help="a lab database to use (default: a throwaway server)")
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--rigs", type=int, default=100)
    p.add_argument("--hosts", type=int, default=5)
    p.add_argument("--holders", type=int, default=40)
    p.add_argument("--ttl", type=float, default=1.5)
    p.add_argument("--host-interval", type=float, default=0.5)
    p.add_argument("--death-rate", type=float, default=0.05)
    p.add_argument("--flaky", type=int, default=3)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--store-rtt", type=float, default=0.0, metavar="MS",
                   help="round trip to the store, added by a relay on loopback")
    args = p.parse_args()

    def far(dsn: str) -> str:
        return Distance(dsn, args.store_rtt / 1000).dsn if args.store_rtt > 0 else dsn

    if args.db:
        return run(args, far(args.db))
    with scratch.server(max_connections=args.holders * 3 + 50) as server:
        return run(args, far(scratch.database(server, "lab_sim")))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
