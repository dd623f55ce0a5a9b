"""docs/rigs.md's reference is generated from the Settings models and must be up to date."""

from __future__ import annotations

import importlib

import pytest

from hil import docgen, registry
from hil.emu.settings import ConsoleEmu, EmulatorSettings, RelayEmu

OURS = ("hil.power.", "hil.mux.", "hil.qemu.libvirt")


def test_rigs_md_is_up_to_date() -> None:
    assert docgen.main(["--check"]) == 0, "run: python -m hil.docgen"


@pytest.mark.parametrize("key", sorted(k for k, v in registry.BUILTIN.items()
                                       if v.startswith(OURS)))
def test_every_setting_is_documented(key: tuple[str, str]) -> None:
    module, _, attr = registry.BUILTIN[key].partition(":")
    settings = getattr(importlib.import_module(module), attr).Settings
    own = settings.model_fields
    if module == "hil.qemu.libvirt":  # inherits QemuSettings (documented there)
        own = {k: v for k, v in own.items() if k in ("uri", "name")}
    assert [n for n, f in own.items() if not f.description] == []


def test_emulator_settings_are_documented() -> None:
    for model in (EmulatorSettings, RelayEmu, ConsoleEmu):
        assert [n for n, f in model.model_fields.items() if not f.description] == []
