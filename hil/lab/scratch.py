"""A throwaway PostgreSQL server in a directory of its own, on loopback at a free port: for the
lab's tests and simulation, or to try a lab on one machine. Run as root, it runs the server as
``nobody`` (PostgreSQL refuses root)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from hil.deadline import wait_until
from hil.errors import InfraError
from hil.lab import db

DEBIAN_BIN = Path("/usr/lib/postgresql/15/bin")


def binaries() -> Path | None:
    """Where initdb and postgres are, or None when PostgreSQL is not installed."""
    if (DEBIAN_BIN / "postgres").exists():
        return DEBIAN_BIN
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def _accepts(dsn: str) -> bool:
    try:
        db.connect(dsn, timeout=1).close()
    except InfraError:
        return False
    return True


@contextlib.contextmanager
def server(max_connections: int = 200, listen: Sequence[str] = ()) -> Iterator[str]:
    """Start a server; yields its DSN (user postgres, database postgres, trust on loopback).
    ``listen``: more interfaces (``10.0.1.1/24``) to accept connections on, from their
    subnet, trusted too: bench hosts in a test's network namespaces; they must exist here."""
    pg = binaries()
    if pg is None:
        raise InfraError("PostgreSQL is not installed (apt-get install postgresql)",
                         part=db.PART)
    root = Path(tempfile.mkdtemp(prefix="hil-lab-pg-"))
    as_user: list[str] = []
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                   "--clear-groups"]
    data, log_path = root / "data", root / "server.log"
    addresses = ["127.0.0.1", *(str(ipaddress.ip_interface(i).ip) for i in listen)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([*as_user, str(pg / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True,
                       capture_output=True, timeout=120, cwd=root)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.writelines(f"host all all {ipaddress.ip_interface(i).network} trust\n"
                           for i in listen)
        with log_path.open("wb") as log:
            # durability off: the data dies with the directory anyway
            proc = subprocess.Popen(
                [*as_user, str(pg / "postgres"), "-D", str(data), "-p", str(port),
                 "-k", str(root), "-c", f"listen_addresses={','.join(addresses)}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", f"max_connections={max_connections}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=root)
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        wait_until(lambda: proc is not None and (proc.poll() is not None or _accepts(dsn)), 60,
                   "the throwaway PostgreSQL to accept connections",
                   seen=lambda: log_path.read_text(errors="replace")[-500:])
        if proc.poll() is not None:
            raise InfraError("the throwaway PostgreSQL exited: "
                             + log_path.read_text(errors="replace")[-1000:], part=db.PART)
        yield dsn
    finally:
        if proc is not None:
            # SIGINT, PostgreSQL's fast shutdown: clients are cut off (SIGTERM would wait for
            # every client to leave)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def database(server_dsn: str, name: str) -> str:
    """Create a fresh database on the server and migrate it; returns its DSN."""
    from hil.lab import schema

    with db.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    dsn = server_dsn.replace("dbname=postgres", f"dbname={name}")
    with db.connect(dsn) as conn:
        schema.migrate(conn)
    return dsn
