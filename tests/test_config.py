"""Rig files: every shipped one loads; every broken one gets one message with file, line, key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil.config import device_type_names, list_rigs, load_device_type, load_rig
from hil.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "rigs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_rig_file_is_valid(path: Path) -> None:
    cfg = load_rig(str(path))
    assert cfg.name == path.stem
    assert cfg.parts


@pytest.mark.parametrize("slug", device_type_names())
def test_every_device_type_loads(slug: str) -> None:
    assert load_device_type(slug).slug == slug


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rig.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    ("device_type: generic-aarch64\ntarget:\n  driver: qemu\n  memry: 512\n", 4, "target.memry",
     "unknown key"),
    ("device_type: generic-aarch64\ntarget:\n  driver: qemu\n  memory: lots\n", 4,
     "target.memory", "integer"),
    ("device_type: raspberry\ntarget: {driver: qemu}\n", 1, "device_type", "unknown device type"),
    ("device_type: generic-aarch64\npower:\n  driver: relay9\nconsole: {driver: serial, url: x}\n",
     3, "power.driver", "one of: "),
    ("device_type: generic-aarch64\n", 1, None, "needs either 'target:'"),
    ("device_type: generic-aarch64\ntarget: {driver: qemu}\ntimeouts:\n  boot: -1\n", 4,
     "timeouts.boot", "greater than 0"),
    ("device_type: generic-aarch64\nconsole:\n  driver: serial\npower: {driver: manual}\n", 2,
     "console", "exactly one of 'url' or 'match'"),
    ("power: {driver: manual}\nconsole: {driver: serial, url: x}\ndevice_type: intel-nuc\n", 3,
     "sd_mux", "a flasher board: the rig needs an 'sd_mux:'"),
    ("device_type: generic-aarch64\ntarget: {driver: qemu}\nemulator:\n  libvirtd: true\n"
     "  bord: {}\n", 5, "emulator.bord", "unknown key"),
    ("device_type: generic-aarch64\ntarget: {driver: qemu}\nemulator:\n  relay:\n"
     "    channels: 9\n", 5, "emulator.relay.channels", "less than or equal to 8"),
    ("device_type: [\n", 2, None, "invalid YAML"),
    ("- a\n- b\n", 1, None, "expected a mapping"),
])
def test_bad_rig_file_names_file_line_and_key(tmp_path: Path, text: str, line: int,
                                               key: str | None, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_rig(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:{line}"), message
    assert words in message
    if key:
        assert f": {key}: " in message


def test_on_and_off_are_keys_not_booleans(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare on/off as true/false; a rig file means the command power
    # driver's keys (booleans are still written true/false, or yes/no where pydantic reads them)
    cfg = load_rig(str(write(tmp_path, "device_type: generic-aarch64\ntarget: {driver: qemu}\n"
                                       "power:\n  driver: command\n  on: echo on\n"
                                       "  off: echo off\n")))
    power = cfg.parts["power"]
    assert (power.settings.on, power.settings.off) == ("echo on", "echo off")


def test_emulator_section_loads_typed(tmp_path: Path) -> None:
    rig = "device_type: generic-aarch64\ntarget: {driver: qemu}\n"
    cfg = load_rig(str(write(tmp_path, rig + "emulator: {libvirtd: true}\n")))
    assert cfg.emulator is not None and cfg.emulator.libvirtd
    assert load_rig(str(write(tmp_path, rig + "emulator: {}\n"))).emulator is None  # starts nothing


def test_unknown_rig_name_lists_the_known_ones(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # ./rigs is searched too: keep the repository's out of it
    monkeypatch.delenv("HIL_RIGS_DIR", raising=False)
    (tmp_path / "bench1.yaml").write_text("device_type: generic-aarch64\ntarget: {driver: qemu}\n")
    with pytest.raises(ConfigError, match="known rigs: bench1"):
        load_rig("bench2", tmp_path)
    assert [p.stem for p in list_rigs(tmp_path)] == ["bench1"]


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused; each example rewrites it

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["driver", "device_type", "target", "power", "memory",
                                       "console", "url", "timeouts", "boot", "x"]) | st.text(
                                           max_size=5), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=yaml_values)
def test_any_yaml_gives_a_config_error_never_a_traceback(tmp_path: Path, data: object) -> None:
    path = write(tmp_path, yaml.safe_dump(data))
    try:
        load_rig(str(path))
    except ConfigError as exc:
        assert str(exc).startswith(str(path))


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=st.text(max_size=200))
def test_any_text_gives_a_config_error_never_a_traceback(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    try:
        load_rig(str(path))
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
