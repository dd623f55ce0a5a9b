"""The GPIO relay driver at the gpiod boundary.

This kernel has no GPIO support at all (CONFIG_GPIOLIB off: no gpio-sim, no gpio-mockup), so
``gpiod.request_lines`` (the ioctl) is replaced by a line model; the settings objects are the
real gpiod ones, so the driver's use of the library's API is checked for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gpiod
import pytest
from gpiod.line import Direction, Drive, Value

from hil.errors import InfraError
from hil.power.gpio import GpioRelay, GpioRelaySettings
from hil.registry import PartContext


class Request:
    def __init__(self, path: str, consumer: str, config: dict[Any, gpiod.LineSettings]) -> None:
        self.path, self.consumer = path, consumer
        ((self.line, self.settings),) = config.items()
        self.value = self.settings.output_value  # logical value (active_low is the kernel's)
        self.released = False
        self.stuck = False

    def set_value(self, line: Any, value: Value) -> None:
        assert line == self.line and not self.released
        if not self.stuck:
            self.value = value

    def get_value(self, line: Any) -> Value:
        assert line == self.line
        return self.value

    def release(self) -> None:
        self.released = True


def level(req: Request) -> Value:
    return req.value


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    made: list[Request] = []

    def request_lines(path: str, consumer: str, config: dict[Any, gpiod.LineSettings]) -> Request:
        if not Path(path).name.startswith("gpiochip"):
            raise FileNotFoundError(2, "No such file or directory")
        made.append(Request(path, consumer, config))
        return made[-1]

    monkeypatch.setattr(gpiod, "request_lines", request_lines)
    return made


def test_gpio_is_really_absent() -> None:
    assert not list(Path("/dev").glob("gpiochip*")) or pytest.skip("real GPIO chips here")


def test_active_low_relay(requests: list[Request], ctx: PartContext) -> None:
    r = GpioRelay(GpioRelaySettings(chip="gpiochip2", line="GPIO17", active_low=True), ctx)
    assert r.is_on() is None  # not driven by us yet
    r.on()
    (req,) = requests
    assert req.path == "/dev/gpiochip2" and req.consumer == "hil:bench1"
    assert req.settings.direction == Direction.OUTPUT and req.settings.active_low
    assert req.settings.drive == Drive.PUSH_PULL
    assert level(req) == Value.ACTIVE and r.is_on() is True
    r.off()
    assert level(req) == Value.INACTIVE and r.is_on() is False
    assert len(requests) == 1  # the line stays requested between switches
    r.close()
    assert req.released


def test_normally_closed_starts_from_the_right_level(requests: list[Request],
                                                    ctx: PartContext) -> None:
    r = GpioRelay(GpioRelaySettings(line=5, normally="closed", drive="open-drain"), ctx)
    r.off()  # NC: power off = coil energised
    assert requests[0].settings.output_value == Value.ACTIVE
    assert requests[0].settings.drive == Drive.OPEN_DRAIN
    assert r.is_on() is False
    r.close()


def test_line_that_does_not_follow(requests: list[Request], ctx: PartContext) -> None:
    r = GpioRelay(GpioRelaySettings(line=5), ctx)
    r.off()
    requests[0].stuck = True
    with pytest.raises(InfraError, match="reads inactive after driving it active"):
        r.on()


def test_missing_chip(requests: list[Request], ctx: PartContext) -> None:
    r = GpioRelay(GpioRelaySettings(chip="/dev/nochip", line=1), ctx)
    with pytest.raises(InfraError, match="GPIO /dev/nochip line 1"):
        r.on()
