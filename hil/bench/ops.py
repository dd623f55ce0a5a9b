"""The bench commands' operations on an open session (``HilSession.open``): the same ``Rig``,
``Dut`` and session methods a pytest session drives. An operation runs in the command's own
process (which took the rig's lock for its duration) or in the process holding the rig for
``hil lock`` (``hil.bench.server``), and reports through a ``Ui`` either way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from hil import redact
from hil.bench.ui import Ui, step
from hil.errors import ConfigError, HilError, InfraError
from hil.rig import Rig
from hil.session import HilSession

EXIT_KEY = b"\x1d"  # Ctrl-], as telnet and picocom's
EXIT_KEY_NAME = "Ctrl-]"
HUMAN_SHELL = "stty echo 2>/dev/null; PS1='# '; TERM=vt100; export TERM"
QUIET = 0.05  # seconds without console output after which a line in progress (a prompt) is shown


def _parts(session: HilSession) -> Rig:
    assert session.rig is not None and session.dut is not None, "session not open"
    return session.rig


def power_word(rig: Rig) -> str:
    state = rig.power.is_on()
    return "unknown (the switch cannot report)" if state is None else "on" if state else "off"


def cut_power(session: HilSession) -> None:
    """Power off as ``Dut.power_off`` does (which first learns the running OS from its shell,
    to know its next boot); a board this process has no shell on is just switched off."""
    assert session.rig is not None and session.dut is not None
    if session.dut.shell.ready:
        session.dut.power_off()
    else:
        session.rig.power_off()


def power(session: HilSession, action: str, ui: Ui) -> int:
    rig = _parts(session)
    assert session.dut is not None
    if action == "on":
        with step(ui, "power on"):
            rig.power_on()
    elif action == "off":
        with step(ui, "power off"):
            cut_power(session)
    elif action == "cycle":
        with step(ui, f"power cycle ({rig.config.power_off_time:g}s off)"):
            cut_power(session)
            rig.power_on()
    ui.line(f"rig {rig.name}: power {power_word(rig)}")  # read back from the switch
    return 0


def mux(session: HilSession, action: str, ui: Ui) -> int:
    rig = _parts(session)
    assert session.dut is not None
    if rig.sd_mux is None:
        raise ConfigError(f"rig {rig.name} has no 'sd_mux:' to switch", file=str(rig.config.source))
    if action == "host":
        if rig.power.is_on() is not False:
            # a card taken from a running board is a corrupted card; flashing does the same
            with step(ui, "power off first (the card leaves the board)"):
                cut_power(session)
        with step(ui, "sd mux → host"), rig.step("sd mux → host", "sd_mux"):
            rig.sd_mux.to_host()
    elif action == "dut":
        with step(ui, "sd mux → board"), rig.step("sd mux → board", "sd_mux"):
            rig.sd_mux.to_dut()
    ui.line(f"rig {rig.name}: sd mux {rig.sd_mux.state() or 'unknown (cannot report)'}")
    return 0


def _board_up(rig: Rig) -> None:
    if rig.power.is_on() is False:
        raise HilError(f"rig {rig.name}: the board is off (`hil boot {rig.name}` or "
                       f"`hil power {rig.name} on`)")


def ssh(session: HilSession, command: str, timeout: float | None, ui: Ui) -> int:
    """Run ``command`` on the board over SSH (the session's key, the rig's network part);
    returns its exit code."""
    rig = _parts(session)
    assert session.dut is not None
    _board_up(rig)
    result = session.dut.ssh.run(command, timeout or rig.config.timeouts.command, merge=False)
    ui.output(redact.text(result.stdout))
    if result.stderr:
        ui.output(redact.text(result.stderr), err=True)
    return result.exit_code


def ssh_argv(session: HilSession) -> list[str]:
    """An interactive ``ssh`` into the board, as the session's own connection logs in."""
    rig = _parts(session)
    _board_up(rig)
    if rig.network is None:
        raise ConfigError(f"rig {rig.name} has no network part to reach the board over SSH",
                          file=str(rig.config.source))
    host, port = rig.network.ssh_endpoint()
    return ["ssh", "-i", str(session.ssh_key), "-p", str(port), "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"{rig.config.ssh.user}@{host}"]


def boot(session: HilSession, image: str | None, flash: bool, ui: Ui) -> int:
    """Flash (the rig file's image, or ``image``), power on, wait for the boot and a shell,
    as a pytest session starts; the board is left up."""
    rig = _parts(session)
    assert session.dut is not None
    session.options.image = image or session.options.image
    session.options.flash = flash
    if flash:
        with step(ui, "prepare the image"):
            prepared, bmap = session.prepare_image()
        with step(ui, f"flash {prepared.name}"):
            session.flash(prepared, bmap)
        with step(ui, "power on, wait for the boot and a shell"):
            session.dut.power_on()
    else:
        with step(ui, "power cycle, wait for the boot and a shell"):
            cut_power(session)
            rig.medium_to_board()
            session.dut.power_on()
    # The framework's console shell runs without echo or prompt; give a person theirs back
    # (the framework sets its shell up again when it next needs it).
    session.dut.shell.send(HUMAN_SHELL)
    session.dut.shell.invalidate("the console was handed to a person")
    ui.line(f"rig {rig.name} is up: `hil ssh {rig.name}`, `hil console {rig.name}`")
    return 0


def console(rig: Rig, read: Callable[[], bytes], write: Callable[[bytes], None]) -> None:
    """Relay the rig's console: what the board prints (from now, secrets masked) to ``write``,
    what ``read`` returns to the board, until the exit key or the end of input (``b""``).
    The capture goes on all the while: the console's log (``console.log``) has every byte."""
    if not rig.console.attached and rig.target is None:
        rig.console.attach()  # a bench console is a port of its own; a QEMU one opens at power on
    stop = threading.Event()
    failed: list[BaseException] = []

    def board_to_user() -> None:
        masker = redact.Stream()  # whole lines masked; a prompt is shown after a quiet spell
        pos = rig.log.end
        try:
            while not stop.is_set():
                end = rig.log.wait_beyond(pos, QUIET)
                if end > pos:
                    write(masker.feed(rig.log.read(pos, end)))
                    pos = end
                else:
                    write(masker.flush())
        except OSError as exc:  # the user's side went away
            failed.append(exc)
            stop.set()

    out = threading.Thread(target=board_to_user, name=f"console-out-{rig.name}", daemon=True)
    out.start()
    try:
        while not stop.is_set():
            data = read()
            if not data:
                break
            data, exit_key, _ = data.partition(EXIT_KEY)
            if data:
                try:
                    rig.console.write(data)
                except InfraError:
                    write(b"\r\n[hil: the console is not open: the board is off]\r\n")
            if exit_key:
                break
    finally:
        stop.set()
        out.join(timeout=2)


def run(session: HilSession, op: str, args: dict[str, Any], ui: Ui) -> int:
    """One operation by name, with its arguments as the command line gave them."""
    if op == "power":
        return power(session, args["action"], ui)
    if op == "mux":
        return mux(session, args["action"], ui)
    if op == "ssh":
        return ssh(session, args["command"], args.get("timeout"), ui)
    if op == "boot":
        return boot(session, args.get("image"), args.get("flash", True), ui)
    raise ValueError(f"unknown bench operation {op!r}")
