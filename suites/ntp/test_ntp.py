"""NTP: the device keeps its clock from the NTP servers that config.json names (``ntpServers``).

The server is a chronyd on the rig host (``hil.ntp.NtpServer``): no test needs internet time.
Waits are driven by `chronyc burst` (chrony measures now), not by its poll interval.
"""

from __future__ import annotations

import re

from ntp_device import POLL_EVERY, NtpRig, log_mark, log_since

from hil.dut import Dut

STEP = 300  # the device's clock is set this many seconds wrong: "minutes"
SHIFT = 197  # the server is set this far ahead: odd, so no timezone or rounding explains it


def set_clock_back(dut: Dut, seconds: int) -> None:
    before = dut.run_check("date +%s").stdout.strip()
    dut.run_check(f"date -s @$(( $(date +%s) - {seconds} )) >/dev/null")
    after = dut.run_check("date +%s").stdout.strip()
    assert int(before) - int(after) >= seconds - 30, (
        f"`date -s` did not set the clock back {seconds}s: {before} -> {after}")


def wait_log(dut: Dut, mark: str, pattern: str, promise: str) -> re.Match[str]:
    """chrony's message after ``mark`` in the system log (journald may lag a moment)."""
    last = [""]

    def probe() -> re.Match[str] | None:
        last[0] = log_since(dut, mark)
        return re.search(pattern, last[0])

    return dut.poll(probe, 30, promise, lambda: last[0][-3000:] or "(nothing logged since)",
                    interval=POLL_EVERY)


def test_synchronises_to_the_rig_ntp_server(ntp: NtpRig, dut: Dut) -> None:
    v = ntp.wait_synced(f"the device synchronises to the NTP server in ntpServers "
                        f"({ntp.address}): chronyc shows it selected (^*), leap status Normal, "
                        "and the device clock on the server's time")
    assert v.tracking is not None and v.tracking.stratum == ntp.server.stratum + 1, (
        f"chronyc tracking reports stratum {v.tracking and v.tracking.stratum}; "
        f"the server serves stratum {ntp.server.stratum}")


def test_steps_back_after_its_clock_is_set_wrong(ntp: NtpRig, dut: Dut) -> None:
    ntp.wait_synced("precondition: the device is synchronised")
    mark = log_mark(dut)
    set_clock_back(dut, STEP)
    ntp.wait_synced(f"after its clock was set {STEP}s wrong, the device steps back to the NTP "
                    "server's time")
    m = wait_log(dut, mark, r"System clock was stepped by (-?[0-9.]+) seconds",
                 "chrony logs the step of the clock")
    assert abs(abs(float(m.group(1))) - STEP) < 10, (
        f"chrony stepped the clock by {m.group(1)}s; it was {STEP}s wrong")


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
    mark = log_mark(dut)
    ntp.server.stop()
    v = ntp.wait_unreachable()
    src = v.source(ntp.address)
    assert src is not None and src.reach == 0
    wait_log(dut, mark, r"(Can't|Cannot) synchroni[sz]e: no selectable sources",
             "with its only NTP server down, chrony logs that it cannot synchronise")
    assert ntp.server.ignored_requests > 0, "nothing asked the stopped server for the time"


def test_resynchronises_when_the_server_is_back(ntp: NtpRig, dut: Dut) -> None:
    if ntp.server.running:  # run on its own: take the server down first
        ntp.wait_synced("precondition: the device is synchronised")
        ntp.require_only_source()
        ntp.server.stop()
        ntp.wait_unreachable()
    mark = log_mark(dut)
    ntp.server.start()
    ntp.wait_synced("with its NTP server back, the device resynchronises to it")
    wait_log(dut, mark, rf"Selected source {re.escape(ntp.address)}",
             "chrony logs that it selected the server again")
