"""A console on a serial line that drops and flips bytes both ways (``hil.emu.noisyline``) never
hands a test a wrong answer: every command runs as typed and returns exactly what the device
printed, with its exit code, or fails with a console error. First against a real shell on a pty,
then against the reference OS booted in QEMU, its UART behind the same line."""

from __future__ import annotations

import random
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.console.shell import ConsoleGarbled, ConsoleShell
from hil.deadline import wait_until
from hil.emu.noisyline import NoisyLine
from hil.errors import DeadlineError

from .conftest import ShellLine, open_console

RATE = 2e-4  # per byte, for drops and for flips each: about half the replies are hit
Case = tuple[str, str, int]  # a command, the output it prints, its exit code


def cases(count: int, seed: int, numbers: Callable[[int], str]) -> list[Case]:
    """Commands printing 1..n (``numbers(n)``), then exiting with k."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n, k = rng.randrange(1, 300), rng.randrange(0, 4)
        out.append((f"{numbers(n)}; (exit {k})", "".join(f"{i}\n" for i in range(1, n + 1)), k))
    return out


def run_all(shell: ConsoleShell, todo: list[Case], timeout: float) -> Counter[str]:
    """How each command ended: ``exact``, ``garbled: <what showed it>`` or ``WRONG``."""
    seen: Counter[str] = Counter()
    for command, stdout, code in todo:
        try:
            r = shell.run(command, timeout)
        except ConsoleGarbled as exc:
            text = str(exc).splitlines()[0]  # without the console tail
            what = ("MD5" if "MD5" in text else "not base64" if "not base64" in text
                    else "no start" if "did not start" in text
                    else "the command" if not exc.ran
                    else text.split(": ")[-1].split(" (")[0])
            seen[f"garbled: {what}"] += 1
            if not shell.ready:  # its set-up line garbled too, every retry: set it up anew
                shell.wait_ready(60)
            continue
        except DeadlineError:  # both end markers garbled
            seen["garbled: no end marker"] += 1
            shell.wait_ready(30)
            continue
        seen["exact" if (r.stdout, r.exit_code) == (stdout, code) else "WRONG"] += 1
    return seen


def assert_never_wrong(seen: Counter[str], noisy: NoisyLine, total: int) -> None:
    print(f"noisy console, {total} commands ({noisy.noise}): {dict(seen)}")
    assert seen["WRONG"] == 0, seen
    assert sum(seen.values()) == total
    assert noisy.noise.dropped > 0 and noisy.noise.flipped > 0, noisy.noise
    assert seen["exact"] > total // 4, seen  # most commands still get through
    # some garbled replies still decoded as base64: only the checksum told them apart
    assert seen["garbled: MD5"] > 0, seen
    if noisy.both_ways:  # and some commands arrived garbled: not run
        assert seen["garbled: the command"] + seen["garbled: no start"] > 0, seen


@pytest.fixture
def noisy(tmp_path: Path, line: ShellLine) -> Iterator[NoisyLine]:
    n = NoisyLine(line.path, tmp_path / "noisy.sock", drop=RATE, flip=RATE, seed=11,
                  both_ways=True)
    yield n
    n.close()


def test_a_noisy_line_never_gives_a_wrong_answer(noisy: NoisyLine, tmp_path: Path) -> None:
    con = open_console(noisy.path, tmp_path, 5)
    try:
        shell = ConsoleShell(con)
        shell.wait_ready(30)  # through the noise: the settings line is typed again if garbled
        # a garbled quote leaves the shell waiting for the rest of the line: given up on (as
        # not run) once the start is overdue, long before the command's deadline
        shell.start_within = 1
        todo = cases(200, 5, lambda n: f"i=1; while [ $i -le {n} ]; do echo $i; i=$((i+1)); "
                                       "done")
        assert_never_wrong(run_all(shell, todo, 30), noisy, len(todo))
    finally:
        con.close()


@pytest.mark.qemu
def test_the_reference_os_on_a_noisy_line_never_gives_a_wrong_answer(tmp_path: Path) -> None:
    from hil.refos import build, configure
    from hil.refos.qemu import qemu_argv

    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("needs qemu-system-aarch64")
    image = build("aarch64")
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image.disk), str(disk)], check=True)
    configure(disk, {"uuid": secrets.token_hex(16), "developmentMode": True})
    uart = tmp_path / "uart.sock"
    # wait=on: the board starts once the line is connected, so no byte of the boot is missed
    argv = qemu_argv("aarch64", disk, serial=f"unix:{uart},server=on,wait=on",
                     uboot_env=image.uboot_env)
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    noisy = con = None
    try:
        wait_until(uart.exists, 30, "QEMU's UART socket")
        # clean through the boot (a flipped byte could stop U-Boot's autoboot), noisy after
        noisy = NoisyLine(uart, tmp_path / "noisy.sock", drop=0, flip=0, seed=12,
                          both_ways=True)
        con = open_console(noisy.path, tmp_path, 10)
        shell = ConsoleShell(con)
        shell.wait_ready(180)
        noisy.drop = noisy.flip = RATE
        shell.start_within = 3
        todo = cases(100, 6, lambda n: f"seq 1 {n}")
        assert_never_wrong(run_all(shell, todo, 60), noisy, len(todo))
    finally:  # QEMU too, whatever failed before the shell was up
        if con is not None:
            con.close()
        if noisy is not None:
            noisy.close()
        qemu.kill()
        qemu.wait()
