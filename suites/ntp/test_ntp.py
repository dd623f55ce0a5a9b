"""NTP: the device keeps its clock from the NTP servers that config.json names (``ntpServers``).

The server is a chronyd on the rig host (``hil.ntp.NtpServer``): no test needs internet time.
Waits are driven by `chronyc burst` (chrony measures now), not by its poll interval.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ntp_device import (
    APPLY_TIMEOUT,
    POLL_EVERY,
    NtpRig,
    device_config,
    parse_sources,
    set_ntp_servers,
)

from hil.dut import Dut

STEP = 300  # the device's clock is set this many seconds wrong: "minutes"
SHIFT = 197  # the server is set this far ahead: odd, so no timezone or rounding explains it
EXTRA_SERVER = "192.0.2.123"  # TEST-NET-1: never answers, only has to be listed


def set_clock_back(dut: Dut, seconds: int) -> None:
    before = dut.run_check("date +%s").stdout.strip()
    dut.run_check(f"date -s @$(( $(date +%s) - {seconds} )) >/dev/null")
    after = dut.run_check("date +%s").stdout.strip()
    assert int(before) - int(after) >= seconds - 30, (
        f"`date -s` did not set the clock back {seconds}s: {before} -> {after}")


def wait_log(dut: Dut, mark: str, pattern: str, promise: str, timeout: float = 30.0, *,
             accept: Callable[[re.Match[str]], bool] = lambda m: True) -> re.Match[str]:
    """The first message after ``mark`` in the system log (journald may lag a moment) that
    matches ``pattern`` and that ``accept`` takes (chrony may log other steps meanwhile)."""
    last = [""]

    def probe() -> re.Match[str] | None:
        last[0] = dut.os.log_since(mark)
        return next((m for m in re.finditer(pattern, last[0]) if accept(m)), None)

    return dut.poll(probe, timeout, promise,
                    lambda: last[0][-3000:] or "(nothing logged since)", interval=POLL_EVERY)


def test_synchronises_to_the_rig_ntp_server(ntp: NtpRig, dut: Dut) -> None:
    v = ntp.wait_synced(f"the device synchronises to the NTP server in ntpServers "
                        f"({ntp.address}): chronyc shows it selected (^*), leap status Normal, "
                        "and the device clock on the server's time")
    assert v.tracking is not None and v.tracking.stratum == ntp.server.stratum + 1, (
        f"chronyc tracking reports stratum {v.tracking and v.tracking.stratum}; "
        f"the server serves stratum {ntp.server.stratum}")


def test_ntp_servers_written_at_runtime_reach_chrony(ntp: NtpRig, dut: Dut) -> None:
    """A server added to ``ntpServers`` at runtime is among chrony's sources within a minute,
    and gone again once the key is put back (balenaOS's config-json ntpServer test)."""
    original = device_config(dut).get("ntpServers")
    servers = str(original or "").split()
    last = [""]

    def listed() -> bool:
        last[0] = dut.run("chronyc -c -n sources").stdout
        return any(s.address == EXTRA_SERVER for s in parse_sources(last[0]))

    def seen(mark: str) -> Callable[[], str]:
        """What chronyc listed, and what the OS logged applying config.json (its units' runs)."""
        def describe() -> str:
            try:
                log = dut.os.log_since(mark)[-3000:]
            except Exception as exc:  # the failure to report is the poll's, not this one's
                log = f"(not readable: {exc})"
            return f"{last[0].strip()}\n--- system log since the write ---\n{log}"
        return describe

    mark = dut.os.log_mark()
    set_ntp_servers(dut, " ".join([*servers, EXTRA_SERVER]))
    try:
        dut.poll(listed, APPLY_TIMEOUT, f"{EXTRA_SERVER}, added to ntpServers at runtime, among "
                 "chrony's sources", seen(mark), interval=POLL_EVERY)
    finally:
        mark = dut.os.log_mark()
        set_ntp_servers(dut, None if original is None else str(original))
    dut.poll(lambda: not listed(), APPLY_TIMEOUT, f"{EXTRA_SERVER} gone from chrony's sources "
             "once ntpServers no longer names it", seen(mark), interval=POLL_EVERY)


def test_steps_back_after_its_clock_is_set_wrong(ntp: NtpRig, dut: Dut) -> None:
    ntp.wait_synced("precondition: the device is synchronised")
    mark = dut.os.log_mark()
    set_clock_back(dut, STEP)
    ntp.wait_synced(f"after its clock was set {STEP}s wrong, the device steps back to the NTP "
                    "server's time")
    # a step of about the error; the health check's own makestep may log one of 0 s meanwhile
    wait_log(dut, mark, r"System clock was stepped by (-?[0-9.]+) seconds",
             f"chrony logs a step of the clock by about {STEP}s (it was {STEP}s wrong)",
             accept=lambda m: abs(abs(float(m.group(1))) - STEP) < 10)


def test_takes_its_time_from_the_selected_server(ntp: NtpRig, dut: Dut) -> None:
    ntp.wait_synced("precondition: the device is synchronised")
    ntp.require_only_source()
    ntp.server.set_offset(SHIFT)
    try:
        # A jump of the device's own clock makes chrony drop its samples and measure afresh;
        # otherwise it filters the server's sudden change as outliers for several polls.
        set_clock_back(dut, STEP)
        ntp.wait_synced(f"with its NTP server {SHIFT}s ahead of true time, the device takes the "
                        "server's time")
    finally:
        ntp.server.set_offset(0)
        set_clock_back(dut, SHIFT)  # near true time again; chrony finishes the job
    ntp.wait_synced("with its server back on true time, the device follows it back")


def test_reports_no_online_sources_when_the_server_is_down(ntp: NtpRig, dut: Dut) -> None:
    ntp.wait_synced("precondition: the device is synchronised")
    ntp.require_only_source()
    mark = dut.os.log_mark()
    ntp.server.stop()
    v = ntp.wait_unreachable()
    src = v.source(ntp.address)
    assert src is not None and src.reach == 0
    wait_log(dut, mark, r"(Can't|Cannot) synchroni[sz]e: no selectable sources",
             "with its only NTP server down, chrony logs that it cannot synchronise")
    assert ntp.server.ignored_requests > 0, "nothing asked the stopped server for the time"


def test_health_check_forces_a_poll_then_reports_the_lost_sync(ntp: NtpRig, dut: Dut) -> None:
    """balenaOS's chrony-healthcheck, run by healthdog when chronyd starts and then 120 s after
    each run: with no source in sync it forces a poll and a step, and when chrony is still not
    in sync 60 s later it fails, so that the unit's watchdog restarts chronyd. Here, as in
    balenaOS's own test, chronyd is restarted with its server unreachable (stopped by the test
    before). The first run can come before chronyd answers (healthdog starts it with chronyd):
    then only the next one, 120 s later, waits the 60 s and reports."""
    ntp.take_server_down()  # already down when the test before ran
    mark = dut.os.log_mark()
    dut.os.restart_service("chronyd")
    wait_log(dut, mark, r"No online NTP sources - forcing poll",
             "chrony-healthcheck, with no NTP source online, forces a poll", timeout=90)
    wait_log(dut, mark, r"NTP time lost synchronization - restarting chronyd",
             "chrony-healthcheck reports the lost synchronisation after waiting 60 s for it",
             timeout=240)


def test_resynchronises_when_the_server_is_back(ntp: NtpRig, dut: Dut) -> None:
    ntp.take_server_down()  # already down when the test before ran
    mark = dut.os.log_mark()
    ntp.server.start()
    ntp.wait_synced("with its NTP server back, the device resynchronises to it")
    wait_log(dut, mark, rf"Selected source {re.escape(ntp.address)}",
             "chrony logs that it selected the server again")
