"""A systemd timer's randomized delay as balenaOS's own tests check it: armed again and again,
the timer's next trigger moves within its ``RandomizedDelaySec``, so a fleet does not ask the
API at once. balenaOS's tests move the clock to re-arm a timer; restarting it re-arms it without
touching the clock, which the rest of the session relies on."""

from __future__ import annotations

import datetime
import re

from hil.dut import Dut
from hil.os import HostOS

_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600, "d": 86400,
               "w": 604800, "month": 2629800, "y": 31557600}


def timespan(text: str) -> float | None:
    """Seconds in a systemd timespan as `systemctl show` prints one ("1d 15min 3.5s")."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|min|month|s|h|d|w|y)\b", text)
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts) if parts else None


def timestamp(text: str) -> float | None:
    """Seconds since the epoch of a timestamp as `systemctl show` prints one
    ("Sun 2026-12-06 03:12:45 UTC"); None for none (empty or "n/a")."""
    match = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
    if match is None:
        return None
    # systemd prints the device's zone; balenaOS's and the reference OS's is UTC
    when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    return when.replace(tzinfo=datetime.UTC).timestamp()


def assert_randomized(dut: Dut, host_os: HostOS, timer: str, delay: str | None = None,
                      *, realtime: bool = False, times: int = 3) -> None:
    """The timer is active with a randomized delay of ``delay`` (as `systemctl show` prints it:
    "1h"; any non-zero delay where balenaOS's value is not pinned), and restarted ``times``
    times, its next trigger (after boot for a monotonic timer, since the epoch for a calendar
    one) differs each time, within that delay."""
    props = {p: host_os.unit_property(timer, p) for p in ("ActiveState", "RandomizedDelayUSec")}
    seconds = timespan(props["RandomizedDelayUSec"]) or 0.0
    assert props["ActiveState"] == "active" and seconds > 0 and (
        delay is None or props["RandomizedDelayUSec"] == delay), (
        f"{timer} must be active with a randomized delay of {delay or 'some length'}; it shows "
        f"{props}")
    prop, parse = (("NextElapseUSecRealtime", timestamp) if realtime
                   else ("NextElapseUSecMonotonic", timespan))

    def next_trigger() -> float:
        seen = [""]

        def probe() -> float | None:  # empty while the timer elapses or starts
            seen[0] = host_os.unit_property(timer, prop)
            return parse(seen[0])
        return dut.poll(probe, 30, f"{timer}'s next trigger ({prop})", lambda: repr(seen[0]),
                        interval=1.0)

    triggers = []
    for _ in range(times):
        host_os.check(f"systemctl restart {timer}")
        triggers.append(next_trigger())
    assert len(set(triggers)) == times, (
        f"re-armed {times} times, {timer} chose the same next trigger more than once "
        f"({prop}: {triggers}): not randomized")
    assert max(triggers) - min(triggers) <= seconds, (
        f"{timer}'s next triggers {triggers} ({prop}) spread over more than its randomized "
        f"delay of {props['RandomizedDelayUSec']}")
