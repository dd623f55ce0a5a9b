"""The bench commands: ``hil power|console|mux|ssh|boot|lock|unlock RIG``.

Each runs its operation (``hil.bench.ops``) in the process holding the rig for the user's
``hil lock`` if there is one (``hil.bench.server``), else in its own process with the rig's
lock taken for the command's duration (a pytest session's lock: either fails at once naming
the other). A command that ends well leaves the board as it set it; Ctrl-C or SIGTERM leaves
it powered off, the mux released and the lock free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

from hil.bench import ops, server
from hil.bench.ui import TerminalUi, Ui
from hil.cache import runtime_dir
from hil.config import RigConfig, load_rig
from hil.errors import HilError, InfraError
from hil.lock import RigLock
from hil.session import HilSession, Options

UNLOCK_TIMEOUT = 120.0  # the holder powers off and closes every part first


def add_commands(sub: Any) -> None:
    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        p.add_argument("rig", help="rig name (a file in --rigs-dir or ./rigs) or rig file")
        p.add_argument("--rigs-dir")
        p.add_argument("--wait", type=float, default=0.0,
                       help="seconds to wait for a rig someone else holds (default: fail at once)")
        p.set_defaults(func=func)
        return p

    p = command("power", "switch the board's power, or read it back", cmd_power)
    p.add_argument("action", choices=("on", "off", "cycle", "status"))
    command("console", "an interactive terminal on the board's console "
            f"({ops.EXIT_KEY_NAME} exits)", cmd_console)
    p = command("mux", "switch the SD card to the host or the board, or read it back", cmd_mux)
    p.add_argument("action", choices=("host", "dut", "status"))
    p = command("ssh", "log in to the board over SSH, or run a command there", cmd_ssh)
    p.add_argument("remote", nargs="*", metavar="-- CMD", help="a command to run (after --)")
    p.add_argument("--timeout", type=float, help="seconds for the command "
                   "(default: the rig's timeouts.command)")
    p = command("boot", "flash, power on, wait for a shell, and leave the board up", cmd_boot)
    p.add_argument("--image", help="image to flash (default: the rig file's 'image:'; "
                   "'refos' builds the reference OS)")
    p.add_argument("--no-flash", action="store_true", help="boot what the board has now")
    command("lock", "hold the rig until `hil unlock` (your own bench commands still work)",
            cmd_lock)
    command("unlock", "free a rig you locked (powers it off, releases the mux)", cmd_unlock)


# --- where an operation runs --------------------------------------------------------------------

def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _holder_needed(session: HilSession) -> str:
    """Why the board cannot outlive this command, or ""."""
    cfg = session.config
    if cfg.emulator:
        from hil.emu.bench import running_elsewhere

        if running_elsewhere(session.runtime) is None:
            return "its hardware is emulated and no process runs it"
    if session.rig is not None and getattr(session.rig.power, "in_process", False):
        return "its board is a process (QEMU) that ends with the command"
    return ""


@contextlib.contextmanager
def own_session(cfg: RigConfig, wait: float, what: str) -> Iterator[HilSession]:
    """The rig locked and opened for one command; left as the command set it if it ends well,
    else powered off with the mux released. The lock is free after it either way."""
    signal.signal(signal.SIGTERM, _sigterm)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # the steps are shown (not -v)
        logging.getLogger().setLevel(logging.WARNING)
    session = HilSession(cfg, Options(flash=False, rig_wait=wait))
    session.lock.hint = " (--wait=SECONDS to wait for it)"
    ok = False
    try:
        why = _holder_needed(session)  # before open, which would start emulated hardware
        session.open(what)
        why = why or _holder_needed(session)
        if why:
            raise HilError(f"rig {cfg.name}: {why}: `hil lock {cfg.name}` first (the lock's "
                           f"holder keeps the board, and runs your commands on it)")
        yield session
        ok = True
    finally:
        session.close(leave_up=ok)


def _send(conn: socket.socket, **message: Any) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _answers(conn: socket.socket, ui: Ui, rig: str) -> dict[str, Any]:
    """Show the holder's reports until its answer (``rc``, with what came with it)."""
    for raw in conn.makefile("rb"):
        msg = json.loads(raw)
        if "line" in msg:
            ui.line(msg["line"])
        elif "output" in msg:
            ui.output(msg["output"], err=msg.get("err", False))
        elif "begin" in msg:
            ui.begin(msg["begin"])
        elif "end" in msg:
            ui.end(msg["end"], msg["ok"], msg["seconds"])
        elif "error" in msg:
            raise server.remote_error(msg["error"], msg.get("kind", "hil"))
        elif "rc" in msg:
            return msg  # type: ignore[no-any-return]
    raise InfraError("the process holding the rig for `hil lock` went away (its log: "
                     f"{runtime_dir('rigs', rig) / 'bench-holder.log'})", part="lock", rig=rig)


def run_op(args: argparse.Namespace, op: str, params: dict[str, Any]) -> int:
    cfg = load_rig(args.rig, args.rigs_dir)
    ui = TerminalUi()
    conn = server.connect(cfg.name)
    if conn is not None:
        with conn:
            _send(conn, op=op, args=params)
            return int(_answers(conn, ui, cfg.name)["rc"])
    with own_session(cfg, args.wait, f"hil {op}") as session:
        return ops.run(session, op, params, ui)


# --- the commands -------------------------------------------------------------------------------

def cmd_power(args: argparse.Namespace) -> int:
    return run_op(args, "power", {"action": args.action})


def cmd_mux(args: argparse.Namespace) -> int:
    return run_op(args, "mux", {"action": args.action})


def cmd_boot(args: argparse.Namespace) -> int:
    return run_op(args, "boot", {"image": args.image, "flash": not args.no_flash})


def cmd_ssh(args: argparse.Namespace) -> int:
    if args.remote:
        return run_op(args, "ssh", {"command": " ".join(args.remote), "timeout": args.timeout})
    cfg = load_rig(args.rig, args.rigs_dir)
    conn = server.connect(cfg.name)
    if conn is not None:
        with conn:
            _send(conn, op="ssh-argv")
            argv = _answers(conn, TerminalUi(), cfg.name)["argv"]
        return subprocess.call(argv)
    with own_session(cfg, args.wait, "hil ssh") as session:
        return subprocess.call(ops.ssh_argv(session))


@contextlib.contextmanager
def _raw_terminal() -> Iterator[None]:
    """Keys go to the board as typed (Ctrl-C included) while the console is open."""
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_out(data: bytes) -> None:
    os.write(sys.stdout.fileno(), data)


def _banner(rig: str, log_path: str) -> None:
    print(f"rig {rig}: console open ({ops.EXIT_KEY_NAME} exits); the capture goes on in "
          f"{log_path}", flush=True)


def cmd_console(args: argparse.Namespace) -> int:
    cfg = load_rig(args.rig, args.rigs_dir)
    conn = server.connect(cfg.name)
    if conn is None:
        with own_session(cfg, args.wait, "hil console") as session:
            assert session.rig is not None
            log_path = str(session.rig.log.path)
            _banner(cfg.name, log_path)
            with _raw_terminal():
                ops.console(session.rig, lambda: os.read(sys.stdin.fileno(), 4096), _write_out)
    else:
        with conn:
            _send(conn, op="console")
            log_path = json.loads(server.read_line(conn) or b"{}").get("console", "")
            _banner(cfg.name, log_path)
            with _raw_terminal():
                _relay(conn)
    print(f"\nrig {cfg.name}: console closed; its log: {log_path}", flush=True)
    return 0


def _relay(conn: socket.socket) -> None:
    """The terminal to the holder's console and back, until the holder closes it (the exit
    key, which it sees in the keys)."""
    keys = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([conn, keys] if keys >= 0 else [conn], [], [])
        if conn in readable:
            data = conn.recv(65536)
            if not data:
                return
            _write_out(data)
        if keys in readable:
            typed = os.read(keys, 4096)
            if typed:
                conn.sendall(typed)
            else:  # the end of scripted input: the holder ends the console
                conn.shutdown(socket.SHUT_WR)
                keys = -1


def cmd_lock(args: argparse.Namespace) -> int:
    cfg = load_rig(args.rig, args.rigs_dir)
    lock = RigLock(cfg.name)
    conn = server.connect(cfg.name)
    if conn is not None:
        conn.close()
        print(f"rig {cfg.name} is already locked by you ({lock.holder()})")
        return 0
    pid = server.spawn(cfg, args.wait)
    print(f"rig {cfg.name} locked by you (held by pid {pid}); your bench commands work on it, "
          f"others' and pytest sessions get told who holds it; `hil unlock {cfg.name}` frees it")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    cfg = load_rig(args.rig, args.rigs_dir)
    lock = RigLock(cfg.name)
    conn = server.connect(cfg.name)
    if conn is None:
        if not lock.free():
            raise HilError(f"rig {cfg.name} is not locked by you: it is in use by "
                           f"{lock.holder()}")
        print(f"rig {cfg.name} is not locked")
        return 0
    with conn:
        conn.settimeout(UNLOCK_TIMEOUT)
        _send(conn, op="unlock")
        try:
            _answers(conn, TerminalUi(), cfg.name)
        except TimeoutError:
            raise InfraError(f"the lock's holder did not close the rig in {UNLOCK_TIMEOUT:.0f}s "
                             f"(its log: {runtime_dir('rigs', cfg.name) / 'bench-holder.log'})",
                             part="lock", rig=cfg.name) from None
    if not lock.free():  # the holder has closed everything before its answer
        raise InfraError(f"the lock is still held after the unlock, by {lock.holder()}",
                         part="lock", rig=cfg.name)
    print(f"rig {cfg.name} unlocked: powered off, mux released, lock free")
    return 0
