"""The devices suite is driven by the device type's data (``hil/devicetypes/<slug>.yaml``):
every ``dev_nodes`` entry, ``gpio_chips`` entry and ``gpio_free_lines`` entry becomes its own
test, so a board porter sees each node, chip and line pass or fail by name."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hil.config import DeviceType
from hil.plugin import configured_rig

# fixture argument -> (device type key, what it is drawn from)
DATA: dict[str, tuple[str, Callable[[DeviceType], list[str]]]] = {
    "dev_node": ("dev_nodes", lambda t: list(t.dev_nodes)),
    "gpio_chip": ("gpio_chips", lambda t: sorted(t.gpio_chips)),
    "gpio_free_line": ("gpio_free_lines", lambda t: list(t.gpio_free_lines)),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = configured_rig(metafunc.config)
    for arg, (key, values) in DATA.items():
        if arg not in metafunc.fixturenames:
            continue
        if cfg is None:  # no rig: one placeholder, which the rig fixtures skip
            metafunc.parametrize(arg, ["(no rig)"])
            continue
        dtype: DeviceType = cfg.device_type
        found: list[object] = list(values(dtype))
        if not found:
            found = [pytest.param("(none)", marks=pytest.mark.skip(
                reason=f"device type {dtype.slug} lists no {key} (hil/devicetypes/"
                       f"{dtype.slug}.yaml)"))]
        metafunc.parametrize(arg, found)
