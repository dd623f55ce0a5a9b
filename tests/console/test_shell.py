"""ConsoleShell against a real shell on a pty: framing, exit codes, interleaved kernel messages,
reboots and hangs."""

from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path

import pytest

from hil import record
from hil.config import load_device_type
from hil.console.log import NO_REPLY
from hil.console.serial import SerialConsole, SerialSettings
from hil.console.shell import CONFIGURE_RETRY, ConsoleGarbled, ConsoleShell
from hil.deadline import wait_until
from hil.errors import DeadlineError, DeviceError, InfraError
from hil.registry import PartContext

from .conftest import ShellLine


@pytest.fixture
def shell(console: SerialConsole) -> ConsoleShell:
    sh = ConsoleShell(console)
    sh.wait_ready(10)
    return sh


def test_output_and_exit_codes(shell: ConsoleShell) -> None:
    r = shell.run("echo out; echo err >&2; exit_with() { return $1; }; exit_with 3")
    assert r.stdout == "out\nerr\n"
    assert r.exit_code == 3
    assert r.stderr is None  # one serial line carries both streams
    assert shell.run("true").ok


def test_binary_safe_and_large_output(shell: ConsoleShell) -> None:
    r = shell.run("i=0; while [ $i -lt 2000 ]; do echo \"line $i\"; i=$((i+1)); done")
    lines = r.stdout.splitlines()
    assert len(lines) == 2000 and lines[-1] == "line 1999"
    r = shell.run("printf 'a\\001b\\036c\\037d\\n'")
    assert r.stdout == "a\x01b\x1ec\x1fd\n"


def test_commands_do_not_eat_the_framing(shell: ConsoleShell) -> None:
    assert shell.run("cat").stdout == ""  # reads stdin: gets /dev/null, not our trailer
    # Each command runs in its own subshell: one test's cd/export cannot leak into the next.
    home = shell.run("pwd").stdout
    assert shell.run("cd /tmp && export LEAK=1 && pwd").stdout == "/tmp\n"
    assert shell.run("pwd; echo ${LEAK:-none}").stdout == home + "none\n"
    # the framing's own arguments are not the command's; quotes of every kind survive it
    assert shell.run("echo \"$# [$1]\"").stdout == "0 []\n"
    assert shell.run("""printf '%s\\n' 'a'"'"'b' "c'd" 'e\\f'""").stdout == "a'b\nc'd\ne\\f\n"
    # a command the shell cannot parse fails as a command, and the next one runs
    assert shell.run("echo 'unclosed").exit_code == 2
    assert shell.run("echo ok").stdout == "ok\n"
    r = shell.run("echo before; exit 3; echo after")  # exit ends the command, not the shell
    assert (r.stdout, r.exit_code) == ("before\n", 3)


def test_a_line_too_long_for_a_tty_is_refused_before_it_is_typed(shell: ConsoleShell) -> None:
    with pytest.raises(ValueError, match="too long for a console"):
        shell.run("echo " + "x" * 2100)
    assert shell.run("echo " + "x" * 1900).stdout == "x" * 1900 + "\n"


def test_kernel_messages_interleaved_with_output_are_cut_out(shell: ConsoleShell,
                                                             line: ShellLine) -> None:
    # The kernel writes straight onto the UART, in the middle of the command's output.
    timer = threading.Timer(0.2, line.inject,
                            [b"[   12.345678] usb 1-1: new high-speed USB device\r\n"])
    timer.start()
    r = shell.run("i=0; while [ $i -lt 30 ]; do echo row$i; sleep 0.02; i=$((i+1)); done")
    timer.join()
    assert r.stdout.splitlines() == [f"row{i}" for i in range(30)]
    # ... and a command whose own output looks like kernel messages keeps it.
    fake = "[    1.000000] not the kernel"
    assert shell.run(f"echo '{fake}'").stdout == fake + "\n"


def test_lines_other_programs_write_to_the_console_are_cut_out(shell: ConsoleShell,
                                                              line: ShellLine) -> None:
    timer = threading.Timer(0.2, line.inject, [b"HIL: registered 1234abcd\r\n"])
    timer.start()
    r = shell.run("i=0; while [ $i -lt 30 ]; do echo row$i; sleep 0.02; i=$((i+1)); done")
    timer.join()
    assert r.stdout.splitlines() == [f"row{i}" for i in range(30)]


def test_a_console_line_between_the_reply_and_its_checksum_is_cut_out(
        shell: ConsoleShell, line: ShellLine) -> None:
    # Another program's line lands right before md5sum's line, whole or as the start of it (as
    # the registration's did on a booting device); the reply and its checksum are still found.
    injected = []

    def before_checksum(data: bytes) -> bytes:
        msg = b"HIL: registered 1234abcd\r\n" if len(injected) % 2 else b"HIL: half a line "
        out = re.sub(rb"(?m)^([0-9a-f]{32}  -\r\n)", msg + rb"\1", data)
        if out != data:
            injected.append(msg)
        return out

    line.rewrite = before_checksum
    for i in range(4):
        r = shell.run(f"echo reply{i}; exit {i}")
        assert (r.stdout, r.exit_code) == (f"reply{i}\n", i)
    assert len(injected) == 4


def test_a_command_garbled_into_an_open_quote_is_not_run_and_ends_early(
        shell: ConsoleShell, line: ShellLine) -> None:
    # A quote lost on the way in leaves the shell waiting for the rest of the line: the command
    # is interrupted once its start is overdue, reported as not run; the deadline is not waited.
    lost = []

    def drop_a_quote(data: bytes) -> bytes:
        if b"touch" in data and not lost:
            lost.append(data)
            return data.replace(b"'", b"", 1)
        return data

    line.rewrite_in = drop_a_quote
    shell.start_within = 1.0
    marker = f"/tmp/hil-garbled-{secrets.token_hex(4)}"
    t0 = time.monotonic()
    with pytest.raises(ConsoleGarbled, match="did not start") as err:
        shell.run(f"touch {marker}", timeout=60)
    assert time.monotonic() - t0 < 10 and not err.value.ran and lost
    assert shell.ready  # back at its prompt: the host OS may run the command again at once
    assert shell.run(f"test -e {marker}").exit_code == 1  # it did not run
    assert shell.run("echo next").stdout == "next\n"


def test_a_hung_command_times_out_with_what_was_seen(shell: ConsoleShell) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineError) as err:
        shell.run("sleep 30", timeout=1)
    assert time.monotonic() - t0 < 5
    assert "the end of 'sleep 30'" in str(err.value)
    assert not shell.ready  # it will be set up again before the next command
    shell.wait_ready(10)
    assert shell.run("echo back").stdout == "back\n"


def test_a_reboot_during_a_command_is_a_device_error(shell: ConsoleShell,
                                                    line: ShellLine) -> None:
    threading.Timer(0.3, line.inject, [b"\r\nU-Boot 2023.01+dfsg-2 (Jan 01 2023)\r\n"]).start()
    with pytest.raises(DeviceError, match="board boot"):
        shell.run("sleep 5", timeout=10)
    with pytest.raises(DeviceError, match="restarted"):
        shell.run("true")


def test_a_kernel_panic_is_named(shell: ConsoleShell, line: ShellLine) -> None:
    threading.Timer(0.3, line.inject,
                    [b"[ 3.1] Kernel panic - not syncing: Attempted to kill init!\r\n"]).start()
    with pytest.raises(DeviceError, match="Attempted to kill init"):
        shell.run("sleep 5", timeout=10)


def test_logs_in_at_a_login_prompt(tmp_path: Path) -> None:
    line = ShellLine(tmp_path / "login.sock", login=True)
    ctx = PartContext("fake", "console", tmp_path, load_device_type("generic-aarch64"))
    con = SerialConsole(SerialSettings(url=f"unix://{line.path}"), ctx)
    try:
        con.attach(timeout=5)
        sh = ConsoleShell(con)
        sh.wait_ready(10)
        assert sh.run("echo in").stdout == "in\n"
    finally:
        con.close()
        line.close()


# getty and login as a porter's image has them: the password typed without echo
GETTY = ("while :; do printf 'porter login: '; read -r u; printf 'Password: '; stty -echo; "
         "read -r p; stty echo; echo; [ \"$u\" = root ] && [ \"$p\" = pw-right ] && exec sh -i; "
         "echo 'Login incorrect'; done")


@pytest.mark.parametrize(("password", "error"), [
    ("pw-right", None),
    ("pw-wrong", "refused the login for 'root' with the rig's password"),
    (None, "asks for a password for 'root' and the rig gives none"),
])
def test_logs_in_with_the_rigs_password(tmp_path: Path, password: str | None,
                                        error: str | None) -> None:
    line = ShellLine(tmp_path / "getty.sock", script=GETTY)
    ctx = PartContext("fake", "console", tmp_path, load_device_type("generic-aarch64"))
    con = SerialConsole(SerialSettings(url=f"unix://{line.path}"), ctx)
    try:
        con.attach(timeout=5)
        sh = ConsoleShell(con, password=password)
        if error is None:
            sh.wait_ready(10)
            assert sh.run("echo in").stdout == "in\n"
        else:
            with pytest.raises(InfraError, match=re.escape(error)):  # the rig's fault
                sh.wait_ready(10)
        assert b"pw-" not in con.log.read(0)  # typed at Password:, never echoed
    finally:
        con.close()
        line.close()


def test_an_idle_shell_set_up_earlier_in_this_boot_is_resynced(shell: ConsoleShell) -> None:
    shell.invalidate("the test says so")
    took = shell.wait_ready(15)  # a ^C to an idle shell, then the settings
    assert took < 10
    assert shell.run("echo again").stdout == "again\n"


def test_settings_typed_again_when_a_boot_script_swallowed_them(tmp_path: Path) -> None:
    # a prompt, then something that eats the line typed at it (as a getty or stty flushing
    # the console's input would), then the real shell
    line = ShellLine(tmp_path / "flush.sock", script="printf '# '; read -r eaten; exec sh -i")
    ctx = PartContext("fake", "console", tmp_path, load_device_type("generic-aarch64"))
    con = SerialConsole(SerialSettings(url=f"unix://{line.path}"), ctx)
    try:
        con.attach(timeout=5)
        sh = ConsoleShell(con)
        took = sh.wait_ready(20)
        assert took >= CONFIGURE_RETRY  # answered on the second try
        assert sh.run("echo in").stdout == "in\n"
    finally:
        con.close()
        line.close()


def test_no_shell_within_the_deadline_says_what_it_saw(tmp_path: Path) -> None:
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "mute.sock"))
    server.listen(1)
    ctx = PartContext("fake", "console", tmp_path, load_device_type("generic-aarch64"))
    con = SerialConsole(SerialSettings(url=f"unix://{tmp_path / 'mute.sock'}"), ctx)
    try:
        con.attach(timeout=5)
        conn, _ = server.accept()
        conn.sendall(b"Starting kernel ...\r\n")
        with pytest.raises(DeadlineError) as err:
            ConsoleShell(con).wait_ready(2)
        assert "Starting kernel" in str(err.value)
        conn.close()
    finally:
        con.close()
        server.close()


def test_console_vanishing_is_a_rig_error(shell: ConsoleShell, line: ShellLine) -> None:
    threading.Timer(0.3, line.close).start()
    with pytest.raises(InfraError, match="console lost"):
        shell.run("sleep 5", timeout=10)


def test_a_command_sent_without_waiting_is_recorded_as_such(shell: ConsoleShell,
                                                             tmp_path: Path) -> None:
    marker = tmp_path / "sent"
    at = shell.send(f"touch {marker}")
    wait_until(marker.exists, 10, "the shell to run the sent command")
    sent = shell.log.commands[-1]
    assert (sent.transport, sent.command, sent.at, sent.exit_code) == (
        "console", f"touch {marker}", at, None)
    assert sent.error == NO_REPLY
    assert not record.failed(sent) and record.exit_text(sent) == f"- ({NO_REPLY})"
