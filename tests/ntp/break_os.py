"""A pytest plugin (``-p tests.ntp.break_os``) that breaks one of the OS's promises at runtime,
on the booted device, before every test: the suites must then fail, naming the promise.

``HIL_BREAK`` picks the break. Each is idempotent and re-applied before each test, because
the ``dut`` fixture power-cycles the board after a failed test (which would heal a runtime
break).
"""

from __future__ import annotations

import os

import pytest

from hil.dut import Dut

BREAKS = {
    # chrony ignores the servers config.json's ntpServers gives it ("chrony misconfigured"):
    # its config loses the sourcedir the OS writes them to. (Emptying that file instead would
    # not last: the OS rewrites it whenever config.json changes, e.g. at registration.)
    "chrony-no-servers": (
        "if grep -q sourcedir /run/chrony/chrony.conf; then "
        "sed -i /sourcedir/d /run/chrony/chrony.conf && killall chronyd && "
        "while pidof chronyd >/dev/null; do sleep 0.1; done && "
        "chronyd -u root -f /run/chrony/chrony.conf; fi"),
    # chrony runs without `makestep`: it slews a clock minutes off instead of stepping it
    "chrony-no-makestep": (
        "if grep -q makestep /run/chrony/chrony.conf; then "
        "sed -i /makestep/d /run/chrony/chrony.conf && killall chronyd && "
        "while pidof chronyd >/dev/null; do sleep 0.1; done && "
        "chronyd -u root -f /run/chrony/chrony.conf; fi"),
    # a device node the device type promises disappears
    "no-gpiochip0": "rm -f /dev/gpiochip0",
}


@pytest.fixture(autouse=True)
def _hil_break(dut: Dut) -> None:
    name = os.environ.get("HIL_BREAK", "")
    if name not in BREAKS:
        raise pytest.UsageError(f"HIL_BREAK={name!r}: choose one of {', '.join(BREAKS)}")
    dut.run_check(BREAKS[name], timeout=60)
