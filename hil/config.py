"""Rig and device-type files → validated, typed models.

Errors always name the file, the line and the key path, and say what was expected. Any YAML,
however broken, yields one ``ConfigError`` and never a traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator

from hil import registry
from hil.errors import ConfigError
from hil.redact import is_secret_key
from hil.registry import Settings

if TYPE_CHECKING:
    from hil.emu.settings import EmulatorSettings


class ConsoleSpec(Settings):
    device: str = Field(description="console device name on the DUT, e.g. ttyAMA0")
    baud: int = Field(115200, gt=0)


class DeviceType(Settings):
    """What a board type brings: data only, shipped in ``hil/devicetypes/<slug>.yaml``."""

    slug: str
    name: str
    arch: Literal["aarch64", "armv7hf", "amd64", "x86_64"]
    bootloader: Literal["uboot", "grub"]
    boot_media: Literal["sd", "emmc", "usb", "disk"]
    flasher: bool = False
    console: ConsoleSpec
    config_txt: list[str] = []
    dev_nodes: list[str] = []
    gpio_chips: dict[str, int] = {}
    # chip:line entries nothing is wired to: the devices suite may drive them as outputs
    gpio_free_lines: list[str] = []
    features: list[str] = []
    # balenaOS's own limit in its engine health-check performance test, for the types it has
    # figures for (a few Raspberry Pis); none: the containers suite does not time it
    engine_healthcheck_budget: float | None = Field(
        None, gt=0, description="seconds three balena-healthcheck runs in a row may take")

    @property
    def uname_machines(self) -> set[str]:
        """What ``uname -m`` may print on this device type (32-bit userlands on 64-bit kernels)."""
        return {"aarch64": {"aarch64"}, "armv7hf": {"armv7l", "aarch64"},
                "amd64": {"x86_64"}, "x86_64": {"x86_64"}}[self.arch]


class Timeouts(Settings):
    boot: float = Field(180.0, gt=0, description="power on → shell, seconds")
    command: float = Field(60.0, gt=0, description="default deadline for one DUT command")
    flash: float = Field(900.0, gt=0, description="writing and verifying the image")
    power: float = Field(10.0, gt=0, description="one power switch call")
    mux: float = Field(30.0, gt=0, description="SD mux switch until the block device appears")
    install: float = Field(900.0, gt=0, description="flasher boards: installer power-on → it "
                           "powers the board off")


class SshSettings(Settings):
    user: str = Field("root", description="login on the console and over SSH")
    port: int = Field(22222, gt=0, lt=65536, description="the OS's SSH port")
    key: Path | None = Field(None, description="private key file; default: a generated one")
    password: SecretStr | None = Field(None, description="the console login's password, typed "
                                       "at `Password:` (never logged; prefer password_env)")
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="the environment variable holding the console "
                                     "login's password")

    @model_validator(mode="after")
    def _one_password(self) -> SshSettings:
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        return self


class GpioLoopback(Settings):
    """An output line of the DUT wired to an input line of the DUT (a jumper)."""

    output: str = Field(description="chip:line, e.g. gpiochip0:17")
    input: str = Field(description="chip:line, e.g. gpiochip0:27")


@dataclass(frozen=True)
class PartConfig:
    part: str
    driver: str
    settings: BaseModel


@dataclass(frozen=True)
class RigConfig:
    name: str
    source: Path
    description: str
    device_type: DeviceType
    parts: dict[str, PartConfig]
    features: frozenset[str]
    image: str | None
    power_off_time: float
    timeouts: Timeouts
    ssh: SshSettings
    gpio_loopback: GpioLoopback | None
    emulator: EmulatorSettings | None

    def has(self, feature: str) -> bool:
        return feature in self.features

    def console_password(self) -> str | None:
        """The console login's password (``ssh.password``, or the variable ``ssh.password_env``
        names), None when the rig gives none."""
        if self.ssh.password_env is not None:
            value = os.environ.get(self.ssh.password_env)
            if not value:
                raise ConfigError(f"environment variable {self.ssh.password_env} (the console "
                                  "password) is not set", file=str(self.source),
                                  key="ssh.password_env")
            return value
        return self.ssh.password.get_secret_value() if self.ssh.password else None


class _RigTop(Settings):
    description: str = Field("", description="one line for `hil rigs`")
    device_type: str = Field(description="a slug from hil/devicetypes/ (`hil device-types`)")
    image: str | None = Field(None, description="default image: a path, or 'refos'")
    features: list[str] = Field([], description="extra features this rig offers (wiring, "
                                "peripherals) for @pytest.mark.needs")
    power_off_time: float = Field(1.0, ge=0, description="seconds off in a power cycle")
    timeouts: Timeouts = Field(Timeouts(), description="deadlines, seconds")
    ssh: SshSettings = Field(SshSettings(), description="how to log in to the OS")
    gpio_loopback: GpioLoopback | None = Field(None, description="a DUT output wired to a DUT "
                                               "input, for the devices suite")
    emulator: dict[str, Any] | None = Field(
        None, description="emulated bench hardware to start with the rig (see docs/rigs.md)")
    target: dict[str, Any] | None = Field(None, description="a whole virtual board (qemu, "
                                          "libvirt): power, console, storage and network")
    power: dict[str, Any] | None = Field(None, description="what switches the board's supply")
    console: dict[str, Any] | None = Field(None, description="the board's serial console")
    sd_mux: dict[str, Any] | None = Field(None, description="what moves the boot medium "
                                          "between the rig host and the board")
    storage: dict[str, Any] | None = Field(None, description="where the image is written")
    network: dict[str, Any] | None = Field(None, description="how SSH reaches the board")


# --- YAML with line numbers -------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true and false. PyYAML follows YAML 1.1, where yes/no/on/off
    are booleans too, so a power driver's ``on:`` key would arrive as ``True``. (Boolean
    settings still accept yes/no/on/off: pydantic reads those strings.)"""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _line_index(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int],
                file: Path) -> None:
    """Each key path's line; a key given twice in one mapping is refused (YAML would keep the
    last one and silently drop the first)."""
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            if k in seen and k != "<<":  # merge keys may repeat
                raise ConfigError("key given twice in one mapping (the first would be lost)",
                                  file=str(file), line=key.start_mark.line + 1,
                                  key=".".join(str(p) for p in (*path, k)))
            seen.add(k)
            out[(*path, k)] = key.start_mark.line + 1
            _line_index(value, (*path, k), out, file)
            out[(*path, k)] = key.start_mark.line + 1  # the key's line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out, file)


def _read_yaml(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=str(path)) from None
    lines: dict[tuple[Any, ...], int] = {}
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader
        if node is not None:
            _line_index(node, (), lines, path)
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise ConfigError("invalid YAML: nested too deeply", file=str(path)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(f"invalid YAML: {exc.problem or exc.context}", file=str(path),
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=str(path)) from None
    return data, lines


def _line_for(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _validation_error(exc: ValidationError, path: Path, lines: dict[tuple[Any, ...], int],
                      prefix: tuple[Any, ...] = ()) -> ConfigError:
    err = exc.errors()[0]
    loc = (*prefix, *err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    given = err.get("input")
    if (err["type"] not in ("missing", "extra_forbidden") and not isinstance(given, dict | list)
            and not any(is_secret_key(str(p)) for p in loc)):  # a bad password is not shown
        msg += f" (got {given!r})"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(msg, file=str(path), line=_line_for(lines, loc), key=key)


# --- device types -----------------------------------------------------------------------------

def device_type_names() -> list[str]:
    folder = resources.files("hil") / "devicetypes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def load_device_type(slug: str) -> DeviceType:
    folder = resources.files("hil") / "devicetypes"
    entry = folder / f"{slug}.yaml"
    if not entry.is_file():
        raise ConfigError(f"unknown device type {slug!r}; known: {', '.join(device_type_names())}",
                          key="device_type")
    path = Path(str(entry))
    data, lines = _read_yaml(path)
    try:
        return DeviceType.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, path, lines) from None


# --- rigs -------------------------------------------------------------------------------------

def rigs_dirs(extra: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where rig names are looked up: --rigs-dir, $HIL_RIGS_DIR, ./rigs."""
    dirs = [Path(extra)] if extra else []
    if os.environ.get("HIL_RIGS_DIR"):
        dirs += [Path(p) for p in os.environ["HIL_RIGS_DIR"].split(os.pathsep) if p]
    dirs.append(Path.cwd() / "rigs")
    return dirs


def find_rig(name_or_path: str, rigs_dir: str | os.PathLike[str] | None = None) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not candidate.is_file():
            raise ConfigError("rig file not found", file=str(candidate))
        return candidate
    searched = rigs_dirs(rigs_dir)
    for folder in searched:
        for suffix in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{suffix}").is_file():
                return folder / f"{name_or_path}{suffix}"
    known = sorted({p.stem for d in searched if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"no rig named {name_or_path!r} in {', '.join(map(str, searched))}; "
                      f"known rigs: {', '.join(known) or 'none'}")


def _part(name: str, raw: Any, path: Path, lines: dict[tuple[Any, ...], int]) -> PartConfig:
    line = _line_for(lines, (name,))
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping with a 'driver:' key", file=str(path), line=line,
                          key=name)
    driver = raw.get("driver")
    if not isinstance(driver, str):
        raise ConfigError(f"missing 'driver:'; one of: {', '.join(registry.known(name))}",
                          file=str(path), line=line, key=name)
    try:
        cls = registry.lookup(name, driver)
    except ImportError as exc:  # a driver whose library is not installed on this host
        raise ConfigError(f"driver {driver!r} cannot be loaded: {exc} (pip install "
                          "'pytest-hil[hw]' for hardware drivers)", file=str(path),
                          line=_line_for(lines, (name, "driver")), key=f"{name}.driver") from None
    if cls is None:
        raise ConfigError(f"unknown driver {driver!r}; one of: {', '.join(registry.known(name))}",
                          file=str(path), line=_line_for(lines, (name, "driver")),
                          key=f"{name}.driver")
    settings = {k: v for k, v in raw.items() if k != "driver"}
    try:
        model = cls.Settings.model_validate(settings)
    except ValidationError as exc:
        raise _validation_error(exc, path, lines, (name,)) from None
    return PartConfig(part=name, driver=driver, settings=model)


def _emulator(raw: dict[str, Any], path: Path,
              lines: dict[tuple[Any, ...], int]) -> EmulatorSettings:
    # imported here, like a driver's Settings: only rigs with an emulator: pay for it
    from hil.emu.settings import EmulatorSettings

    try:
        return EmulatorSettings.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, path, lines, ("emulator",)) from None


def load_rig(name_or_path: str, rigs_dir: str | os.PathLike[str] | None = None) -> RigConfig:
    path = find_rig(name_or_path, rigs_dir)
    data, lines = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of rig settings, got {type(data).__name__}",
                          file=str(path), line=1)
    if any(not isinstance(k, str) for k in data):
        bad = next(k for k in data if not isinstance(k, str))
        raise ConfigError(f"keys must be names, got {bad!r}", file=str(path))
    try:
        top = _RigTop.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, path, lines) from None
    try:
        dtype = load_device_type(top.device_type)
    except ConfigError as exc:
        raise ConfigError(str(exc).removeprefix("device_type: "), file=str(path),
                          line=_line_for(lines, ("device_type",)), key="device_type") from None
    parts: dict[str, PartConfig] = {}
    for name in registry.PARTS:
        raw = getattr(top, name)
        if raw is not None:
            parts[name] = _part(name, raw, path, lines)
    if "target" not in parts and not {"power", "console"} <= parts.keys():
        raise ConfigError("a rig needs either 'target:' (a QEMU or libvirt board) or at least "
                          "'power:' and 'console:'", file=str(path), line=1)
    if dtype.flasher and "target" not in parts and "sd_mux" not in parts:
        raise ConfigError(f"{dtype.slug} is a flasher board: the rig needs an 'sd_mux:' to take "
                          "the installer medium away after it has run", file=str(path),
                          line=_line_for(lines, ("device_type",)), key="sd_mux")
    # an empty emulator: section starts nothing, as if it were absent
    emulator = _emulator(top.emulator, path, lines) if top.emulator else None
    features = set(top.features) | set(dtype.features)
    if top.gpio_loopback:
        features.add("gpio_loopback")
    for part in parts:
        features.add(part)
    # a QEMU or libvirt board's NIC is wired (virtio or e1000 to the host's user network)
    net = parts.get("network")
    if "target" in parts or (net is not None and getattr(net.settings, "link", "") == "wired"):
        features.add("wired_network")
    return RigConfig(
        name=path.stem, source=path, description=top.description, device_type=dtype,
        parts=parts, features=frozenset(features), image=top.image,
        power_off_time=top.power_off_time, timeouts=top.timeouts, ssh=top.ssh,
        gpio_loopback=top.gpio_loopback, emulator=emulator,
    )


def list_rigs(rigs_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    seen: dict[str, Path] = {}
    for folder in rigs_dirs(rigs_dir):
        if folder.is_dir():
            for p in sorted(folder.glob("*.yaml")):
                seen.setdefault(p.stem, p)
    return list(seen.values())
