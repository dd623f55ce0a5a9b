"""``hil refos ...``: build the reference OS, configure an image, serve the registration API."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import threading
from pathlib import Path
from typing import Any

from hil.errors import ConfigError
from hil.refos import vpn
from hil.refos.api import RegistrationServer
from hil.refos.builder import ARCHES, build
from hil.refos.hostapp import hostapp_archive
from hil.refos.image import configure
from hil.refos.qemu import qemu_argv


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    refos = sub.add_parser("refos", help="the reference OS image (build, configure, serve-api)")
    cmds = refos.add_subparsers(dest="refos_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("build", help="build the image (cached); print its paths")
    p.add_argument("--arch", choices=sorted(ARCHES), default="aarch64")
    p.add_argument("--version", default="1.0.0", help="VERSION in /etc/os-release")
    p.add_argument("--flasher", action="store_true",
                   help="an installer for flasher boards: installs itself to the internal disk")
    p.add_argument("--hostapp", action="store_true",
                   help="also the update as a container image (a `docker save` archive) "
                        "for `hostapp-update -i`")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    p.set_defaults(func=_build)

    p = cmds.add_parser("configure", help="write config.json into an image file's resin-boot")
    p.add_argument("disk", type=Path)
    p.add_argument("--config", type=Path, help="JSON file merged into config.json")
    p.add_argument("--uuid", help="device uuid (default: keep, or a random one)")
    p.add_argument("--hostname")
    p.add_argument("--dev", dest="dev", action="store_true", default=None,
                   help="development mode")
    p.add_argument("--prod", dest="dev", action="store_false", help="production mode")
    p.add_argument("--ssh-key", type=Path, action="append", default=[],
                   help="public key file for root (repeatable)")
    p.add_argument("--api-endpoint", help="registration endpoint, e.g. http://10.0.2.2:PORT")
    p.add_argument("--api-key-file", type=Path, help="file holding the provisioning key")
    p.add_argument("--ntp-servers", help="space-separated NTP servers")
    p.set_defaults(func=_configure)

    p = cmds.add_parser("serve-api", help="run the registration endpoint (and its VPN) in the "
                        "foreground")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free one)")
    p.add_argument("--api-key-file", type=Path, required=True,
                   help="provisioning key: read from this file, or created (mode 600)")
    p.set_defaults(func=_serve_api)

    p = cmds.add_parser("qemu-cmd", help="print the QEMU command line that boots an image on "
                          "the qemu-<arch> rig's board")
    p.add_argument("disk", type=Path)
    p.add_argument("--arch", choices=sorted(ARCHES), default="aarch64")
    p.add_argument("--ssh-port", type=int, default=None,
                   help="forward 127.0.0.1:PORT to the guest's SSH (22222)")
    p.set_defaults(func=_qemu_cmd)


def _build(args: argparse.Namespace) -> int:
    img = build(args.arch, args.version, flasher=args.flasher)
    paths = {"disk": str(img.disk), "bmap": str(img.bmap), "rootfs": str(img.rootfs)}
    if args.hostapp:
        paths["hostapp"] = str(hostapp_archive(img))
    if args.json:
        print(json.dumps({"arch": img.arch, "version": img.version, "flasher": img.flasher,
                          **paths, "key": img.key}, indent=1))
    else:
        print("\n".join(f"{k + ':':9}{v}" for k, v in paths.items()))
    return 0


def _read_key_file(path: Path) -> str:
    key = path.read_text().strip()
    if not key:
        raise ConfigError("the file is empty", file=str(path))
    return key


def _configure(args: argparse.Namespace) -> int:
    if not args.disk.exists():
        raise ConfigError("no such image file", file=str(args.disk))
    cfg: dict[str, Any] = {}
    if args.config:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"not a JSON file: {exc}", file=str(args.config)) from exc
        if not isinstance(loaded, dict):
            raise ConfigError("expected a JSON object", file=str(args.config))
        cfg.update(loaded)
    if args.uuid:
        cfg["uuid"] = args.uuid
    if args.hostname:
        cfg["hostname"] = args.hostname
    if args.dev is not None:
        cfg["developmentMode"] = args.dev
    if args.ssh_key:
        cfg["os"] = {**cfg.get("os", {}),
                     "sshKeys": [k.read_text().strip() for k in args.ssh_key]}
    if args.api_endpoint:
        cfg["apiEndpoint"] = args.api_endpoint
    if args.api_key_file:
        cfg["apiKey"] = _read_key_file(args.api_key_file)
    if args.ntp_servers:
        cfg["ntpServers"] = args.ntp_servers
    written = configure(args.disk, cfg)
    if "uuid" not in written:
        written = configure(args.disk, {"uuid": secrets.token_hex(16)})
    shown = {k: ("<set>" if k in ("apiKey", "deviceApiKey") else v) for k, v in written.items()}
    print(json.dumps(shown, indent=1))
    return 0


def _serve_api(args: argparse.Namespace) -> int:
    path: Path = args.api_key_file
    if path.exists():
        key = _read_key_file(path)
    else:
        key = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        print(f"provisioning key written to {path}")
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        why = vpn.available()
        server_vpn = None if why else stack.enter_context(vpn.VpnServer())
        server = stack.enter_context(RegistrationServer(key, port=args.port, vpn=server_vpn))
        print(f"registration API on {server.url} (guests: {server.url_for_guest}); Ctrl-C stops")
        print(f"VPN on port {server_vpn.port}" if server_vpn else f"no VPN: {why}")
        try:
            while not stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        for reg in server.registrations:
            state = "accepted" if reg.auth_ok else "refused"
            print(f"registered {reg.uuid} ({reg.device_type}): {state}")
    return 0


def _qemu_cmd(args: argparse.Namespace) -> int:
    print(shlex.join(qemu_argv(args.arch, args.disk, ssh_port=args.ssh_port)))
    return 0
