"""A throwaway PostgreSQL for the lab tests: one server per session, on loopback at a free
port, run as an unprivileged user (PostgreSQL refuses root); a fresh database per test."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.deadline import wait_until
from hil.lab import db, schema
from hil.lab.db import Connection

BIN = Path("/usr/lib/postgresql/15/bin")


def _pg_bin() -> Path | None:
    if (BIN / "postgres").exists():
        return BIN
    found = shutil.which("initdb") or shutil.which("postgres")
    return Path(found).parent if found else None


def _as_user() -> list[str]:
    if os.getuid() != 0:
        return []
    nobody = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(dsn: str) -> bool:
    try:
        db.connect(dsn, timeout=1).close()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The server's base DSN (database postgres, trust on loopback)."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres) are not installed")
    root = Path(tempfile.mkdtemp(prefix="hil-lab-pg-"))
    data = root / "data"
    if os.getuid() == 0:
        os.chown(root, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    subprocess.run([*_as_user(), str(pg / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True,
                   timeout=120, cwd=root)
    port = _free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [*_as_user(), str(pg / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200",
         "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    try:
        wait_until(lambda: server.poll() is not None or _accepts(dsn), 60,
                   "the throwaway PostgreSQL to accept connections",
                   seen=lambda: (root / "server.log").read_text()[-500:])
        if server.poll() is not None:
            raise RuntimeError("postgres exited: " + (root / "server.log").read_text()[-2000:])
        yield dsn
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab_dsn(pg_server: str) -> str:
    """A fresh, migrated database of its own for one test."""
    name = f"lab_{uuid.uuid4().hex[:12]}"
    with db.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    dsn = pg_server.replace("dbname=postgres", f"dbname={name}")
    with db.connect(dsn) as conn:
        schema.migrate(conn)
    return dsn


@pytest.fixture
def lab(lab_dsn: str) -> Iterator[Connection]:
    with db.connect(lab_dsn) as conn:
        yield conn
