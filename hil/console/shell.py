"""A root shell on a serial console.

One round trip per command: the command is sent in a single write, framed by nonce markers that
only the shell's ``printf`` can produce (the echoed text holds ``\\036`` as four characters, never
the byte), and the reply is found by scanning only new console bytes. Output is base64-encoded on
the device, so kernel messages that the console interleaves (``[ 12.345678] ...``), and lines other
programs write to the console, can be cut out exactly without touching the command's own output,
even when that output is ``dmesg``. An MD5 of the output and exit code follows it, and each
command is typed twice and runs only if both copies agree: a serial line that drops or flips
bytes gives a console error (``ConsoleGarbled``), never a wrong output or exit code, and never
runs another command (base64 alone decodes most flips into other bytes). The framing is a shell
function, defined (and checked the same way) when the shell is set up. A command whose start the
device does not print within ``START_WITHIN`` (a garbled quote leaves the shell waiting for the
rest of the line) is interrupted and reported as not run, rather than waiting out its deadline.
Each command runs in its own subshell, so ``cd`` or ``export`` in one test cannot leak into the
next while the board stays up between tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import re
import secrets
import time
from dataclasses import dataclass

from hil.console.log import BOOT_MARKERS as BOOT_BANNER
from hil.console.log import NO_REPLY, RESTARTS, ConsoleLog, EventKind, StopEvent
from hil.console.serial import SerialConsole
from hil.errors import DeadlineError, DeviceError, InfraError

# A prompt or login request at the very end of what the console printed so far; line editors
# may follow the prompt with terminal queries such as ESC[6n (busybox ash does).
PROMPT = re.compile(rb"(?:(login:)|(assword:)|[#$]) ?(?:\x1b\[[0-9;?]*[A-Za-z])*$")
# Never press Enter while a bootloader counts down: it would stop the boot.
# Printed once a kernel runs: until then a keypress may land in a bootloader.
KERNEL_STARTED = re.compile(rb"Starting kernel|Booting the kernel|Linux version|Booting Linux|"
                            rb"Run /init|HIL-INIT|Freeing unused kernel")
BOOTLOADER_WAITING = re.compile(rb"(?i)hit any key|press any key|autoboot|=> ?$|grub> ?$")
KERNEL_LINE = re.compile(rb"\[\s*\d+\.\d+\][^\n]*\n?")
# Other programs writing to /dev/console (init scripts, getty) interleave whole lines; a line
# with a character base64 never uses is not part of the reply.
NOT_BASE64_LINE = re.compile(rb"^.*[^A-Za-z0-9+/=\r\n].*$\n?", re.M)
# md5sum's line for the reply it read on stdin ("-"), after the encoded reply. Not anchored
# to a line start, and no marker of its own: the OS's own console messages (written between
# two of our writes) may precede it on its line; md5sum writes the line itself at once.
CHECKSUM = re.compile(rb"([0-9a-f]{32})  -\r?\n")
NUDGE_AFTER_QUIET = 1.5  # seconds of console silence before pressing Enter to get a prompt
# A prompt is followed by silence; "#" at the end of a read chunk ("virtio-net#" + "32") is not.
PROMPT_SETTLE = 0.3
CONFIGURE_RETRY = 5.0  # seconds without an answer to the settings line before typing it again
ANY_BYTE = re.compile(rb"[\s\S]")
TTY_LINE = 4095  # bytes a tty in canonical mode takes per line; it drops the rest
# seconds from typing a command to the device printing its start (the shell's printf, before
# the command's own subshell): longer is a line the shell has not taken as a whole command
START_WITHIN = 15.0


@dataclass(frozen=True)
class Result:
    command: str
    stdout: str
    stderr: str | None  # None where the transport merges streams (serial console)
    exit_code: int
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class CommandFailed(AssertionError):
    """A command the test required to succeed did not: a test failure, not a rig fault."""

    def __init__(self, result: Result) -> None:
        out = result.stdout.strip()[-2000:]
        err = (result.stderr or "").strip()[-2000:]
        text = f"command {result.command!r} exited {result.exit_code}"
        text += f"\nstdout:\n{out}" if out else ""
        text += f"\nstderr:\n{err}" if err else ""
        super().__init__(text)
        self.result = result


class ConsoleGarbled(InfraError):
    """The console line garbled a command on its way in (``ran`` False: it was not run) or its
    reply on the way out (``ran`` True: it ran, its answer is lost)."""

    def __init__(self, message: str, *, ran: bool, tail: str) -> None:
        super().__init__(message, part="console", tail=tail)
        self.ran = ran


class ConsoleShell:
    def __init__(self, console: SerialConsole, *, user: str = "root",
                 password: str | None = None) -> None:
        self.console = console
        self.log: ConsoleLog = console.log
        self.user, self.password = user, password
        self._ready_at: int | None = None  # console offset at which this session was set up
        self._configured_at: int | None = None  # last set-up, even if since invalidated
        self._lost: str | None = None  # why the session is gone (for the next run's error)
        self._session = secrets.token_hex(3)
        self._seq = itertools.count(1)
        self.start_within = START_WITHIN

    # --- session set-up ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready_at is not None and not self.log.events_since(self._ready_at)

    def invalidate(self, why: str | None = None) -> None:
        self._ready_at = None
        self._lost = why

    def _configure_line(self) -> bytes:
        # No echo, no prompt: the reply stream is then exactly what printf and base64 print.
        # The framing function is defined here, once per shell, so that each command types
        # only itself (twice); like a command, it is typed twice and defined only if both
        # copies arrived alike, and the shell reports ready only then. The line is typed while
        # the shell still echoes, when busybox's line editor takes at most 1023 bytes: hence
        # the short names, and double quotes that need no escaping inside the single ones.
        #
        # _hil runs the command in $__hil, after its tag (so the tag is checked with it), in a
        # subshell, whose status is the command's exit code, even after an `exit` or a syntax
        # error; called without arguments, the command sees no positional parameters of ours.
        # The code travels inside the encoded bytes (after a last \036): any POSIX shell will
        # do. The reply goes through a file ($__hf) so that
        # one more program can checksum it (a pipe would need a tee); it starts with the tag,
        # so an older reply left there is never taken for this one. The file is in the first
        # directory where it can be created (a porter's image may have a read-only root; test
        # -w says yes to root there). The start and end markers are printed twice: one garbled
        # copy must not leave a wait to run out.
        framing = (
            f"for __hf in /tmp /run /dev/shm /dev; do __hf=$__hf/.hil-console-{self._session}; "
            "{ true >$__hf; } 2>/dev/null && break; done; "
            '_hil() { __ht=${__hil%% *}; __hil=${__hil#* }; '
            'printf "\\036S%s\\n\\036S%s\\n" $__ht $__ht; '
            '( printf "%s\\036" $__ht; eval "$__hil" </dev/null 2>&1 ) >$__hf; '
            'printf "\\036%d" $? >>$__hf; base64 <$__hf && '
            'md5sum <$__hf; printf "\\036E%s\\n\\036E%s\\n" $__ht $__ht; }')
        return ("stty -echo 2>/dev/null; PS1=''; PS2=''; export TERM=dumb; "
                + _twice("__hilf", framing,
                         f"eval \"$__hilf\"; printf '\\036R%s\\037\\n' {self._session}",
                         ":") + "\n").encode()

    def wait_ready(self, timeout: float) -> float:
        """From anywhere in a boot: get to a configured root shell. Returns seconds taken."""
        with self.log.tally.timing("boot"):
            return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        end = t0 + timeout
        start = self.log.end
        nudged_at = -1
        logged_in = password_sent = False
        marker = re.escape(f"\x1eR{self._session}\x1f".encode())
        waiting = re.compile(PROMPT.pattern + b"|(" + marker + b")")
        # A shell we configured earlier in this boot has no prompt to show: resync it directly.
        resync = (self._configured_at is not None
                  and not self.log.events_since(self._configured_at))
        interrupt = False
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise DeadlineError("a shell prompt or login on the console",
                                    _last_line(self.log), timeout, tail=self.log.tail())
            try:
                hit = self.log.wait_for(waiting, start, min(left, NUDGE_AFTER_QUIET),
                                        "shell prompt", stop_on=(EventKind.PANIC,))
            except StopEvent as exc:
                raise DeviceError(f"kernel panic while waiting for a shell: {exc.event.text}",
                                  tail=exc.tail) from None
            except DeadlineError:
                # Quiet console and no prompt: press Enter, once per quiet spell. A resync
                # goes on at every quiet spell: its set-up line, garbled on the way in, may
                # have left the shell silently waiting for the rest of a quoted string.
                if (self.log.end != nudged_at or resync) and self._may_nudge():
                    nudged_at = self.log.end
                    start = self.log.end
                    if not resync:
                        self.console.write(b"\n")
                    else:
                        # Whatever runs in the foreground is a leftover of ours (a command that
                        # timed out before its ^C landed): interrupt it, then resync at the
                        # next quiet spell. Not in one write: ^C flushes the line's input.
                        interrupt = not interrupt
                        self.console.write(b"\x03" if interrupt else self._configure_line())
                continue
            if not hit.groups[2] and not self._still_prompt(hit.start, end):
                start = hit.end
                continue
            start = hit.end
            if hit.groups[2]:  # a resync answered: the shell is configured
                self._ready_at, self._configured_at, self._lost = self.log.end, self.log.end, None
                return time.monotonic() - t0
            if hit.groups[0] and password_sent:
                raise InfraError(f"the console refused the login for {self.user!r} with the "
                                 "rig's password (ssh.password or ssh.password_env in the rig "
                                 "file)", part="console", tail=self.log.tail())
            if hit.groups[0] and not logged_in:
                self.console.write(self.user.encode() + b"\n")
                logged_in = True
            elif hit.groups[1]:
                if self.password is None:
                    raise InfraError(f"console asks for a password for {self.user!r} and the rig "
                                     "gives none (development images have none; set "
                                     "ssh.password_env or ssh.password in the rig file)",
                                     part="console", tail=self.log.tail())
                self.console.write(self.password.encode() + b"\n")
                password_sent = True
            elif not hit.groups[0]:
                break
        self._configure(end - time.monotonic())
        return time.monotonic() - t0

    def _may_nudge(self) -> bool:
        """Pressing Enter is safe once the board has spoken since power-on or reset and, if a
        bootloader ran, a kernel has started (before, a byte may sit in the UART until the
        bootloader reads it as "stop autoboot"), and no bootloader is counting down."""
        starts = [e for e in self.log.events
                  if e.kind in (EventKind.POWER_ON, EventKind.RESET, EventKind.BOOT)]
        if starts:
            since = self.log.read(starts[-1].offset)
            bootloader_ran = starts[-1].kind != EventKind.POWER_ON or BOOT_BANNER.search(since)
            if not since or (bootloader_ran and not KERNEL_STARTED.search(since)):
                return False
        return not BOOTLOADER_WAITING.search(self.log.read(self.log.end - 200))

    def _still_prompt(self, at: int, end: float) -> bool:
        """Wait for the console to fall quiet; true if what matched is still a prompt then."""
        while time.monotonic() < end:
            mark = self.log.end
            try:
                self.log.wait_for(ANY_BYTE, mark, PROMPT_SETTLE, "quiet after a prompt")
            except DeadlineError:
                return PROMPT.search(self.log.read(at)) is not None
        return False

    def _configure(self, timeout: float) -> None:
        marker = f"\x1eR{self._session}\x1f".encode()
        before = self.log.end
        timeout = max(timeout, 1.0)
        end = time.monotonic() + timeout
        # The line is idempotent, so it is typed again while unanswered: a boot script that
        # sets the console's modes (stty, getty) flushes input typed before it ran.
        while True:
            self.console.write(self._configure_line())
            left = end - time.monotonic()
            try:
                self.log.wait_for(re.compile(re.escape(marker)), before,
                                  min(left, CONFIGURE_RETRY), "the shell to accept its settings")
                break
            except DeadlineError:
                if left <= CONFIGURE_RETRY:
                    raise DeadlineError("the shell to accept its settings (typed every "
                                        f"{CONFIGURE_RETRY:.0f}s)", _last_line(self.log),
                                        timeout, tail=self.log.tail()) from None
        self._ready_at = self._configured_at = self.log.end
        self._lost = None

    # --- commands -------------------------------------------------------------------------------
    def run(self, command: str, timeout: float = 60.0) -> Result:
        with self.log.command("console", command) as record:
            result = self._run(command, timeout)
            record.exit_code = result.exit_code
            return result

    def _run(self, command: str, timeout: float) -> Result:
        if self._ready_at is not None:
            booted = self.log.events_since(self._ready_at)
            if booted:
                self.invalidate(f"the board restarted ({booted[0].text})")
        if self._ready_at is None:
            if self._lost:
                raise DeviceError(f"{self._lost} since the shell was set up; not running "
                                  f"{command!r} (wait_ready first)", tail=self.log.tail())
            raise InfraError("no shell on the console yet (call wait_ready after power-on)",
                             part="console", tail=self.log.tail())
        tag = f"{self._session}.{next(self._seq)}"
        begin = re.compile(rb"\x1eS" + re.escape(tag.encode()) + rb"\r?\n")
        started = re.compile(rb"\x1e[SEX]" + re.escape(tag.encode()) + rb"\r?\n")
        done = re.compile(rb"\x1e([EX])" + re.escape(tag.encode()) + rb"\r?\n")
        # Typed twice, with its tag, and run only if both copies arrived alike: a byte the line
        # garbled on the way in must not run another command (or this one under another tag)
        # unnoticed.
        script = _twice("__hil", f"{tag} {command}", "_hil",
                        f"printf '\\036X%s\\n' {tag}") + "\n"
        if max(map(len, script.split("\n"))) >= TTY_LINE:
            raise ValueError(f"a line of {command[:80]!r}... is too long for a console: typed "
                             f"twice it exceeds the {TTY_LINE} bytes a tty takes per line (run "
                             "it over SSH, or split it into lines)")
        sent_at = self.log.end
        t0 = time.monotonic()
        self.console.write(script.encode())
        try:
            self._wait_started(started, sent_at, timeout, command)
            end_hit = self.log.wait_for(done, sent_at, max(t0 + timeout - time.monotonic(), 0),
                                        f"the end of {command!r}", stop_on=RESTARTS)
        except StopEvent as exc:
            self.invalidate(f"the board restarted ({exc.event.text})")
            raise DeviceError(f"board {exc.event.kind} ({exc.event.text}) while running "
                              f"{command!r}", tail=exc.tail) from None
        except DeadlineError:
            self.console.write(b"\x03")  # interrupt it; the session state is now unknown
            self.invalidate(f"{command!r} timed out")
            raise
        duration = time.monotonic() - t0
        if end_hit.groups[0] == b"X":
            raise ConsoleGarbled(f"console garbled the command {command!r} on its way to the "
                                 "device (its two copies differed): not run", ran=False,
                                 tail=self.log.tail())

        def garbled(why: str) -> ConsoleGarbled:
            return ConsoleGarbled(f"console garbled the reply to {command!r}: {why}", ran=True,
                                  tail=self.log.tail())

        body = self.log.read(sent_at, end_hit.start)
        m = begin.search(body)
        if m is None:
            raise garbled("no start marker")
        reply_text = KERNEL_LINE.sub(b"", body[m.end():])
        found = list(CHECKSUM.finditer(reply_text))
        sums = found[-1] if found else None  # the last one: base64 never has "  -"
        if sums is None:
            raise garbled(f"no checksum line (the device printed {reply_text[-300:]!r})")
        encoded = NOT_BASE64_LINE.sub(b"", reply_text[:sums.start()])
        try:
            raw = base64.b64decode(b"".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            raise garbled(f"not base64: {encoded[:200]!r}") from None
        if hashlib.md5(raw).hexdigest().encode() != sums.group(1):
            raise garbled(f"its {len(raw)} bytes do not match the device's MD5 of them")
        head, sep, raw = raw.partition(b"\x1e")
        if head != tag.encode() or not sep:
            raise garbled("it is not this command's")
        output, sep, code = raw.rpartition(b"\x1e")
        if not sep or not code.isdigit():
            raise garbled("no exit code")
        return Result(command, output.decode("utf-8", errors="replace"), None, int(code),
                      duration)

    def _wait_started(self, started: re.Pattern[bytes], sent_at: int, timeout: float,
                      command: str) -> None:
        try:
            self.log.wait_for(started, sent_at, min(timeout, self.start_within),
                              f"the start of {command!r}", stop_on=RESTARTS)
        except DeadlineError:
            if timeout <= self.start_within:
                raise
            # Both start markers lost is as good as impossible: the shell has not taken the
            # line (an unclosed quote). ^C drops it, and the settings line, answered, shows the
            # shell back at its prompt. Its answer comes after anything the shell printed
            # before, so a start marker that was only late is seen by then: that command ran
            # (and was interrupted).
            self.console.write(b"\x03")
            why = (f"the device did not start {command!r} within {self.start_within:.0f}s of "
                   "its typing: the console garbled the line (a quote or the framing) on its "
                   "way in, or the shell stalled")
            try:
                self._configure(6 * CONFIGURE_RETRY)  # a noisy line may garble it too
                ran = started.search(self.log.read(sent_at)) is not None
                why += ("; it started late, and was interrupted" if ran else
                        "; interrupted, not run")
            except DeadlineError:
                self.invalidate(f"{command!r} did not start")
                ran = True  # unknown: as if it ran, so that nothing runs it again
                why += "; the shell did not answer its settings after that"
            raise ConsoleGarbled(why, ran=ran, tail=self.log.tail()) from None

    def send(self, command: str) -> int:
        """Type a command whose reply we will not wait for (``reboot``). Returns the offset."""
        with self.log.command("console", command) as record:
            self.console.write(command.encode() + b"\n")
            record.error = NO_REPLY
        return record.at


def _twice(var: str, text: str, then: str, otherwise: str) -> str:
    """Shell that sets ``var`` to ``text``, then runs ``then`` if a second copy of ``text``
    equals it, else ``otherwise``: two copies garbled alike are as good as impossible."""
    quoted = "'" + text.replace("'", "'\\''") + "'"
    return f'{var}={quoted}; if [ "${var}" = {quoted} ]; then {then}; else {otherwise}; fi'


def _last_line(log: ConsoleLog) -> str:
    lines = [ln for ln in log.tail(5).splitlines() if ln.strip()]
    return repr(lines[-1]) if lines else "no console output at all"
