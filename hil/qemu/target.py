"""A QEMU board (``target: {driver: qemu}``), TCG only.

Power on starts QEMU; power off kills it (a real power cut, no clean shutdown), and by default
its disk's write cache with it: what the guest wrote but never flushed is lost, as on a board
(``hil.qemu.writecache``). The serial port
is a unix socket that QEMU holds in ``wait=on`` until our console reader is connected, so the
first byte of firmware output is captured. QMP (``qemu.qmp``) gives status and reset.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from hil.console.serial import SerialConsole, SerialSettings
from hil.deadline import Deadline, wait_until
from hil.errors import InfraError, log_tail
from hil.qemu import TB_SIZE_MIB, kill_session
from hil.qemu.firmware import default_firmware
from hil.qemu.writecache import VolatileWriteCache
from hil.registry import PartContext, Settings
from hil.storage import FileStorage, FileStorageSettings

log = logging.getLogger(__name__)


class QemuSettings(Settings):
    arch: Literal["aarch64", "x86_64"] | None = Field(None, description="default: device type")
    memory: int = Field(512, gt=0, description="MiB")
    tb_size: int | None = Field(TB_SIZE_MIB, gt=0, description="TCG translation cache in MiB "
                                "(null: QEMU's 1024). QEMU keeps translations across a guest "
                                "reboot; with a cache that seldom fills, a bootloader copying "
                                "a kernel over the old kernel's pages crawls (GRUB took minutes)")
    smp: int = Field(1, gt=0, description="virtual CPUs")
    cpu: str | None = Field(None, description="default cortex-a53 (aarch64), qemu64 (x86_64)")
    machine: str | None = Field(None, description="default virt,acpi=off (aarch64), pc (x86_64)")
    firmware: Path | None = Field(None, description="-bios; default U-Boot for aarch64, "
                                  "SeaBIOS (built in) for x86_64")
    bootdelay: int | None = Field(0, ge=0, le=9, description="the default U-Boot's autoboot "
                                  "countdown in seconds, as a lab sets its boards' (null: as "
                                  "built, 2)")
    kernel: Path | None = Field(None, description="boot a kernel directly instead of the disk")
    initrd: Path | None = Field(None, description="initramfs for a direct kernel boot")
    append: str | None = Field(None, description="kernel command line for a direct kernel boot")
    disk: Path = Field(Path("disk.img"), description="disk file (relative: in the rig's "
                       "runtime directory)")
    disk_size: int = Field(2 * 1024**3, gt=0, description="bytes (sparse file)")
    write_cache: Literal["volatile", "host"] = Field(
        "volatile", description="volatile: the disk keeps writes in a cache (nbdkit) until the "
        "guest flushes them, and a power cut loses the rest, as an SD card or SSD does; host: "
        "QEMU writes into the host's page cache, and a power cut loses nothing")
    devices: list[str] = Field([], description="extra -device arguments, e.g. i6300esb")
    ssh_port: int = Field(22222, gt=0, lt=65536, description="guest SSH port to forward")
    extra_args: list[str] = Field([], description="more QEMU arguments, appended as given")


def die_with_parent() -> None:
    """Child-side: SIGKILL this process when the framework dies, even by SIGKILL, so no QEMU
    (no powered board) outlives the session that owned it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def board_firmware(s: QemuSettings, arch: str) -> Path | None:
    """The ``-bios`` file: the rig's, else the default one (none for a direct kernel boot)."""
    return s.firmware or (None if s.kernel else default_firmware(arch, bootdelay=s.bootdelay))


def disk_drive(path: Path, node: str) -> list[str]:
    """A disk file QEMU writes into the host's page cache (``write_cache: host``)."""
    # nothing is lost at a power cut either way: flushes to the page cache buy nothing
    return ["-drive", f"file={path},format=raw,if=none,id={node},cache=unsafe"]


def qemu_command(s: QemuSettings, arch: str, *, binary: str, firmware: Path | None,
                 drive: Sequence[str], console: Sequence[str], ssh_port: int | None,
                 monitor: Sequence[str] = ()) -> list[str]:
    """The QEMU command line of a board with settings ``s``: the one place it is made, for
    the rigs and for booting an image by hand (``hil refos qemu-cmd``). ``drive`` defines the
    block node ``disk0`` (the board's disk), ``console`` the serial port, ``monitor`` QMP;
    ``ssh_port`` is forwarded from 127.0.0.1 to the guest's SSH (None: no forward)."""
    aarch64 = arch == "aarch64"
    tcg = f"tcg,tb-size={s.tb_size}" if s.tb_size else "tcg"
    fwd = f",hostfwd=tcp:127.0.0.1:{ssh_port}-:{s.ssh_port}" if ssh_port else ""
    cmd = [binary, "-accel", tcg, "-nodefaults", "-no-user-config",
           "-display", "none", "-m", str(s.memory), "-smp", str(s.smp),
           # acpi=off: with a device tree QEMU's virt board also gets its pl061 GPIO
           "-M", s.machine or ("virt,acpi=off" if aarch64 else "pc"),
           "-cpu", s.cpu or ("cortex-a53" if aarch64 else "qemu64"),
           *monitor, *console,
           "-netdev", f"user,id=net0{fwd}",
           "-device", "virtio-net-pci,netdev=net0",
           *drive, "-device", "virtio-blk-pci,drive=disk0",
           "-device", "virtio-rng-pci"]
    if firmware:
        cmd += ["-bios", str(firmware)]
    if s.kernel:
        cmd += ["-kernel", str(s.kernel)]
        if s.initrd:
            cmd += ["-initrd", str(s.initrd)]
        cmd += ["-append", s.append or ("console=ttyAMA0" if aarch64 else "console=ttyS0")]
    for dev in s.devices:
        cmd += ["-device", dev]
    return cmd + s.extra_args


class QemuNetwork:
    """User-mode networking: the guest reaches the host's loopback as 10.0.2.2."""

    host_address = "10.0.2.2"

    def __init__(self, port: int) -> None:
        self.port = port

    def ssh_endpoint(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def close(self) -> None:
        pass


class QemuPower:
    # the board is this process's child: it cannot stay powered after the process ends
    in_process = True

    def __init__(self, target: QemuTarget) -> None:
        self.t = target

    def on(self) -> None:
        self.t.start()

    def off(self) -> None:
        self.t.kill()

    def is_on(self) -> bool | None:
        return self.t.running

    def close(self) -> None:
        self.t.kill()


class QemuTarget:
    Settings = QemuSettings

    def __init__(self, settings: QemuSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        dtype_arch = getattr(ctx.device_type, "arch", "aarch64")
        self.arch = settings.arch or ("x86_64" if dtype_arch in ("amd64", "x86_64") else "aarch64")
        self.binary = shutil.which(f"qemu-system-{self.arch}")
        self.console_sock = ctx.runtime / "console.sock"
        self.qmp_sock = ctx.runtime / "qmp.sock"
        self.qemu_log = ctx.runtime / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: object | None = None
        self.ssh_port = free_port()
        disk_path = settings.disk if settings.disk.is_absolute() else ctx.runtime / settings.disk
        self.storage = FileStorage(FileStorageSettings(path=disk_path, size=settings.disk_size),
                                   ctx)
        self.write_cache = (VolatileWriteCache(disk_path, ctx.runtime, ctx.rig)
                            if settings.write_cache == "volatile" else None)
        self.console = SerialConsole(SerialSettings(url=f"unix://{self.console_sock}"), ctx)
        self.power = QemuPower(self)
        self.network = QemuNetwork(self.ssh_port)

    def probe(self) -> str:
        """What ``hil check`` prints: the board can be started."""
        cmd = self.command()
        version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.splitlines()[0]
        return f"{version}; ssh forwarded from 127.0.0.1:{self.ssh_port}"

    def parts(self) -> dict[str, object]:
        return {"power": self.power, "console": self.console, "storage": self.storage,
                "network": self.network}

    # --- command line ---------------------------------------------------------------------------
    def command(self) -> list[str]:
        s = self.settings
        if self.binary is None:
            raise InfraError(f"qemu-system-{self.arch} is not installed (apt package "
                             f"qemu-system-{'arm' if self.arch == 'aarch64' else 'x86'})",
                             part="target", rig=self.ctx.rig)
        firmware = board_firmware(s, self.arch)
        if firmware and not firmware.is_file():
            raise InfraError(f"firmware {firmware} not found (apt package u-boot-qemu)",
                             part="target", rig=self.ctx.rig)
        return qemu_command(
            s, self.arch, binary=self.binary, firmware=firmware, drive=self._drive("disk0"),
            ssh_port=self.ssh_port,
            console=["-chardev", f"socket,id=con0,path={self.console_sock},server=on,wait=on",
                     "-serial", "chardev:con0"],
            monitor=["-qmp", f"unix:{self.qmp_sock},server=on,wait=off"])

    def _drive(self, node: str) -> list[str]:
        if self.write_cache is not None:
            return self.write_cache.drive(node)
        return disk_drive(self.storage.path, node)

    # --- power ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.storage.target(0)
        for sock in (self.console_sock, self.qmp_sock):
            sock.unlink(missing_ok=True)
        cmd = self.command()
        if self.write_cache is not None:
            self.write_cache.start()
        log.debug("power on: %s", " ".join(cmd))
        with self.qemu_log.open("ab") as out:
            # Own session: a Ctrl-C at the terminal reaches us, not QEMU; we kill it on the way out.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True, preexec_fn=die_with_parent)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise InfraError(f"QEMU exited with {proc.returncode} at start:\n"
                                 + log_tail(self.qemu_log), part="target", rig=self.ctx.rig)
            return self.console_sock.exists()

        # QEMU creates its sockets within milliseconds; there is no event to wait on.
        wait_until(listening, 15, "QEMU to open its console socket",
                   seen=lambda: "no socket yet", interval=0.01, part="target", rig=self.ctx.rig)
        self.console.attach(timeout=10)
        self._connect_qmp()

    def _connect_qmp(self) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = Deadline(10)
        while True:
            qmp = QEMUMonitorProtocol(str(self.qmp_sock))
            try:
                qmp.connect()
                break
            except Exception as exc:  # qemu.qmp raises several unrelated types
                # seen once under load: negotiation raced QEMU's start-up; try again briefly
                if deadline.expired() or not self.running:
                    raise InfraError(f"QMP connection failed: {exc}", part="target",
                                     rig=self.ctx.rig, tail=log_tail(self.qemu_log)) from None
                time.sleep(0.1)
        self.qmp = qmp

    def qmp_cmd(self, name: str, **args: object) -> object:
        if self.qmp is None or not self.running:
            raise InfraError(f"QMP {name}: QEMU is not running", part="target", rig=self.ctx.rig)
        return self.qmp.cmd(name, **args)  # type: ignore[attr-defined]

    def status(self) -> str:
        """QEMU's run state ("running", "paused", "shutdown", ...) or "off"."""
        if not self.running:
            return "off"
        reply = self.qmp_cmd("query-status")
        assert isinstance(reply, dict)
        return str(reply.get("status"))

    def reset(self) -> None:
        """Press the reset button: the board restarts without losing power."""
        self.qmp_cmd("system_reset")

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        qmp, self.qmp = self.qmp, None
        self.console.detach()  # first, so the reader takes the EOF as the power cut it is
        if qmp is not None:
            with contextlib.suppress(Exception):  # the process is about to die anyway
                qmp.close()  # type: ignore[attr-defined]
        if proc is not None:
            kill_session(proc, "QEMU", part="target", rig=self.ctx.rig)
        if self.write_cache is not None:
            self.write_cache.cut()  # after QEMU: the guest never sees its disk vanish

    def close(self) -> None:
        self.kill()
        self.console.close()
