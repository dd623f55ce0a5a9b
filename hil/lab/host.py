"""A bench host's side of the pool: heartbeat (its rigs stay schedulable), reap leases the
database's clock has ended, and clean its rigs after each lease as soon as one needs it (woken
by the database's notification, not by polling). The lab agent (``hil.lab.agent``) runs this
same loop, with a pass of its own that follows its rigs' leases."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg

from hil.errors import InfraError
from hil.lab import db, leases
from hil.lab.health import heartbeat

log = logging.getLogger(__name__)
# a grant is announced here, apart from ``hil_lab``: only bench hosts care, and waking every
# waiter in the queue at each grant would be a thundering herd
GRANTED = "hil_lab_grant"
# called at every pass, before cleaning, with the loop's connection; with None while the
# database cannot be reached
Pass = Callable[[db.Connection | None], None]


def serve(dsn: str, host: str, cleaner: leases.Cleaner, *, interval: float = 10.0,
          stop: threading.Event | None = None, once: bool = False,
          each_pass: Pass | None = None) -> None:
    """Run until ``stop`` is set (or one pass with ``once``). The host counts as down once
    three heartbeats in a row are missed."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            with db.connect(dsn, autocommit=True) as conn:
                conn.execute("LISTEN hil_lab")
                if each_pass is not None:
                    conn.execute(f"LISTEN {GRANTED}".encode())
                beat = -interval
                while not stop.is_set():
                    now = time.monotonic()  # only spaces the beats: expiry is the store's
                    if now - beat >= interval:
                        heartbeat(conn, host, timeout=3 * interval)
                        beat = now
                    leases.reap(conn)
                    if each_pass is not None:
                        each_pass(conn)
                    for grant in leases.cleaning(conn, host):
                        ok = leases.clean(conn, grant, cleaner)
                        log.info("%s: cleaned after lease epoch %d%s", grant.rig, grant.epoch,
                                 "" if ok else " (failed: the rig is now unknown)")
                    if once:
                        return
                    for _ in conn.notifies(timeout=interval / 3, stop_after=1):
                        pass
        except (psycopg.Error, InfraError) as exc:
            log.error("bench host %s: %s", host, db.safe_dsn(str(exc)))
            if each_pass is not None:
                each_pass(None)
            if once or stop.wait(interval):
                return
