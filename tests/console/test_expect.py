"""ConsoleExpect (``dut.console``) against a real shell on a pty: every reader sees every byte,
matches across reads, pattern lists, EOF at a power cut or restart, timeouts that say what was
seen."""

from __future__ import annotations

import re
import threading

import pytest

from hil.console.expect import EOF, TIMEOUT, ConsoleEOF, ConsoleExpect, ExpectTimeout
from hil.console.log import EventKind
from hil.console.serial import SerialConsole
from hil.console.shell import ConsoleShell
from hil.errors import DeadlineError, DeviceError, InfraError

from .conftest import ShellLine


@pytest.fixture
def con(console: SerialConsole) -> ConsoleExpect:
    c = ConsoleExpect(console, timeout=10)
    # The shell's first prompt is sometimes not printed: sync on a reply instead, then on
    # the prompt after it (what is typed early waits in the pty until the shell reads it).
    c.sendline("echo ready-$((40 + 2))")
    c.expect_exact("ready-42")
    c.expect_exact("# ")
    return c


def test_send_expect_and_what_before_and_after_hold(con: ConsoleExpect) -> None:
    con.sendline("echo $((6 * 7))")
    assert con.expect(r"\n(\d+)\r?\n") == 0
    assert con.match is not None and not isinstance(con.match, (bytes, type))
    assert con.match.group(1) == b"42"
    assert con.before.endswith(b"echo $((6 * 7))\r")  # the echo of the typed line
    assert con.after == b"\n42\r\n"
    # bytes patterns and compiled ones (str or bytes) are the same thing
    con.expect_exact(b"# ")  # typed before the prompt, the output would follow it on its line
    con.sendline("echo one; echo two")
    assert con.expect(re.compile(rb"\none\r?\n")) == 0
    assert con.expect(re.compile(r"two")) == 0


def test_a_list_returns_the_index_of_the_earliest_match(con: ConsoleExpect) -> None:
    con.sendline("echo alpha-1; echo beta-2")
    # output lines only (the echo of the typed line has no newline before alpha or beta)
    assert con.expect([r"\nbeta-\d", r"\nalpha-\d"]) == 1  # alpha is printed first
    assert con.after == b"\nalpha-1"
    assert con.expect_exact([b"gamma", "beta-2"]) == 1  # the cursor moved past alpha
    assert con.match == b"beta-2"


def test_every_reader_sees_every_byte(con: ConsoleExpect, console: SerialConsole) -> None:
    shell = ConsoleShell(console)
    shell.wait_ready(10)  # a second reader, which types and reads on the same line
    assert shell.run("echo from-the-shell").stdout == "from-the-shell\n"
    other = ConsoleExpect(console, timeout=10)  # a third, from here on
    con.send("printf 'to-%s\\n' expecters\n")  # echo is off now: only the output has it
    for reader in (con, other):
        assert reader.expect("to-expecters") == 0
    # the expecters did not take the shell's reply from it, nor it theirs
    assert shell.run("echo again").stdout == "again\n"
    # the first expecter read from before the shell was set up, the later one not
    assert b"stty -echo" in con.before and b"stty -echo" not in other.before


def test_a_pattern_split_across_reads_is_found(con: ConsoleExpect, line: ShellLine) -> None:
    # The board prints a line in two pieces with a pause between them (two reads at least);
    # the pattern spans the split.
    timer = threading.Timer(0.2, line.inject, [b"Bootloader ready: hit a k"])
    timer2 = threading.Timer(0.6, line.inject, [b"ey to stop\r\n"])
    timer.start()
    timer2.start()
    assert con.expect_exact("hit a key to stop", timeout=10) == 0
    assert con.expect([r"ready: hit", r"\n"], timeout=1) == 1  # found once, not twice
    timer.join()
    timer2.join()


def test_a_timeout_says_what_was_expected_and_seen(con: ConsoleExpect) -> None:
    con.sendline("echo something-else")
    with pytest.raises(DeadlineError) as err:
        con.expect(r"never-printed-\d", timeout=1)
    msg = str(err.value)
    assert "'never-printed-\\\\d'" in msg  # what was expected
    assert "something-else" in msg.split("--- console tail ---")[0]  # what was seen
    assert "--- console tail ---" in msg
    # pexpect's own exception type catches it too, and the cursor has not moved
    assert isinstance(err.value, ExpectTimeout) and isinstance(err.value, TIMEOUT)
    assert con.expect("something-else") == 0
    # TIMEOUT in the list is a result, with what came in the meantime in ``before``
    con.sendline("echo meanwhile")
    assert con.expect(["never", TIMEOUT], timeout=1) == 1
    assert b"meanwhile" in con.before and con.after is TIMEOUT


def test_a_power_cut_while_expecting_is_eof_not_a_timeout(con: ConsoleExpect,
                                                          console: SerialConsole) -> None:
    # the rig cuts the power while the test waits (the persistence suite's fault injection)
    threading.Timer(0.3, console.log.note, [EventKind.POWER_OFF]).start()
    with pytest.raises(ConsoleEOF, match="board power-off") as err:
        con.expect("never-printed", timeout=20)
    assert isinstance(err.value, DeviceError) and isinstance(err.value, EOF)
    # as a pattern: its index; the cursor is past the cut, so the next wait is a new one
    threading.Timer(0.3, console.log.note, [EventKind.POWER_OFF]).start()
    assert con.expect(["never-printed", EOF], timeout=20) == 1
    assert con.after is EOF
    # a power-on starts a new stream: bytes from before it are not read again
    printed = ConsoleExpect(console)
    con.sendline("echo before-power-on")
    printed.expect(r"\nbefore-power-on")  # printed, and not read by con
    console.log.note(EventKind.POWER_OFF)
    console.log.note(EventKind.POWER_ON)
    con.sendline("echo after-power-on")
    assert con.expect(["before-power-on", "after-power-on"]) == 1


def test_a_restart_while_expecting_is_reported_as_such(con: ConsoleExpect,
                                                       line: ShellLine) -> None:
    # printed before the restart: still found; after it, the restart ends the stream
    line.inject(b"last words\r\n[   9.1] reboot: Restarting system\r\nU-Boot 2023.01\r\n")
    assert con.expect("last words") == 0
    with pytest.raises(ConsoleEOF, match=r"board reset .*Restarting system.* 'U-Boot'"):
        con.expect("U-Boot", timeout=10)
    assert con.expect("U-Boot", timeout=10) == 0  # then the new boot is read on
    threading.Timer(0.3, line.inject,
                    [b"[ 3.1] Kernel panic - not syncing: Attempted to kill init!\r\n"]).start()
    assert con.expect(["never", EOF], timeout=10) == 1
    assert b"Kernel panic" not in con.before


def test_a_restart_the_framework_awaited_is_history(con: ConsoleExpect,
                                                    console: SerialConsole,
                                                    line: ShellLine) -> None:
    # as Dut.await_boot does once it has seen the new boot: the next expect reads that boot
    at = console.log.end
    line.inject(b"[   9.1] reboot: Restarting system\r\nU-Boot 2023.01\r\nnew boot\r\n")
    console.log.wait_for(re.compile(b"new boot"), at, 10, "the new boot")  # as await_boot
    con.skip_to(at)
    assert con.expect("U-Boot") == 0
    assert b"Restarting system" in con.before  # read, not the end of the stream


def test_the_console_lost_is_a_rig_fault(con: ConsoleExpect, line: ShellLine) -> None:
    threading.Timer(0.3, line.close).start()
    with pytest.raises(InfraError, match="console lost"):
        con.expect(["never", EOF], timeout=20)  # not EOF: the rig broke, not the board


def test_bad_patterns_are_named(con: ConsoleExpect) -> None:
    with pytest.raises(TypeError, match="not int"):
        con.expect(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not NoneType"):
        con.expect_exact([None])  # type: ignore[list-item]
