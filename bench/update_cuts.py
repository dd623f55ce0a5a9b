"""Power cuts at seeded random moments of a host OS update: is the device always bootable?

Runs the rollback suite's ``test_power_cut_during_an_update_leaves_a_bootable_device`` (the cut
while hostapp-update writes the new root) once per seed, each a fresh session on a copy of the
rig (flashed anew), and tallies: devices left unbootable (the goal is 0), and which OS each came
back on. A first session times a whole update on the rig (the suite's cut after
``hostapp-update`` returned prints it), and every seed's cut falls at a seeded moment of that
time, from its start to just past its end (``--update-seconds``). The board's disk has its
volatile write cache (the QEMU rigs' default), so what the update had not flushed is lost at
the cut, as on a board.

    .venv/bin/python bench/update_cuts.py --cuts 50      # writes bench/results/update_cuts.md
    .venv/bin/python bench/update_cuts.py --cuts 3 --rig qemu-x86_64 --no-write
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACK_ON = re.compile(r"back on the (new|old) OS \((.+?)\) after (\d+) boot")
TOOK = re.compile(r"hostapp-update took (\d+\.\d)s")
CUT_AT = re.compile(r"(\d+\.\d)s in \(seed")


def session(work: Path, name: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rPfE",
         f"--rigs-dir={work / 'rigs'}", f"--rig={name}", "suites/rollback", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    return run.returncode, run.stdout + run.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--rig", default="qemu-aarch64")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hil-update-cuts-"))
    name = f"update-cuts-{os.getpid()}"
    (work / "rigs").mkdir()
    shutil.copy(REPO / "rigs" / f"{args.rig}.yaml", work / "rigs" / f"{name}.yaml")
    env = {**os.environ, "HIL_LOCK_DIR": str(work / "locks"),
           "HIL_RUNTIME_DIR": str(work / "run"), "COLUMNS": "300"}
    env.pop("HIL_RIG", None)
    rows: list[tuple[int, str, str, str, str, str]] = []  # seed, outcome, OS, boots, cut, why
    t0 = time.monotonic()
    try:
        code, out = session(work, name, env, "-k", "power_cut_during and returned")
        took = TOOK.search(out)
        if code != 0 or took is None:
            print(out[-3000:])
            raise SystemExit("the timing session failed: no whole update to spread the cuts over")
        update_s = float(took[1])
        print(f"a whole update takes {update_s:.1f} s on {args.rig}", flush=True)
        for seed in range(args.first_seed, args.first_seed + args.cuts):
            code, out = session(work, name, env, f"--power-cut-seed={seed}",
                                f"--update-seconds={update_s}", "-k",
                                "power_cut_during and writing")
            m = BACK_ON.search(out)
            at = CUT_AT.search(out)
            cut = f"{at[1]} s ({float(at[1]) / update_s:.0%})" if at else "-"
            outcome = {0: "bootable", 1: "FAILED"}.get(code, f"error {code}")
            if code == 1 and "boots neither the old nor the new OS" in out:
                outcome = "UNBOOTABLE"
            why = next((ln.split(" - ", 1)[-1][:300] for ln in out.splitlines()
                        if ln.startswith(("FAILED", "ERROR"))), "")
            rows.append((seed, outcome, m[1] if m else "-", m[3] if m else "-", cut, why))
            print(f"seed {seed}: cut at {cut}: {outcome}, back on {rows[-1][2]} OS after "
                  f"{rows[-1][3]} boot(s) {why}", flush=True)
            if code != 0:  # what went wrong, kept with the figures
                print(out[-3000:], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# Power cuts during a host OS update", "",
        f"`{' '.join(['.venv/bin/python', 'bench/update_cuts.py', *sys.argv[1:]])}`, "
        f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - t0:.0f} s, load "
        f"{Path('/proc/loadavg').read_text().split()[:3]}", "",
        f"**{sum(r[1] == 'UNBOOTABLE' for r in rows)} of {len(rows)} left unbootable**; "
        f"{sum(r[1] == 'bootable' for r in rows)} passed every check; back on the old OS "
        f"{sum(r[2] == 'old' for r in rows)}, on the new one {sum(r[2] == 'new' for r in rows)}. "
        f"A whole update took {update_s:.1f} s; each cut fell at a seeded moment of 5 to "
        "105 % of it.",
        "", "| seed | cut at (of the update) | outcome | came back on | boots | why it failed |",
        "|---|---|---|---|---|---|",
        *(f"| {s} | {c} | {o} | {os_} | {b} | {w.replace('|', '/')} |"
          for s, o, os_, b, c, w in rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        (REPO / "bench" / "results" / "update_cuts.md").write_text(text)
    return 0 if all(r[1] == "bootable" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
