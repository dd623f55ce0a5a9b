"""``hil lab ...``: set up the lab database, register rigs, see and steer the pool."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from hil.errors import ConfigError
from hil.lab import db, leases, schema
from hil.lab.checks import Checker, Policy, policy_from
from hil.lab.db import Connection
from hil.lab.health import set_health


def add_commands(sub: Any) -> None:
    lab = sub.add_parser("lab", help="the lab database: a pool of rigs leased by many jobs")
    cmds = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = cmds.add_parser(name, help=help)
        p.add_argument("--db", help=f"the lab database's DSN [env {db.DB_ENV}]")
        p.set_defaults(func=func)
        return p

    command("init", "create or migrate the schema (safe to repeat)", cmd_init)
    p = command("register", "add or update rigs on a bench host from their rig files",
                cmd_register)
    p.add_argument("--host", required=True, help="the bench host the rigs are wired to")
    p.add_argument("--label", action="append", default=[], help="an extra label (repeatable)")
    p.add_argument("rigs", nargs="+", help="rig names or rig files")
    command("status", "rigs, leases, queue, health and last job", cmd_status)
    p = command("maintenance", "take a rig out of scheduling (or --off: back, unknown)",
                cmd_maintenance)
    p.add_argument("rig")
    p.add_argument("--off", action="store_true", help="end maintenance: the rig is unknown and "
                   "takes a health check before its next job")
    p = command("release", "end a rig's lease (compare-and-set on its epoch)", cmd_release)
    p.add_argument("rig")
    p.add_argument("--epoch", type=int, required=True, help="the lease's epoch (hil lab status)")
    p = command("history", "a rig's health changes and jobs", cmd_history)
    p.add_argument("rig")
    p = command("matrix", "a release's results: device type x suite, the jobs that passed, "
                "failed or met an infrastructure error (from the job records)", cmd_matrix)
    p.add_argument("release", help="as the sessions named it (pytest --lab-release)")
    p = command("check", "run a rig's health check: good if COMMAND succeeds, else bad",
                cmd_check)
    p.add_argument("rig")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the rig")
    p.add_argument("argv", nargs="+", metavar="COMMAND", help="run with HIL_RIG set to the "
                   "rig's file, e.g. -- pytest suites/smoke")
    p = command("host", "run on a bench host: heartbeat, and clean its rigs after each lease "
                "(power off, mux released through their drivers)", cmd_host)
    p.add_argument("name")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--once", action="store_true", help="one heartbeat and cleaning pass")
    _check_options(p)
    p = command("agent", "run on a bench host: register its rigs, heartbeat, clean, and serve "
                "each leased rig's console (ser2net), power (pdudaemon) and SSH to the lab",
                cmd_agent)
    p.add_argument("name", help="this bench host's name in the lab")
    p.add_argument("--address", required=True, help="this host's address as sessions reach it")
    p.add_argument("--port-base", type=int, default=7400, help="the first of three TCP ports "
                   "per rig (console, pdudaemon, SSH), rigs in name order")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--label", action="append", default=[], help="an extra label (repeatable)")
    p.add_argument("rigs", nargs="*", help="rig names or files, right after NAME (default: "
                   "every rig in ./rigs that can be served)")
    p.add_argument("--ssh-user", help="serve each rig's SD mux and flashing over this host's "
                   "SSH server: the lab's login here (sessions need its key)")
    p.add_argument("--ssh-port", type=int, default=22, help="this host's SSH port")
    p.add_argument("--ssh-host-key", metavar="FILE", help="this host's public key file "
                   "(/etc/ssh/ssh_host_ed25519_key.pub): sessions check it; else they check "
                   "their known_hosts")
    _check_options(p)
    for name, help in (("mux", "switch a served rig's SD mux (host, dut, off) or print its "
                        "position (status)"),
                       ("flash", "write the image on stdin to a served rig's card")):
        p = command(name, f"on a bench host, run by a session over SSH: {help}; refused "
                    "unless EPOCH is the rig's live lease", cmd_bench)
        p.add_argument("rig")
        p.add_argument("--epoch", type=int, required=True, help="the session's lease")
        if name == "mux":
            p.add_argument("position", choices=("host", "dut", "off", "status"))
        p.add_argument("--agent", metavar="SOCKET", help="the agent's control socket "
                       "[env HIL_LAB_AGENT]")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds for the agent "
                       "to switch the mux or find the card")


def _check_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--health-check", metavar="COMMAND", help="run this health check (with "
                   "HIL_RIG naming the rig's file; a shell-quoted command line) on every rig "
                   "of the host that is unknown, before it takes another job")
    p.add_argument("--check-every-jobs", type=int, metavar="N", help="check a good rig again "
                   "after N jobs")
    p.add_argument("--check-every-hours", type=float, metavar="H", help="check a good rig "
                   "again after H hours")


def _policy(args: argparse.Namespace) -> Policy | None:
    if (args.check_every_jobs or args.check_every_hours) and not args.health_check:
        raise ConfigError("--check-every-jobs and --check-every-hours need --health-check "
                          "COMMAND", key="--health-check")
    for key in ("check_every_jobs", "check_every_hours"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"must be positive, got {getattr(args, key)}",
                              key="--" + key.replace("_", "-"))
    return policy_from(shlex.split(args.health_check) if args.health_check else None,
                       args.check_every_jobs, args.check_every_hours)


def _open(args: argparse.Namespace) -> Connection:
    return db.connect(db.dsn_from(args.db))


def cmd_init(args: argparse.Namespace) -> int:
    with _open(args) as conn:
        before, after = schema.migrate(conn)
    print(f"lab database at schema version {after}" +
          (f" (was {before})" if before != after else " (up to date)"))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from hil.lab.rigs import register

    with _open(args) as conn:
        for cfg in register(conn, args.host, args.rigs, args.label):
            print(f"{cfg.name}: {cfg.device_type.slug} on {args.host}")
    return 0


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    with _open(args) as conn:
        leases.reap(conn)
        rigs = conn.execute("""
            SELECT r.name AS rig, r.device_type, r.host, CASE WHEN h.last_seen > now() - h.timeout
                   THEN 'up' ELSE 'DOWN' END AS host_up, r.health, r.state, r.epoch,
                   l.holder, round(extract(epoch FROM l.expires_at - now())) AS expires_in,
                   (SELECT j.outcome || ' ' || to_char(j.ended_at, 'YYYY-MM-DD HH24:MI')
                    FROM jobs j WHERE j.rig = r.name ORDER BY j.id DESC LIMIT 1) AS last_job,
                   array_to_string(r.labels, ',') AS labels
            FROM rigs r JOIN bench_hosts h ON h.name = r.host
            LEFT JOIN leases l ON l.rig = r.name AND l.ended_at IS NULL
            ORDER BY r.device_type, r.name""").fetchall()
        queue = conn.execute("""
            SELECT id, priority, holder, count, device_type,
                   array_to_string(labels, ',') AS labels,
                   round(extract(epoch FROM now() - created_at)) AS waited,
                   round(extract(epoch FROM deadline - now())) AS deadline_in
            FROM lease_requests WHERE state = 'waiting' ORDER BY priority DESC, id""").fetchall()
    _table(rigs, ["rig", "device_type", "host", "host_up", "health", "state", "epoch", "holder",
                  "expires_in", "last_job", "labels"])
    print(f"\nqueue: {len(queue)} waiting")
    if queue:
        _table(queue, ["id", "priority", "holder", "count", "device_type", "labels", "waited",
                       "deadline_in"])
    return 0


def cmd_maintenance(args: argparse.Namespace) -> int:
    with _open(args) as conn, conn.transaction():
        new = "unknown" if args.off else "maintenance"
        old = set_health(conn, args.rig, new, "maintenance ended by hand" if args.off
                         else "maintenance set by hand")
    print(f"{args.rig}: {old} -> {new}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    with _open(args) as conn:
        leases.release(conn, args.rig, args.epoch, by=leases.holder_name())
    print(f"{args.rig}: lease epoch {args.epoch} released; the rig is cleaning")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with _open(args) as conn:
        rows = conn.execute("""
            SELECT at, 'health' AS what, old || ' -> ' || new || ': ' || reason AS detail
            FROM health_events WHERE rig = %(rig)s
            UNION ALL
            SELECT ended_at, 'job', 'epoch ' || epoch || ' ' || purpose || ' by ' || holder
                   || ': ' || outcome || ' (' || round(extract(epoch FROM ended_at - started_at))
                   || 's)'
            FROM jobs WHERE rig = %(rig)s
            ORDER BY 1""", {"rig": args.rig}).fetchall()
    for r in rows:
        print(f"{r['at']:%Y-%m-%d %H:%M:%S}  {r['what']:6}  {r['detail']}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    with _open(args) as conn:
        rows = conn.execute("""
            SELECT r.device_type, s.key AS suite, s.value AS outcome, count(*) AS n
            FROM jobs j JOIN rigs r ON r.name = j.rig, jsonb_each_text(j.suites) s
            WHERE j.release = %s AND j.purpose = 'job'
            GROUP BY 1, 2, 3""", (args.release,)).fetchall()
    if not rows:
        print(f"no job records for release {args.release!r} (sessions name it with "
              "--lab-release)")
        return 1
    counts = {(r["device_type"], r["suite"], r["outcome"]): int(r["n"]) for r in rows}
    suites = sorted({str(r["suite"]) for r in rows})
    table = [{"device_type": dt, **{suite: ", ".join(
        f"{counts[dt, suite, o]} {o}" for o in leases.OUTCOMES if (dt, suite, o) in counts)
        for suite in suites}} for dt in sorted({str(r["device_type"]) for r in rows})]
    print(f"release {args.release}: jobs by device type and suite")
    _table(table, ["device_type", *suites])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from hil.lab.pool import health_check

    passed = health_check(db.dsn_from(args.db), args.rig, args.argv, wait=args.wait)
    print(f"{args.rig}: health check {'passed: good' if passed else 'failed: bad'}")
    return 0 if passed else 1


def cmd_host(args: argparse.Namespace) -> int:
    from hil.lab.host import serve
    from hil.lab.rigs import power_down

    policy = _policy(args)
    checker = Checker(db.dsn_from(args.db), args.name, policy) if policy else None
    try:
        serve(db.dsn_from(args.db), args.name, power_down, interval=args.interval,
              once=args.once, each_pass=checker)
    finally:
        if checker is not None:
            checker.stop(cancel=not args.once)  # --once: the checks it started run to the end
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    import contextlib
    import signal

    from hil.config import list_rigs
    from hil.lab.agent import Ports, SshAccess, servable, serve

    rigs = args.rigs or [str(p) for p in list_rigs() if servable(p)]
    if not rigs:
        print("no rig to serve: name rig files, or put servable ones in ./rigs")
        return 2

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    ssh = None
    if args.ssh_user:
        key = None
        if args.ssh_host_key:
            try:
                key = " ".join(Path(args.ssh_host_key).read_text().split()[:2])
            except OSError as exc:
                raise ConfigError(f"cannot read it: {exc.strerror}", file=args.ssh_host_key,
                                  key="--ssh-host-key") from None
        ssh = SshAccess(args.ssh_user, args.ssh_port, key)
    signal.signal(signal.SIGTERM, stop)  # a service stop ends as Ctrl-C: rigs off, daemons gone
    with contextlib.suppress(KeyboardInterrupt):
        serve(db.dsn_from(args.db), args.name, rigs,
              Ports(args.address, args.port_base), labels=args.label,
              interval=args.interval, checks=_policy(args), ssh=ssh)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import os

    from hil.lab.benchops import AGENT_ENV, run

    return run(args.agent or os.environ.get(AGENT_ENV), args.rig, args.epoch,
               getattr(args, "position", None), args.timeout)
