"""``hil flash IMAGE TARGET`` and ``hil image configure|bmap``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hil.errors import ConfigError

# the commands import their modules when run: `hil --help` and other commands stay fast
SUFFIXES = (".gz", ".xz", ".zst", ".zstd", ".zip", ".bz2")

log = logging.getLogger(__name__)


SubParsers = argparse._SubParsersAction  # argparse has no public name for it


def _sub_group(sub: SubParsers[argparse.ArgumentParser], name: str, help_: str
               ) -> SubParsers[argparse.ArgumentParser]:
    """The sub-command group ``name``; reused if another module already added it."""
    parser: argparse.ArgumentParser | None = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help_)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_commands(sub: SubParsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("flash", help="write an OS image to an SD card, disk or disk file",
                       description="Write IMAGE (.img, .gz, .xz, .zst, .zip, .bz2) to TARGET "
                       "(block device or file), only its data, then read it back to verify.")
    p.add_argument("image", type=Path)
    p.add_argument("target", help="block device (/dev/disk/by-id/... preferred) or file")
    p.add_argument("--bmap", type=Path, help="bmaptool block map (default: IMAGE.bmap or "
                   "the name without the compression suffix + .bmap, if present)")
    p.add_argument("--no-bmap", action="store_true", help="ignore a .bmap next to the image")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back check")
    p.add_argument("--zero-fill", action="store_true",
                   help="write zeros where the image is empty (byte-exact on any medium)")
    p.add_argument("--allow-fixed", action="store_true",
                   help="allow a non-removable disk (the rig's own disk)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.set_defaults(func=_cmd_flash)

    image = _sub_group(sub, "image", "prepare OS images")
    c = image.add_parser("configure", help="write config.json into the image's boot partition",
                         description="Copy IMAGE with config.json (and optional files) in its "
                         "resin-boot/balena-boot partition; cached by content.")
    c.add_argument("image", type=Path)
    c.add_argument("--config", type=Path, required=True, help="config.json to put in")
    c.add_argument("-o", "--out", type=Path, help="output file (default: in the cache)")
    c.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                   help="extra file, e.g. system-connections/wifi=./wifi.nmconnection")
    c.add_argument("--config-txt", action="append", default=[], metavar="LINE",
                   help="line for the Raspberry Pi config.txt, e.g. enable_uart=1")
    c.set_defaults(func=_cmd_configure)

    b = image.add_parser("bmap", help="write a bmaptool block map for a raw image")
    b.add_argument("image", type=Path)
    b.add_argument("-o", "--out", type=Path, help="default: IMAGE.bmap")
    b.set_defaults(func=_cmd_bmap)


def find_bmap(image: Path) -> Path | None:
    """bmaptool's convention: IMAGE.bmap, or the name without its compression suffix."""
    base = image.stem if image.suffix.lower() in SUFFIXES else image.name  # foo.img
    names = dict.fromkeys([image.name + ".bmap", base + ".bmap", Path(base).stem + ".bmap"])
    for name in names:
        candidate = image.with_name(name)
        if candidate.is_file():
            return candidate
    return None


def _cmd_flash(args: argparse.Namespace) -> int:
    from hil.flash.writer import flash

    bmap = args.bmap
    if bmap is None and not args.no_bmap:
        bmap = find_bmap(args.image)
        if bmap is not None:
            log.info("using block map %s", bmap)
    report = flash(args.image, args.target, bmap=bmap, verify=not args.no_verify,
                   zero_fill=args.zero_fill, allow_fixed=args.allow_fixed,
                   display=not args.no_progress)
    print(report.summary())
    return 0


def _cmd_configure(args: argparse.Namespace) -> int:
    from hil.flash.configjson import load_config_json
    from hil.flash.configure import configure_image

    config = load_config_json(args.config)
    files = {}
    for spec in args.file:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ConfigError(f"--file {spec!r}: expected NAME=PATH")
        try:
            files[name] = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--file {name}: cannot read: {exc.strerror}", file=path) from None
    out = configure_image(args.image, config, extra_files=files,
                          config_txt_lines=args.config_txt, out=args.out)
    print(out)
    return 0


def _cmd_bmap(args: argparse.Namespace) -> int:
    from hil.flash.bmap import create_bmap, write_bmap

    out = args.out or args.image.with_name(args.image.name + ".bmap")
    bmap = create_bmap(args.image)
    write_bmap(bmap, out)
    print(f"{out}: {bmap.mapped_bytes / 2**20:.1f} MiB mapped of "
          f"{bmap.image_size / 2**20:.1f} MiB in {len(bmap.ranges)} ranges")
    return 0


if __name__ == "__main__":  # ``python -m hil.flash.cli flash ...``, as the benchmark runs it
    from hil.cli import main

    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # every file is closed: skip interpreter teardown (tens of ms under load)
