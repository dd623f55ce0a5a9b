"""``hil rigs`` and ``hil check RIG``."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from hil import registry
from hil.config import device_type_names, list_rigs, load_rig
from hil.errors import ConfigError, HilError
from hil.rig import Rig


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rigs", help="list the rigs this directory knows")
    p.add_argument("--rigs-dir")
    p.set_defaults(func=cmd_rigs)
    p = sub.add_parser("check", help="validate a rig file and probe that its parts answer")
    p.add_argument("rig", help="rig name or path")
    p.add_argument("--rigs-dir")
    p.add_argument("--no-probe", action="store_true", help="only validate the file")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("device-types", help="list the known device types")
    p.set_defaults(func=lambda a: print("\n".join(device_type_names())) or 0)


def cmd_rigs(args: argparse.Namespace) -> int:
    bad = 0
    for path in list_rigs(args.rigs_dir):
        try:
            cfg = load_rig(str(path))
        except ConfigError as exc:
            print(f"{path.stem:22} INVALID  {exc}")
            bad += 1
            continue
        parts = ", ".join(f"{k}={v.driver}" for k, v in cfg.parts.items())
        print(f"{cfg.name:22} {cfg.device_type.slug:20} {parts}")
        if cfg.description:
            print(f"{'':22} {cfg.description}")
    return 1 if bad else 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_rig(args.rig, args.rigs_dir)
    print(f"{cfg.source}: valid ({cfg.device_type.slug}; "
          f"parts: {', '.join(f'{k}={v.driver}' for k, v in cfg.parts.items())})")
    if args.no_probe:
        return 0
    if cfg.emulator:
        print("emulated hardware: start it with `hil emu start` to probe the parts")
        return 0
    rig = Rig(cfg)
    failed = 0
    try:
        for name in registry.PARTS:
            part = rig.target if name == "target" else getattr(rig, name, None)
            probe = getattr(part, "probe", None)
            if part is None or probe is None:
                continue
            try:
                print(f"  {name:8} ok: {probe()}")
            except HilError as exc:
                print(f"  {name:8} FAILED: {exc}")
                failed += 1
    finally:
        with contextlib.suppress(Exception):
            rig.close()
    return 3 if failed else 0
