#!/usr/bin/env python3
"""Reference OS start-up benchmark: from QEMU's start to a shell, to the engine and the
supervisor healthy, to balenaOS's full engine health check passing, and from a target state to
the app's container running, on each QEMU board.

Boots a fresh copy of the reference OS image (built or taken from the cache, development mode)
``--runs`` times per arch and times each step on the host's clock:

- shell: the OS's ``HIL-READY`` line on the console (a root shell follows at once);
- healthy: ``GET :48484/v1/healthy`` answers 200 (the supervisor is up and the engine answers),
  asked from the console every half second;
- healthcheck: ``/usr/lib/balena/balena-healthcheck`` (info, ps, a container run) passes, run
  once after that;
- app: busybox loaded, then ``POST /v2/local/target-state`` with one service, until
  ``/v2/applications/state`` says Running.

``--analyze`` also records, once the boot has finished (``systemctl is-system-running
--wait``), systemd's own account of it: ``systemd-analyze time``, the units' costs
(``blame``) and the chain to ``multi-user.target`` (``critical-chain``), in
``bench/results/refos_boot_units.md``.

Writes ``bench/results/refos_boot.md`` with the command and the load.

    .venv/bin/python bench/refos_boot.py [--arches aarch64 x86_64] [--runs 2] [--analyze]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "refos"))
RESULTS = REPO / "bench" / "results" / "refos_boot.md"
UNITS = REPO / "bench" / "results" / "refos_boot_units.md"
ANALYZE = ("systemd-analyze time", "systemd-analyze blame --no-pager | head -n 25",
           "systemd-analyze critical-chain --no-pager multi-user.target")
STEPS = ("shell", "healthy", "healthcheck", "app")


def _until(guest: Any, command: str, timeout: float, expect: str) -> None:
    """Run ``command`` every half second until its output contains ``expect``."""
    end = time.monotonic() + timeout
    out = ""
    while time.monotonic() < end:
        out = guest.run(command, timeout=60, check=False)
        if expect in out:
            return
        time.sleep(0.5)
    raise SystemExit(f"{command!r} did not give {expect!r} within {timeout:.0f}s; last: {out}")


def analyze(guest: Any) -> str:
    """systemd's account of the boot, once it has finished (every unit started)."""
    state = guest.run("timeout 300 systemctl is-system-running --wait", timeout=320,
                      check=False)
    out = [f"`systemctl is-system-running --wait`: {state.strip()}"]
    for command in ANALYZE:
        out += ["", f"`{command}`", "```", guest.run(command, timeout=60, check=False).rstrip(),
                "```"]
    return "\n".join(out)


def one_boot(arch: str, work: Path, units: list[str] | None = None) -> dict[str, float]:
    import refos_guest as rg

    from hil.refos import appimage, build, configure

    img = build(arch=arch, version="1.0.0")
    app = appimage.busybox(arch)
    disk = work / f"{arch}.img"
    subprocess.run(["cp", "--sparse=always", str(img.disk), str(disk)], check=True)
    guest = rg.Guest(arch, disk, work / f"console-{arch}.log", uboot_env=img.uboot_env)
    t: dict[str, float] = {}
    try:
        configure(disk, {"uuid": os.urandom(16).hex(), "developmentMode": True})
        guest.start()
        t0 = guest.started
        guest.wait_ready()
        t["shell"] = time.monotonic() - t0
        guest.wait_prompt()
        _until(guest, "wget -q -O- http://127.0.0.1:48484/v1/healthy 2>&1", 600, "OK")
        t["healthy"] = time.monotonic() - t0
        if units is not None:
            units.append(f"## {arch}\n\n{analyze(guest)}\n")
        guest.run("/usr/lib/balena/balena-healthcheck", timeout=600)
        t["healthcheck"] = time.monotonic() - t0
        rc, out = rg.ssh_run(guest.ssh_port, "balena-engine load",
                             stdin=app.path.read_bytes(), timeout=600)
        if rc != 0:
            raise SystemExit(f"balena-engine load failed: {out}")
        state = {"local": {"name": "bench", "config": {}, "apps": {"1": {
            "name": "bench", "commit": "c1", "releaseId": 1, "services": {"1": {
                "serviceName": "main", "image": app.tag, "imageId": 1,
                "command": ["sleep", "2147483647"]}}}}}}
        body = shlex.quote(json.dumps(state))
        a0 = time.monotonic()
        guest.run(f"wget -q -O- --header 'Content-Type: application/json' --post-data {body} "
                  "http://127.0.0.1:48484/v2/local/target-state", timeout=60)
        _until(guest, "wget -q -O- http://127.0.0.1:48484/v2/applications/state", 600,
               '"status": "Running"')
        t["app"] = time.monotonic() - a0
    finally:
        guest.close()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arches", nargs="+", default=["aarch64", "x86_64"])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--analyze", action="store_true",
                    help="also systemd-analyze time, blame and critical-chain")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    units: list[str] | None = [] if args.analyze else None
    with tempfile.TemporaryDirectory(prefix="hil-bench-") as tmp:
        for arch in args.arches:
            runs = [one_boot(arch, Path(tmp), units) for _ in range(args.runs)]
            for step in STEPS:
                values = [r[step] for r in runs]
                rows.append(f"| {arch} | {step} | {statistics.median(values):.1f} s | "
                            f"{min(values):.1f} to {max(values):.1f} s |")
                print(rows[-1], flush=True)
    report = "\n".join([
        "# Reference OS start-up", "",
        f"`{' '.join(['python', 'bench/refos_boot.py', *sys.argv[1:]])}`, {args.runs} boots "
        f"per arch, load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        "shell/healthy/healthcheck: seconds from QEMU's start; app: from the target state "
        "being posted to its container running.", "",
        "| arch | step | median | range |", "|---|---|---|---|", *rows, ""])
    if not args.no_write:
        RESULTS.write_text(report)
    print(report)
    if units is not None:
        text = "\n".join(["# Reference OS start-up: systemd's account", "",
                           f"`{' '.join(['python', 'bench/refos_boot.py', *sys.argv[1:]])}`",
                           "", *units])
        if not args.no_write:
            UNITS.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
