"""Shared by the emulated-bench tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hil.config import RigConfig
from hil.registry import PartContext, lookup

RigMaker = Callable[..., RigConfig]


def part(rig: RigConfig, name: str, runtime: Path) -> object:
    """The rig's ``name`` part, built the way a rig builds it."""
    cfg = rig.parts[name]
    cls = lookup(name, cfg.driver)
    assert cls is not None
    return cls(cfg.settings, PartContext(rig=rig.name, part=name, runtime=runtime,
                                         device_type=rig.device_type))
