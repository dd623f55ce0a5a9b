"""Rig files: every shipped one loads; every broken one gets one message with file, line, key
(fuzzed: any YAML, any text, and 1000 damaged or mistyped copies of the shipped rig files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hil.config import device_type_names, list_rigs, load_device_type, load_rig
from hil.errors import ConfigError

from .fuzzing import FUZZ, damaged, damages

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
    ("device_type: generic-aarch64\ntarget: {driver: qemu}\nssh:\n  password: pw-123456\n"
     "  password_env: PW\n", 3, "ssh", "give password or password_env, not both"),
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


def test_wired_network_is_offered_by_boards_and_cabled_benches_not_wifi_ones(
        tmp_path: Path) -> None:
    """The wired check needs the DUT cabled to the rig host: QEMU boards and benches whose
    network link is wired offer ``wired_network``; a Wi-Fi bench does not (the check skips)."""
    assert load_rig(str(REPO / "rigs" / "qemu-aarch64.yaml")).has("wired_network")
    bench = RIG_TEXTS["rpi3.yaml"]
    assert load_rig(str(write(tmp_path, bench))).has("wired_network")
    wifi = bench.replace("  host_address: bench1.local",
                         "  link: wifi\n  host_address: bench1.local")
    assert wifi != bench
    assert not load_rig(str(write(tmp_path, wifi))).has("wired_network")


def test_the_console_password_comes_from_the_rig_file_or_its_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = "device_type: generic-aarch64\ntarget: {driver: qemu}\n"
    assert load_rig(str(write(tmp_path, rig))).console_password() is None
    inline = load_rig(str(write(tmp_path, rig + "ssh: {password: pw-in-file}\n")))
    assert inline.console_password() == "pw-in-file"
    assert "pw-in-file" not in repr(inline)  # a printed config shows no password
    path = write(tmp_path, rig + "ssh: {user: porter, password_env: PORTER_PW}\n")
    monkeypatch.setenv("PORTER_PW", "pw-in-env")
    assert load_rig(str(path)).console_password() == "pw-in-env"
    monkeypatch.delenv("PORTER_PW")
    with pytest.raises(ConfigError, match=r"PORTER_PW \(the console password\) is not set") as err:
        load_rig(str(path)).console_password()
    assert str(err.value).startswith(f"{path}: ssh.password_env: ")
    # a password the file gets wrong is named by its key, never shown
    with pytest.raises(ConfigError, match=r"ssh\.password: Input should be a valid string") as err:
        load_rig(str(write(tmp_path, rig + "ssh: {password: 73571337}\n")))
    assert "73571337" not in str(err.value)


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


RIG_TEXTS = {p.name: p.read_text() for p in sorted((REPO / "rigs").glob("*.yaml"))}
KEYS = ["device_type", "target", "power", "console", "sd_mux", "storage", "network", "timeouts",
        "ssh", "emulator", "features", "power_off_time", "gpio_loopback", "image"]
rig_edits = st.one_of(
    st.tuples(st.just("damage"), damages),  # malformed YAML
    st.tuples(st.just("set"), st.sampled_from(KEYS), yaml_values),  # wrong types
    st.tuples(st.just("add"), st.sampled_from([None, *KEYS]), st.text(min_size=1, max_size=8),
              yaml_values),  # unknown keys, at the top or inside a section
)


def edited_rig(text: str, edit: tuple[Any, ...]) -> bytes:
    if edit[0] == "damage":
        return damaged(text.encode(), edit[1])
    data = yaml.safe_load(text)
    if edit[0] == "set":
        data[edit[1]] = edit[2]
    elif edit[1] is None or not isinstance(data.get(edit[1]), dict):
        data[edit[2]] = edit[3]
    else:
        data[edit[1]][edit[2]] = edit[3]
    return yaml.safe_dump(data).encode()


@FUZZ
@given(name=st.sampled_from(sorted(RIG_TEXTS)), edit=rig_edits)
# nesting deeper than PyYAML's recursion: RecursionError escaped
@example(name="qemu-aarch64.yaml", edit=("damage", [("insert", 0, b"x: " + b"[" * 3000)]))
# a key given twice: YAML kept the last one without a word
@example(name="qemu-aarch64.yaml", edit=("damage", [("insert", 0, b"device_type: x\n")]))
# an infinite timeout is a wait without a deadline
@example(name="qemu-aarch64.yaml", edit=("set", "timeouts", {"boot": float("inf")}))
def test_damaged_rig_file_gives_a_config_error_naming_file_and_line(
        tmp_path: Path, name: str, edit: tuple[Any, ...]) -> None:
    path = tmp_path / name
    content = edited_rig(RIG_TEXTS[name], edit)
    path.write_bytes(content)
    try:
        load_rig(str(path))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}"), message
        if exc.line is not None:  # the line named is one of the file's
            assert 1 <= exc.line <= content.count(b"\n") + 1, message
    assert path.read_bytes() == content


def test_a_console_password_too_short_to_mask_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from hil import redact
    from hil.dut import Dut
    from hil.rig import Rig

    rig = "device_type: generic-aarch64\ntarget: {driver: qemu}\n"
    for password, warned in (("root", True), ("long-enough", False)):
        caplog.clear()
        cfg = load_rig(str(write(tmp_path, rig + f"ssh: {{password: {password}}}\n")))
        Dut(Rig(cfg, runtime=tmp_path))
        assert ("cannot mask it" in caplog.text) is warned, caplog.text
        assert (redact.text(f"login {password}") == f"login {password}") is warned
