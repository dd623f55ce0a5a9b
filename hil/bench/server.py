"""``hil lock RIG``: a process that holds the rig (its lock, its parts, a QEMU board, the
emulated hardware) until ``hil unlock RIG``, and runs its owner's bench commands meanwhile.

The rig lock is a ``flock``, which lives as long as the process holding it; so a lock that
persists across commands needs a process, and that process is also the only one that can keep
a QEMU board powered between commands (the board is its child). The owner's later commands
(same user, same host, as labgrid-client's commands work on a place its user acquired) find it
by the lock's record and its socket in the rig's runtime directory, and it runs them with the
same operations (``hil.bench.ops``) a command runs by itself; anyone else gets the lock's
holder. A client that goes away mid-operation (Ctrl-C) leaves the board powered off and the
mux released; the lock stays held until ``hil unlock``.

Protocol: one JSON line per request (``{"op": ..., "args": {...}}``), JSON lines back
(``line``, ``output``, ``begin``/``end`` of a step, then ``rc`` or ``error``); after
``{"op": "console"}`` and its ``{"console": ...}`` answer, raw bytes both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hil import redact
from hil.bench import ops
from hil.cache import runtime_dir
from hil.config import RigConfig, load_rig
from hil.errors import ConfigError, HilError, InfraError
from hil.lock import RigLock
from hil.session import HilSession, Options

log = logging.getLogger(__name__)
WHAT = "hil lock"  # the lock record's "what" for a rig held this way
SOCKET = "bench.sock"
READY_TIMEOUT = 120.0  # the holder's start: the lock, emulated hardware, the parts


def socket_path(rig: str) -> Path:
    return runtime_dir("rigs", rig) / SOCKET


def mine(lock: RigLock) -> bool:
    """The rig is held by ``hil lock`` of this user on this host."""
    info = lock.info()
    return (info.get("what") == WHAT and info.get("user") == getpass.getuser()
            and info.get("host") == socket.gethostname())


def connect(rig: str) -> socket.socket | None:
    """A connection to the holder of ``hil lock RIG``, if this user holds it; else None."""
    if not mine(RigLock(rig)):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path(rig)))
    except OSError:
        sock.close()
        return None  # the holder is gone (its flock with it): the command locks for itself
    return sock


def read_line(conn: socket.socket) -> bytes:
    """One line, byte by byte: what follows it (a console's first keys) stays in the socket."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def error_kind(exc: BaseException) -> str:
    return ("config" if isinstance(exc, ConfigError) else "infra" if isinstance(exc, InfraError)
            else "hil")


class RemoteUi:
    """A ``Ui`` whose reports go to the client as JSON lines."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        with self._lock:
            self.conn.sendall(json.dumps(message).encode() + b"\n")

    def line(self, text: str) -> None:
        self.send(line=redact.text(text))

    def output(self, text: str, *, err: bool = False) -> None:
        self.send(output=redact.text(text), err=err)

    def begin(self, step: str) -> None:
        self.send(begin=step)

    def end(self, step: str, ok: bool, seconds: float) -> None:
        self.send(end=step, ok=ok, seconds=seconds)


class Holder:
    def __init__(self, config: RigConfig, wait: float) -> None:
        self.session = HilSession(config, Options(flash=False, rig_wait=wait))
        self.session.lock.hint = f" (it frees it with `hil unlock {config.name}`)"
        self.path = socket_path(config.name)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Operations run one at a time in the main thread: a QEMU board dies with the thread
        # that started it (PR_SET_PDEATHSIG follows the thread), and this one lives as long as
        # the holder. Consoles run beside them, in their connections' threads. None: unlock.
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.unlock: socket.socket | None = None

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # shut down by an unlock
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def serve(self) -> None:
        threading.Thread(target=self.accept, name="bench-accept", daemon=True).start()
        while (job := self.jobs.get()) is not None:
            job()

    def handle(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[2] != os.getuid():
            conn.close()  # the runtime directory is the user's own; this is a second fence
            return
        ui = RemoteUi(conn)
        try:
            request = json.loads(read_line(conn) or b"{}")
            op, args = request.get("op", ""), request.get("args", {})
            if not op:  # a look whether the holder lives (`hil lock` again)
                conn.close()
                return
            if op == "unlock":
                self.unlock = conn
                self.listener.shutdown(socket.SHUT_RDWR)
                self.jobs.put(None)  # the main thread closes the session after the jobs before
                return
            if op == "console":
                self.console(conn, ui)
            elif op == "ssh-argv":
                ui.send(rc=0, argv=ops.ssh_argv(self.session))
            else:
                self.operation(conn, ui, op, args)
        except (OSError, ValueError) as exc:
            log.warning("client: %s", exc)
        except Exception as exc:
            with contextlib.suppress(OSError):
                ui.send(error=str(exc), kind=error_kind(exc))
        if self.unlock is not conn:
            conn.close()

    def console(self, conn: socket.socket, ui: RemoteUi) -> None:
        rig = self.session.rig
        assert rig is not None
        ui.send(console=str(rig.log.path or ""))
        ops.console(rig, lambda: conn.recv(4096), conn.sendall)

    def operation(self, conn: socket.socket, ui: RemoteUi, op: str, args: dict[str, Any]
                  ) -> None:
        """Have the main thread run ``op`` while this thread watches the connection: the
        client going away before the answer (Ctrl-C) powers the board off and releases the mux
        at once, and again once the operation has given up."""
        done, finished = threading.Event(), threading.Event()
        gone = threading.Event()

        def work() -> None:
            answer: dict[str, Any]
            try:
                answer = {"rc": ops.run(self.session, op, args, ui)}
            except Exception as exc:
                log.info("%s failed: %s", op, exc)
                answer = {"error": str(exc), "kind": error_kind(exc)}
            finally:
                done.set()  # before the answer: the client closes once it has it
            if gone.is_set():
                assert self.session.rig is not None
                self.session.rig.make_safe()  # whatever the operation did after the cut
                self.session.rig.log.mark_alive()
            with contextlib.suppress(OSError):
                ui.send(**answer)
            finished.set()

        self.jobs.put(work)
        with contextlib.suppress(OSError):
            while conn.recv(4096):  # the client sends nothing more: this returns at its close
                pass
        if not done.is_set():
            log.warning("the client of %r went away: powering the board off", op)
            gone.set()
            assert self.session.rig is not None
            self.session.rig.make_safe()
            # ends the operation's waits on the console at once (a boot it awaits)
            self.session.rig.log.mark_lost(f"`hil {op}` was interrupted")
        finished.wait()

    def run(self, ready: Any) -> None:
        """Hold the rig until an unlock or a signal; ``ready`` gets one JSON line at the start."""
        try:
            self.session.open(WHAT)
            self.path.unlink(missing_ok=True)
            self.listener.bind(str(self.path))
            self.listener.listen(8)
        except BaseException as exc:
            self.session.close()
            ready.write(json.dumps({"error": str(exc), "kind": error_kind(exc)}) + "\n")
            ready.flush()
            raise
        ready.write(json.dumps({"ready": os.getpid()}) + "\n")
        ready.flush()
        try:
            self.serve()
        finally:
            self.session.close()  # powered off, mux released, lock free
            self.listener.close()
            self.path.unlink(missing_ok=True)
        if self.unlock is not None:
            with contextlib.suppress(OSError):
                RemoteUi(self.unlock).send(rc=0)
                self.unlock.close()


def spawn(config: RigConfig, wait: float) -> int:
    """Start the holder of ``hil lock`` in the background; returns its pid once it holds the
    rig, or raises what kept it from holding it."""
    log_path = runtime_dir("rigs", config.name) / "bench-holder.log"
    proc = subprocess.Popen([sys.executable, "-m", "hil.bench.server", str(config.source),
                             "--wait", str(wait), "--log", str(log_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            start_new_session=True)  # a Ctrl-C at the terminal is not for it
    assert proc.stdout is not None
    deadline = time.monotonic() + wait + READY_TIMEOUT
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            proc.kill()
            raise InfraError(f"the lock holder did not start in {wait + READY_TIMEOUT:.0f}s "
                             f"(its log: {log_path})", part="lock", rig=config.name)
    first = proc.stdout.readline()
    proc.stdout.close()
    try:
        answer = json.loads(first or b"{}")
    except ValueError:
        answer = {}
    if "ready" in answer:
        return int(answer["ready"])
    proc.wait(timeout=30)
    raise remote_error(answer.get("error") or f"the lock holder exited with {proc.returncode} "
                       f"(its log: {log_path})", answer.get("kind", "infra"))


def remote_error(message: str, kind: str) -> HilError:
    """The error the holder reported, as the kind it was (for ``hil``'s exit codes)."""
    return ConfigError(message) if kind == "config" else InfraError(message) \
        if kind == "infra" else HilError(message)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hil.bench.server")
    p.add_argument("rig")
    p.add_argument("--wait", type=float, default=0.0)
    p.add_argument("--log", type=Path, required=True)
    args = p.parse_args(argv)
    ready = os.fdopen(os.dup(1), "w")
    with args.log.open("ab") as out:  # the client reads stdout only for the ready line
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    redact.mask_log_records()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        holder = Holder(load_rig(args.rig), args.wait)
        holder.run(ready)
    except KeyboardInterrupt:
        log.info("stopped by a signal: the rig is powered off and free")
    except HilError as exc:
        log.error("%s", exc)
        return 1
    finally:
        with contextlib.suppress(OSError):
            ready.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
