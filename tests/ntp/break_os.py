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
    # chrony loses the servers config.json's ntpServers gave it ("chrony misconfigured")
    "chrony-no-servers": (
        "if [ -s /run/chrony/sources.d/config.sources ]; then "
        ": > /run/chrony/sources.d/config.sources && chronyc reload sources >/dev/null; fi"),
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
