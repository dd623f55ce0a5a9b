"""/dev and GPIO: every device node and GPIO chip the device type lists exists and is usable
from the OS (opened, line info read, a free line driven and read back), the RTC reads and
ticks, the watchdog can be petted and stopped, a wired GPIO loopback carries both levels, the
kernel saw no under-voltage (else the rig's supply is at fault), and
the same nodes work from inside a privileged container where the OS runs containers."""

from __future__ import annotations

import shlex

import pytest
from devices_probe import (
    ChipResult,
    chip_script,
    loopback_script,
    node_script,
    parse_chips,
    parse_levels,
    parse_nodes,
    parse_tagged,
    rtc_script,
    set_get_script,
    split_line,
    watchdog_script,
)

from hil.config import DeviceType
from hil.dut import Dut
from hil.errors import InfraError
from hil.os import HostOS


def dtype(dut: Dut) -> DeviceType:
    return dut.rig.config.device_type


def where(dut: Dut) -> str:
    return f"hil/devicetypes/{dtype(dut).slug}.yaml"


# --- /dev nodes -----------------------------------------------------------------------------------

def test_dev_node_exists_and_opens(dut: Dut, dev_node: str) -> None:
    r = dut.run(node_script([dev_node]), timeout=60)
    got = parse_nodes(r.stdout).get(dev_node)
    assert got is not None, f"probe of {dev_node} printed nothing useful:\n{r.stdout}"
    assert got.state != "missing", (
        f"{dev_node} is missing: device type {dtype(dut).slug} promises it ({where(dut)})")
    assert got.state != "notadevice", f"{dev_node} is not a device node: {got.detail}"
    assert got.ok, f"{dev_node} exists but is not usable: {got.detail}"


# --- GPIO -----------------------------------------------------------------------------------------

def test_gpio_chip_has_its_lines(dut: Dut, gpio_chip: str) -> None:
    check_chip(dut, gpio_chip, dut.run(chip_script([gpio_chip]), timeout=120).stdout)


def check_chip(dut: Dut, gpio_chip: str, out: str) -> ChipResult:
    """``chip_script``'s output ``out`` shows ``gpio_chip`` with the lines the device type
    gives it, each line's info read."""
    want = dtype(dut).gpio_chips[gpio_chip]
    chip = parse_chips(out).get(gpio_chip)
    assert chip is not None, f"probe of {gpio_chip} printed nothing useful:\n{out}"
    assert chip.state != "missing", (
        f"GPIO chip /dev/{gpio_chip} is missing: device type {dtype(dut).slug} promises it "
        f"with {want} lines ({where(dut)})")
    assert chip.state != "noopen", f"/dev/{gpio_chip} exists but cannot be opened"
    assert chip.state != "notools", (
        f"the OS offers no way to read GPIO line info of {gpio_chip}: neither the GPIO sysfs "
        "class (/sys/class/gpio) nor libgpiod's tools (gpioinfo)")
    assert chip.lines == want, (
        f"{gpio_chip} ({chip.label}) has {chip.lines} lines; device type {dtype(dut).slug} "
        f"says {want}")
    missing = [i for i in range(want) if i not in chip.line_info]
    assert not missing, f"no line info for {gpio_chip} lines {missing}:\n{out}"
    broken = {i: v for i, v in chip.line_info.items() if v.startswith("error")}
    assert not broken, f"reading line info of {gpio_chip} failed for lines {broken}"
    return chip


def test_free_gpio_line_drives_and_reads_back(dut: Dut, gpio_free_line: str) -> None:
    chip, line = split_line(gpio_free_line)
    r = dut.run(set_get_script(chip, line), timeout=60)
    got = parse_levels(r.stdout, "SET")
    if got and got[0] == "notools":
        pytest.fail(f"the OS offers no way to drive {gpio_free_line}: neither the GPIO sysfs "
                    "class nor libgpiod's gpioset")
    if got and got[0] == "held":
        pytest.skip(f"{gpio_free_line} was driven through libgpiod (this OS has no GPIO sysfs "
                    "class), which cannot read back a line it drives: only a loopback can")
    assert got != ["busy"], (
        f"{gpio_free_line} is in use by the kernel, but {where(dut)} lists it as free")
    assert got == ["1", "0"], (
        f"{gpio_free_line} driven high then low read back {got} (want ['1', '0']):\n{r.stdout}")


@pytest.mark.needs("gpio_loopback")
def test_gpio_loopback_carries_both_levels(dut: Dut) -> None:
    wiring = dut.rig.config.gpio_loopback
    assert wiring is not None
    out, inp = split_line(wiring.output), split_line(wiring.input)
    r = dut.run(loopback_script(out, inp), timeout=60)
    driven, read = parse_levels(r.stdout, "SET"), parse_levels(r.stdout, "GET")
    assert "notools" not in driven + read, (
        "the OS offers no way to drive and read GPIO lines: neither the GPIO sysfs class nor "
        "libgpiod's tools")
    want = ["1", "0", "1", "0"]
    # sysfs reads the output back; with libgpiod a gpioset process holds it ("held")
    assert all(d in (w, "held") for d, w in zip(driven, want, strict=False)) and (
        len(driven) == len(want)), f"{wiring.output} could not be driven: {driven}:\n{r.stdout}"
    assert read == want, (
        f"with {wiring.output} driven {want}, {wiring.input} (wired to it on this rig) read "
        f"{read}")


# --- RTC and watchdog -----------------------------------------------------------------------------

@pytest.mark.needs("rtc")
def test_rtc_reads_and_ticks(dut: Dut) -> None:
    r = dut.run(rtc_script("rtc0"), timeout=60)
    hw = [line.split(" ", 2) for line in r.stdout.splitlines() if line.startswith("HWCLOCK ")]
    rtc = [line.split() for line in r.stdout.splitlines() if line.startswith("RTC ")]
    assert hw and hw[-1][1] == "0", (
        f"the RTC cannot be read with hwclock -r -f /dev/rtc0:\n{r.stdout}")
    assert rtc and len(rtc[-1]) == 5, f"no RTC rtc0 in /sys/class/rtc:\n{r.stdout}"
    _, name, first, second, system = rtc[-1]
    assert int(second) > int(first), f"RTC {name} does not tick: {first} then {second}"
    print(f"RTC {name} reads {hw[-1][2].strip()!r}, {int(first) - int(system):+d}s from the "
          "system clock")


@pytest.mark.needs("watchdog")
def test_watchdog_pets_and_stops(dut: Dut) -> None:
    found = dut.run("ls /sys/class/watchdog/ 2>/dev/null").stdout.split()
    assert found, (f"device type {dtype(dut).slug} has a watchdog ({where(dut)}), but the OS "
                   "has none in /sys/class/watchdog")
    wd = sorted(found)[0]
    before = dut.run_check(f"cat /sys/class/watchdog/{wd}/state "
                           f"/sys/class/watchdog/{wd}/nowayout 2>/dev/null").stdout.split()
    if before[:1] == ["active"]:
        pytest.skip(f"the OS itself runs /dev/{wd} (already active): an application cannot "
                    "open it")
    if before[1:2] == ["1"]:
        pytest.skip(f"/dev/{wd} has nowayout set: once opened it cannot be stopped, and the "
                    "board would reset")
    r = dut.run(watchdog_script(wd), timeout=60)
    wd_state = parse_tagged(r.stdout, "WD")
    assert "opened" in wd_state, f"/dev/{wd} could not be opened:\n{r.stdout}"
    assert wd_state["opened"].startswith("active"), (
        f"opening /dev/{wd} did not start the watchdog: {wd_state['opened']}")
    assert wd_state.get("petted") == "3", f"writing a keepalive to /dev/{wd} failed:\n{r.stdout}"
    assert wd_state.get("closed") == "inactive", (
        f"after the magic close ('V') /dev/{wd} still runs ({wd_state.get('closed')}): the "
        "board would reset")
    k0, k1 = wd_state.get("kernel", "0 0").split()
    assert k0 == k1, "the kernel logged 'watchdog did not stop!' after the magic close"


# --- the LED --------------------------------------------------------------------------------------

SUPERVISOR_CONF = "/etc/balena-supervisor/supervisor.conf"
LED_WATCH = "hil-led-watch"  # a transient unit, as their test's collector
LED_LOG = "/run/hil-led-watch.log"
# Each change of the LED file, with the uptime it was seen at: shell builtins only (no process
# per read), at the lowest priority, so that the supervisor's blinking comes first.
LED_WATCH_SCRIPT = (
    f'. {SUPERVISOR_CONF}; p=none; while :; do read -r v < "$LED_FILE"; '
    f'if [ "$v" != "$p" ]; then read -r up _ < /proc/uptime; echo "$up $v" >> {LED_LOG}; p=$v; '
    'fi; done')
BLINKS = 10  # theirs: more than 10 on/off pairs
STEADY_SECONDS = 3.0


def led_changes(dut: Dut) -> tuple[float, list[tuple[float, str]]]:
    """The device's uptime now, and the watcher's changes so far (uptime, value)."""
    out = dut.run(f"cut -d' ' -f1 /proc/uptime; cat {LED_LOG} 2>/dev/null; true").stdout
    now, *lines = out.splitlines()
    return float(now), [(float(f[0]), f[1]) for f in (line.split() for line in lines)
                        if len(f) == 2]


@pytest.mark.needs("led")
def test_identify_blinks_the_led_then_stops(dut: Dut, host_os: HostOS) -> None:
    """balenaOS's identification check (their B4): the supervisor's ``LED_FILE``
    (supervisor.conf) exists, and ``POST /v1/blink`` toggles it more than ten times. More than
    theirs: the toggles are awaited as they come (theirs waits a fixed 20 s), and the LED must
    go steady again once the identification ends (the supervisor blinks for 15 s)."""
    led = dut.run(f'. {SUPERVISOR_CONF} && [ -n "$LED_FILE" ] && [ -f "$LED_FILE" ] && '
                  'echo "$LED_FILE"').stdout.strip()
    assert led, (f"the rig offers an LED (its 'led' feature), but LED_FILE in {SUPERVISOR_CONF} "
                 "is unset or names no file: " + dut.run(f"cat {SUPERVISOR_CONF}").stdout)
    dut.run_check(f"systemctl stop {LED_WATCH} 2>/dev/null; rm -f {LED_LOG}; systemd-run "
                  f"--unit={LED_WATCH} -p Nice=19 sh -c {shlex.quote(LED_WATCH_SCRIPT)}")
    try:
        dut.poll(lambda: led_changes(dut)[1] or None, 30, f"the watcher's first reading of {led}",
                 lambda: dut.run(f"systemctl status {LED_WATCH} 2>&1 | tail -n 5").stdout)
        api = host_os.supervisor()
        api.wait_healthy()  # as theirs waits for its /ping
        reply = api.blink()
        assert (reply.status, reply.text) == (200, "OK"), (
            f"POST /v1/blink answered {reply.status} {reply.text!r}, not 200 OK")
        seen: list[list[tuple[float, str]]] = [[]]

        def blinked() -> bool:
            seen[0] = led_changes(dut)[1]
            return len(seen[0]) > 2 * BLINKS + 1  # the first line is the level before

        def log() -> str:
            return f"{len(seen[0]) - 1} changes of {led}: {seen[0][-6:]}"

        dut.poll(blinked, 30, f"POST /v1/blink to blink the LED ({led}) more than {BLINKS} "
                 "times", log)

        def steady() -> bool:
            now, seen[0] = led_changes(dut)
            return now - seen[0][-1][0] >= STEADY_SECONDS

        dut.poll(steady, 30, f"the LED ({led}) steady for {STEADY_SECONDS:.0f} s once the "
                 "identification ended (the supervisor blinks for 15 s)", log)
    finally:
        dut.run(f"systemctl stop {LED_WATCH}; rm -f {LED_LOG}")


# --- power supply ---------------------------------------------------------------------------------

UNDER_VOLTAGE = "Under-voltage detected"  # the Raspberry Pi kernel's line (raspberrypi-hwmon)


def test_no_under_voltage_since_boot(dut: Dut) -> None:
    """balenaOS's under-voltage test (B5) only prints whether the kernel logged under-voltage.
    On a bench it means the rig's supply cannot carry the board, which makes every other result
    doubtful: an infrastructure error naming the rig's power, not a failure of the OS."""
    seen = dut.run(f"dmesg | grep -F {shlex.quote(UNDER_VOLTAGE)} | tail -n 3; true").stdout
    if seen.strip():
        raise InfraError(f"the kernel reports under-voltage since boot: the supply cannot "
                         f"carry the board ({seen.strip().splitlines()[-1]})", part="power",
                         rig=dut.rig.name)


# --- the same from inside a privileged container --------------------------------------------------

def test_same_from_a_privileged_container(dut: Dut, app_image: str) -> None:
    t = dtype(dut)
    script = node_script([n for n in t.dev_nodes]) + chip_script(sorted(t.gpio_chips))
    r = dut.run(f"balena-engine run --rm --privileged {app_image} sh -c {shlex.quote(script)}",
                timeout=300)
    nodes, chips = parse_nodes(r.stdout), parse_chips(r.stdout)
    assert nodes or chips, (f"balena-engine did not run a privileged container of {app_image} "
                            f"(exit {r.exit_code}):\n{r.stdout[-2000:]}")
    problems = [f"{n}: {nodes[n].state} {nodes[n].detail}" if n in nodes else f"{n}: no result"
                for n in t.dev_nodes if n not in nodes or not nodes[n].ok]
    problems += [f"{c}: {chips[c].state}, {chips[c].lines} lines (want {want})"
                 if c in chips else f"{c}: no result"
                 for c, want in t.gpio_chips.items()
                 if c not in chips or chips[c].lines != want]
    assert not problems, (f"inside a privileged container ({app_image}) the device type's nodes "
                          "are not all usable:\n" + "\n".join(problems))


def test_gpio_chip_read_with_libgpiod_in_a_privileged_container(
        dut: Dut, gpiod_image: str, gpio_chip: str) -> None:
    """An app shipping libgpiod's tools (Debian's gpiod), privileged as balena's builder makes a
    single-container release: gpiodetect lists the chip and gpioinfo reads every line's info
    through the GPIO character device."""
    script = chip_script([gpio_chip])
    r = dut.run(f"balena-engine run --rm --privileged {gpiod_image} sh -c "
                f"{shlex.quote(script)} 2>&1", timeout=300)
    chip = check_chip(dut, gpio_chip, r.stdout)
    assert chip.state == "gpiod", (
        f"{gpio_chip} was not read with libgpiod's tools in {gpiod_image} (probe: "
        f"{chip.state}):\n{r.stdout[-1500:]}")
    assert chip.label, f"gpiodetect in {gpiod_image} does not list {gpio_chip}:\n{r.stdout}"
