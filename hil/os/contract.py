"""The host-OS contract as types: what an OS adapter (``dut.os``) offers the suites and the
framework, and the values it returns. ``hil/os/balena.py`` implements it for balenaOS and the
reference OS; an adapter for another OS implements ``HostOS`` and is passed to ``Dut``.

Boots and power belong to the device (``Dut``); the adapter only says how a boot of its OS
shows on the console (``boot_signature``) and what the rig can see of it (``boot_record``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from hil.console.log import Hit
from hil.console.shell import Result
from hil.errors import OSContractError
from hil.os.parse import BootLine, BootState, Mount
from hil.os.updates import UpdateImage

if TYPE_CHECKING:
    from hil.os.supervisor import SupervisorAPI
    from hil.refos.appimage import AppImage

__all__ = ["BootRecord", "HostOS", "OSContractError", "RootPart", "Roots", "RunningUpdate",
           "UpdateResult", "check"]


def check(condition: object, message: str) -> None:
    """Fail the test with ``message`` unless ``condition`` holds. The framework's own checks of
    the contract use this instead of ``assert``: pytest rewrites only test modules' asserts,
    and ``python -O`` strips them."""
    if not condition:
        raise OSContractError(message)


@dataclass(frozen=True)
class RootPart:
    label: str  # resin-rootA / resin-rootB
    device: str  # /dev/vda2
    number: int  # 2: what resin_root_part names

    def __str__(self) -> str:
        return f"{self.label} ({self.device})"


@dataclass(frozen=True)
class Roots:
    active: RootPart  # /dev/disk/by-state/active
    inactive: RootPart
    mounted_active: str  # SOURCE of /mnt/sysroot/active (must be active.device)

    def by_number(self, number: int) -> RootPart:
        for part in (self.active, self.inactive):
            if part.number == number:
                return part
        raise KeyError(number)


@dataclass(frozen=True)
class BootRecord:
    """One run of the bootloader, as far as the rig can see it. ``printed``: what the
    bootloader said it did (reference OS); ``stored``: its variables on the boot partition
    right after it printed, read by the rig host (rigs whose disk is a file). Either may be
    None where it cannot be observed."""

    start: int  # console offsets
    end: int
    printed: BootLine | None
    stored: BootState | None

    def __str__(self) -> str:
        bits = []
        if self.printed:
            bits.append(f"booted root {self.printed.root}, bootloader saw {self.printed.state}")
        if self.stored:
            bits.append(f"stored {self.stored}")
        return "; ".join(bits) or "a boot (bootloader state not observable on this rig)"


@dataclass(frozen=True)
class UpdateResult:
    image: UpdateImage
    target: RootPart
    seconds: float
    output: str


class RunningUpdate:
    """A ``hostapp-update`` started over SSH and not waited for (power-cut tests)."""

    def __init__(self, channel: Any, target: RootPart, started: float) -> None:
        self.channel, self.target, self.started = channel, target, started

    def finished(self) -> int | None:
        """The exit code once it has ended, else None."""
        if self.channel.exit_status_ready():
            return int(self.channel.recv_exit_status())
        return None

    def abandon(self) -> None:
        # the board may have lost power under it: nothing left to close
        with contextlib.suppress(Exception):
            self.channel.close()


# what an update can be built to break: its init, its health check, its VPN
UpdateBreak = Literal["init", "health", "vpn"]


class HostOS(Protocol):
    """A host-OS adapter. Commands run over the console unless the adapter is ``via_ssh()``;
    every method that looks at the device raises ``OSContractError`` where the device breaks
    the contract and ``InfraError`` where the rig fails."""

    bootloader: Literal["uboot", "grub"]  # the device type's

    # the framework's side: boots and the session's end
    def boot_signature(self) -> tuple[re.Pattern[bytes], str]:
        """What the console shows once per boot of this OS, and its description for errors."""
        ...
    def boot_record(self, hit: Hit) -> BootRecord: ...
    def learn(self) -> None:
        """Learn what the adapter must know of the running OS while a shell is there (its
        boots are recognised from it after the shell is gone)."""
        ...
    def flashed(self, reference: bool | None) -> None:
        """A new image is on the medium: forget what was learnt of the last one;
        ``reference``: whether it is the reference OS, where the caller knows (it built it)."""
        ...
    def close(self) -> None: ...

    # commands
    def via_ssh(self) -> HostOS: ...
    def run(self, command: str, timeout: float | None = None, *,
            read_only: bool = False) -> Result: ...
    def check(self, command: str, timeout: float | None = None, *,
              read_only: bool = False) -> str: ...
    def has_tools(self, *names: str) -> bool: ...

    # identity, release, network
    @property
    def is_reference_os(self) -> bool: ...
    def os_release(self, root: str = "/") -> dict[str, str]: ...
    def version(self, root: str = "/") -> str: ...
    def hostname(self) -> tuple[str, str]: ...
    def ssh_host_key(self) -> str: ...
    def listening_tcp_ports(self) -> set[int]: ...

    # partitions and /data
    def mounts(self) -> list[Mount]: ...
    def labels(self) -> dict[str, str]: ...
    def roots(self) -> Roots: ...
    @property
    def data_dir(self) -> str: ...
    def put_checked_file(self, name: str, kib: int = 512) -> str: ...
    def checked_file(self, name: str) -> str | None: ...
    def fsck_online(self, mountpoint: str = ...) -> tuple[bool, str] | None: ...
    def kernel_fs_errors(self, device: str) -> list[str]: ...

    # config.json
    def config_json(self) -> dict[str, Any]: ...
    def set_config(self, **changes: Any) -> None: ...

    # bootloader, updates, rollbacks
    def boot_state(self) -> BootState: ...
    def rollback_markers(self) -> set[str]: ...
    def health_variables(self) -> dict[str, str]: ...
    def shorten_health_check(self, count: int, timeout: int) -> None: ...
    def break_update(self, how: UpdateBreak) -> None: ...
    def vpn_configured(self) -> bool: ...
    def wait_vpn(self, timeout: float = 180.0) -> None: ...
    def wait_committed(self, timeout: float = 420.0) -> BootState: ...
    def ready_line(self, start: int, end: int | None = None) -> tuple[str, str] | None: ...
    def hostapp_update(self, image: UpdateImage, timeout: float = 900.0) -> UpdateResult: ...
    def start_hostapp_update(self, image: UpdateImage
                             ) -> tuple[RunningUpdate, Callable[[], None]]: ...
    @property
    def last_update_seconds(self) -> float | None: ...
    # containers (balenaEngine)
    def has_engine(self) -> bool: ...
    def wait_engine(self, timeout: float = 300.0) -> None: ...
    def load_image(self, image: AppImage, timeout: float = 600.0) -> str: ...
    def pull_image(self, reference: str, image: AppImage, timeout: float = 600.0) -> str: ...
    def engine_tcp_api(self) -> str | None: ...
    def log_mark(self) -> str: ...
    def log_since(self, mark: str) -> str: ...
    def restart_service(self, unit: str) -> None: ...
    def restart_engine(self) -> None: ...
    def engine_log(self) -> str: ...
    def unit_log(self, unit: str) -> str: ...
    def unit_property(self, unit: str, name: str) -> str: ...
    def hang_engine(self) -> None: ...
    # the supervisor's device API (apps run through it)
    def supervisor(self) -> SupervisorAPI: ...
