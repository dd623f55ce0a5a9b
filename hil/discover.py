"""``hil discover``: what is attached to this bench host, and what to write in a rig file to
find it again after re-plugging: USB-serial adapters, block devices, USB HID relay boards,
USB-SD-Muxes, SDWires and GPIO chips.

Matches are suggested by udev property (``ID_SERIAL_SHORT``) where udevd runs, else by sysfs
attribute (``ATTRS{serial}``), which ``hil.udev`` understands either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hil.udev import block_size, udevd_running

HID_RELAYS = {("16c0", "05df"): "dcttech", ("5131", "2007"): "lcus"}
USBSDMUX = ("0424", "4041")  # Microchip USB2642 as used by the USB-SD-Mux
SDWIRE = {("0403", "6015"), ("04e8", "6001")}  # FT200X (SDWire/SDWireC), Badgerd SDWire Gen2


def _text(device: Any, attr: str) -> str:
    try:
        value = device.attributes.get(attr)
    except (OSError, UnicodeDecodeError):
        return ""
    return bytes(value).decode(errors="replace").strip() if value is not None else ""


def _usb(device: Any) -> Any:
    """The USB device (not interface) above ``device``, or None."""
    node = device
    while node is not None:
        if node.subsystem == "usb" and node.device_type == "usb_device":
            return node
        node = node.parent
    return None


def _usb_info(usb: Any) -> dict[str, str]:
    return {k: _text(usb, a) for k, a in (("vid", "idVendor"), ("pid", "idProduct"),
                                          ("serial", "serial"), ("vendor", "manufacturer"),
                                          ("product", "product"))} | {"usb_path": usb.sys_name}


def _match(device: Any, usb: Any) -> dict[str, str]:
    short = device.properties.get("ID_SERIAL_SHORT")
    if udevd_running() and short:
        return {"ID_SERIAL_SHORT": short}
    serial = _text(usb, "serial") if usb is not None else ""
    if serial:
        return {"ATTRS{serial}": serial}
    if usb is not None:  # no serial number: the USB port path is what stays the same
        return {"ATTRS{devpath}": _text(usb, "devpath"), "ATTRS{busnum}": _text(usb, "busnum")}
    return {"DEVNAME": str(device.device_node)}


def _links(device: Any) -> list[str]:
    return sorted(str(x) for x in device.device_links)


def serial_adapters(ctx: Any) -> list[dict[str, Any]]:
    found = []
    for dev in ctx.list_devices(subsystem="tty"):
        usb = _usb(dev)
        if usb is None or not dev.device_node:
            continue
        found.append({"node": dev.device_node, "links": _links(dev), **_usb_info(usb),
                      "driver": dev.parent.driver if dev.parent else "",
                      "match": _match(dev, usb)})
    return found


def block_devices(ctx: Any) -> list[dict[str, Any]]:
    found = []
    for dev in ctx.list_devices(subsystem="block", DEVTYPE="disk"):
        size = block_size(dev)
        name = dev.sys_name
        if not dev.device_node or name.startswith(("ram", "zram")):
            continue
        if name.startswith("loop") and size == 0:
            continue  # unattached loop devices
        usb = _usb(dev)
        scsi = dev.find_parent("scsi")
        entry: dict[str, Any] = {"node": dev.device_node, "size": size,
                                 "removable": _text(dev, "removable") == "1",
                                 "model": _text(scsi, "model") if scsi is not None else "",
                                 "links": _links(dev)}
        backing = _text(dev, "loop/backing_file")
        if backing:
            entry["match"] = {"ATTR{loop/backing_file}": f"*/{Path(backing).name}"}
        elif usb is not None:
            entry |= _usb_info(usb)
            entry["match"] = _match(dev, usb)
        by_id = [link for link in entry["links"] if "/by-id/" in link]
        if by_id:
            entry["device"] = by_id[0]
        found.append(entry)
    return found


def _dcttech_serial(hidraw: str) -> dict[str, Any]:
    try:
        import hid

        from hil.power.hid_relay import dcttech_state

        dev = hid.Device(path=hidraw.encode())
        try:
            serial, mask = dcttech_state(dev.get_feature_report(0, 9))
        finally:
            dev.close()
        return {"serial": serial, "energised": [i + 1 for i in range(8) if mask & (1 << i)]}
    except Exception as exc:  # no library, no permission: show what we can
        return {"serial": None, "error": str(exc)}


def hid_relays(ctx: Any) -> list[dict[str, Any]]:
    found = []
    for dev in ctx.list_devices(subsystem="hidraw"):
        usb = _usb(dev)
        if usb is None:
            continue
        info = _usb_info(usb)
        protocol = HID_RELAYS.get((info["vid"], info["pid"]))
        if protocol is None:
            continue
        entry: dict[str, Any] = {"node": dev.device_node, "protocol": protocol, **info}
        if protocol == "dcttech":
            entry |= _dcttech_serial(str(dev.device_node))
        found.append(entry)
    return found


def sd_muxes(ctx: Any) -> list[dict[str, Any]]:
    found = []
    for dev in ctx.list_devices(subsystem="scsi_generic"):
        usb = _usb(dev)
        if usb is not None and (_text(usb, "idVendor"), _text(usb, "idProduct")) == USBSDMUX:
            found.append({"kind": "usbsdmux", "node": dev.device_node, **_usb_info(usb),
                          "match": {"ATTRS{serial}": _text(usb, "serial")}})
    for usb in ctx.list_devices(subsystem="usb", DEVTYPE="usb_device"):
        if (_text(usb, "idVendor"), _text(usb, "idProduct")) in SDWIRE:
            product = _text(usb, "product").lower()
            if "sd" in product or "wire" in product:
                found.append({"kind": "sdwire", **_usb_info(usb)})
    return found


def gpio_chips() -> list[dict[str, Any]]:
    found = []
    for path in sorted(Path("/dev").glob("gpiochip*")):
        entry: dict[str, Any] = {"node": str(path)}
        try:
            import gpiod

            with gpiod.Chip(str(path)) as chip:
                info = chip.get_info()
                entry |= {"label": info.label, "lines": info.num_lines}
        except Exception as exc:  # no library or no permission
            entry["error"] = str(exc)
        found.append(entry)
    return found


def collect() -> dict[str, list[dict[str, Any]]]:
    import pyudev

    ctx = pyudev.Context()
    return {"serial": serial_adapters(ctx), "block": block_devices(ctx),
            "hid_relays": hid_relays(ctx), "sd_muxes": sd_muxes(ctx), "gpio": gpio_chips()}


def _yaml(data: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "}"


def render(found: dict[str, list[dict[str, Any]]]) -> str:
    out: list[str] = []
    if not udevd_running():
        out.append("(udevd is not running: no ID_* properties or /dev/disk/by-id links; "
                   "matches use sysfs attributes)\n")

    def section(title: str, items: list[dict[str, Any]], lines: Any) -> None:
        out.append(f"{title}:")
        if not items:
            out.append("  none found")
        for item in items:
            out.extend(f"  {line}" for line in lines(item))
        out.append("")

    section("USB serial adapters (console:, power: serial-relay)", found["serial"], lambda d: [
        f"{d['node']}  {d['vid']}:{d['pid']} {d['vendor']} {d['product']} serial "
        f"{d['serial'] or '-'} (driver {d['driver']}, USB port {d['usb_path']})",
        f"    console: {{driver: serial, match: {_yaml(d['match'])}}}"])
    section("Block devices (storage:)", found["block"], lambda d: [
        f"{d['node']}  {d['size'] / 2**30:.1f} GiB{' removable' if d['removable'] else ''}"
        f"{' ' + d['model'] if d.get('model') else ''}",
        *([f"    storage: {{driver: block, match: {_yaml(d['match'])}}}"] if "match" in d
          else []),
        *([f"    storage: {{driver: block, device: {d['device']}}}"] if "device" in d else [])])
    section("USB HID relay boards (power: hid-relay)", found["hid_relays"], lambda d: [
        f"{d['node']}  {d['protocol']} {d['vid']}:{d['pid']} {d['product']}"
        + (f", energised: {d['energised']}" if d.get("energised") is not None else "")
        + (f" ({d['error']})" if d.get("error") else ""),
        f"    power: {{driver: hid-relay, protocol: {d['protocol']}"
        + (f", serial: {d['serial']}" if d.get("serial") else f", path: {d['node']}")
        + ", channel: 1}"])
    section("SD muxes (sd_mux:)", found["sd_muxes"], lambda d: [
        f"{d.get('node') or ''}  {d['kind']} serial {d['serial'] or '-'}".strip(),
        f"    sd_mux: {{driver: usbsdmux, match: {_yaml(d['match'])}}}" if d["kind"] ==
        "usbsdmux" else f"    sd_mux: {{driver: sdwire, serial: {d['serial']}}}"])
    section("GPIO chips (power: gpio)", found["gpio"], lambda d: [
        f"{d['node']}  {d.get('label', '')} {d.get('lines', '?')} lines"
        + (f" ({d['error']})" if d.get("error") else "")])
    return "\n".join(out)


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("discover", help="list attached relays, SD muxes, serial "
                              "adapters and block devices, with what to put in a rig file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    found = collect()
    if args.json:
        json.dump(found, sys.stdout, indent=2)
        print()
    else:
        print(render(found))
    return 0
