"""A QEMU board as a libvirt domain (``target: {driver: libvirt}``), for labs that manage their
VMs with libvirt. Same parts and behaviour as ``hil.qemu.target.QemuTarget``:

- TCG only: ``<domain type='qemu'>`` (libvirt offers 'kvm' wherever /dev/kvm exists);
- power on creates a transient domain *paused*, attaches the console to its serial socket and
  only then resumes the CPU, so the first byte of firmware output is captured;
- power off is ``destroy``: a power cut, no ACPI shutdown;
- the serial port is a unix socket (``unix://`` console), the disk a raw file that flashing
  writes into, SSH is forwarded from a loopback port (QEMU user networking).

``<features><acpi/></features>`` is set on x86: without it libvirt passes ``-no-acpi`` and the
guest's ``poweroff`` never stops the VM. aarch64 boards power off through PSCI and libvirt
refuses ACPI there without UEFI, so it is left out.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

from pydantic import Field

from hil.console.serial import SerialConsole, SerialSettings
from hil.errors import InfraError
from hil.qemu.firmware import default_firmware
from hil.qemu.target import QemuNetwork, QemuSettings, free_port
from hil.registry import PartContext
from hil.storage import FileStorage, FileStorageSettings

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


class LibvirtSettings(QemuSettings):
    uri: str = Field("qemu:///system", description="libvirt connection: qemu:///system, or "
                     "qemu:///session as an ordinary user")
    name: str | None = Field(None, description="domain name; default hil-<rig>")
    write_cache: Literal["host"] = Field("host", description="the domain's disk is a file in "
                                         "the host's page cache: a power cut loses nothing")


class LibvirtPower:
    def __init__(self, target: LibvirtTarget) -> None:
        self.t = target

    def on(self) -> None:
        self.t.start()

    def off(self) -> None:
        self.t.destroy()

    def is_on(self) -> bool | None:
        return self.t.running

    def close(self) -> None:
        self.t.destroy()


class LibvirtTarget:
    Settings = LibvirtSettings

    def __init__(self, settings: LibvirtSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        dtype_arch = getattr(ctx.device_type, "arch", "aarch64")
        self.arch = settings.arch or ("x86_64" if dtype_arch in ("amd64", "x86_64") else "aarch64")
        self.name = settings.name or f"hil-{ctx.rig}"
        self.console_sock = ctx.runtime / "console.sock"
        self.ssh_port = free_port()
        disk = settings.disk if settings.disk.is_absolute() else ctx.runtime / settings.disk
        self.storage = FileStorage(FileStorageSettings(path=disk, size=settings.disk_size), ctx)
        self.console = SerialConsole(SerialSettings(url=f"unix://{self.console_sock}"), ctx)
        self.power = LibvirtPower(self)
        self.network = QemuNetwork(self.ssh_port)
        self._conn: Any = None

    def parts(self) -> dict[str, object]:
        return {"power": self.power, "console": self.console, "storage": self.storage,
                "network": self.network}

    # --- libvirt ---------------------------------------------------------------------------------
    def _libvirt(self) -> Any:
        try:
            import libvirt
        except ImportError as exc:
            raise self.ctx.error(f"libvirt-python is not installed ({exc})") from None
        return libvirt

    def connection(self) -> Any:
        libvirt = self._libvirt()
        if self._conn is None:
            # errors come back as exceptions; without a handler libvirt also prints them
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            try:
                self._conn = libvirt.open(self.settings.uri)
            except libvirt.libvirtError as exc:
                raise self.ctx.error(f"cannot connect to libvirt at {self.settings.uri}: "
                                     f"{exc.get_error_message()} (is libvirtd running?)") from None
        return self._conn

    def _domain(self) -> Any:
        libvirt = self._libvirt()
        try:
            return self.connection().lookupByName(self.name)
        except libvirt.libvirtError:
            return None

    def domain_xml(self) -> str:
        s = self.settings
        aarch64 = self.arch == "aarch64"
        binary = shutil.which(f"qemu-system-{self.arch}")
        if binary is None:
            raise self.ctx.error(f"qemu-system-{self.arch} is not installed")
        machine = s.machine or ("virt" if aarch64 else "pc")
        cpu = s.cpu or ("cortex-a53" if aarch64 else "qemu64")
        firmware = s.firmware or (None if s.kernel else
                                   default_firmware(self.arch, bootdelay=s.bootdelay))
        os_xml = [f"<type arch={quoteattr(self.arch)} machine={quoteattr(machine)}>hvm</type>"]
        if firmware is not None:
            if not firmware.is_file():
                raise self.ctx.error(f"firmware {firmware} not found (apt package u-boot-qemu)")
            os_xml.append(f"<loader type='rom'>{escape(str(firmware))}</loader>")
        if s.kernel:
            os_xml.append(f"<kernel>{escape(str(s.kernel))}</kernel>")
            if s.initrd:
                os_xml.append(f"<initrd>{escape(str(s.initrd))}</initrd>")
            cmdline = s.append or ("console=ttyAMA0" if aarch64 else "console=ttyS0")
            os_xml.append(f"<cmdline>{escape(cmdline)}</cmdline>")
        # user networking with a host port forward: libvirt 9 has no <portForward> for the
        # slirp backend, so it goes on QEMU's command line like extra_args, at a PCI slot
        # libvirt does not hand out (it numbers its own from 1)
        root_bus = "pcie.0" if machine == "virt" or machine.startswith("q35") else "pci.0"
        args = ["-netdev", f"user,id=hilnet0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:"
                f"{s.ssh_port}", "-device",
                f"virtio-net-pci,netdev=hilnet0,bus={root_bus},addr=0x1f"]
        for dev in s.devices:
            args += ["-device", dev]
        args += s.extra_args
        qemu_args = "".join(f"<qemu:arg value={quoteattr(a)}/>" for a in args)
        tcg = f"<tcg><tb-cache unit='MiB'>{s.tb_size}</tb-cache></tcg>" if s.tb_size else ""
        return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{escape(self.name)}</name>
  <memory unit='MiB'>{s.memory}</memory>
  <vcpu>{s.smp}</vcpu>
  <os>{''.join(os_xml)}</os>
  <features>{'' if aarch64 else '<acpi/>'}{tcg}</features>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{escape(cpu)}</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(binary)}</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='unsafe'/>
      <source file={quoteattr(str(self.storage.path))}/><target dev='vda' bus='virtio'/></disk>
    <serial type='unix'><source mode='bind' path={quoteattr(str(self.console_sock))}/>
      <target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>{qemu_args}</qemu:commandline>
</domain>"""

    # --- power -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        libvirt = self._libvirt()
        dom = self._domain()
        try:
            return bool(dom is not None and dom.isActive())
        except libvirt.libvirtError:  # a transient domain vanished between lookup and query
            return False

    def start(self) -> None:
        libvirt = self._libvirt()
        if self.running:
            return
        self.storage.target(0)
        self._remove_leftover()
        self.console_sock.unlink(missing_ok=True)
        try:
            dom = self.connection().createXML(self.domain_xml(),
                                              libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as exc:
            raise self.ctx.error(f"libvirt could not start domain {self.name}: "
                                 f"{exc.get_error_message()}") from None
        try:
            self.console.attach(timeout=10)  # the CPU is paused: nothing is printed yet
            dom.resume()
        except BaseException:
            self.destroy()
            raise

    def _remove_leftover(self) -> None:
        """A domain of ours left by a killed run: cut it and forget it."""
        libvirt = self._libvirt()
        dom = self._domain()
        if dom is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                dom.undefine()

    def destroy(self) -> None:
        libvirt = self._libvirt()
        self.console.detach()  # first: the EOF that follows is the power cut, not a fault
        dom = self._domain()
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if self.running:
                raise self.ctx.error(f"libvirt could not destroy {self.name}: "
                                     f"{exc.get_error_message()}") from None

    def reset(self) -> None:
        """The reset button: restart without losing power."""
        dom = self._domain()
        if dom is None or not dom.isActive():
            raise self.ctx.error(f"reset: domain {self.name} is not running")
        dom.reset(0)

    def status(self) -> str:
        libvirt = self._libvirt()
        dom = self._domain()
        if dom is None:
            return "off"
        state = dom.state()[0]
        return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
                libvirt.VIR_DOMAIN_SHUTOFF: "off"}.get(state, str(state))

    def close(self) -> None:
        with contextlib.suppress(InfraError):
            self.destroy()
        self.console.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
