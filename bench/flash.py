#!/usr/bin/env python3
"""Flashing benchmark: ours (with read-back verify) vs ``bmaptool copy`` vs ``dd bs=4M conv=fsync``.

A balena-sized image (2 GiB, ~300 MiB of data laid out like a balenaOS disk: boot partition,
root A mostly full, root B/state/data mostly empty; half random, half compressible) is written
raw and as .zst to a regular file and to a loop block device, by each tool, in one run:
``--reps`` rounds, the tool order rotating each round, medians reported. Before every run the
page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root; the report says
if it could not be done), a file target is deleted and the loop device's backing file is
emptied, so every tool starts from the same cold state. Our package's bytecode is compiled first,
as an installed package (and bmaptool's) has it: otherwise, with PYTHONDONTWRITEBYTECODE set,
every run would compile its modules again. Results: ``bench/results/flash.md``.

    sudo .venv/bin/python bench/flash.py [--reps 5] [--workdir /var/tmp/hil-bench-flash]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
IMAGE_SIZE = 2048 * MiB
LAYOUT_VERSION = "1"  # bump when the layout changes: the cached image is rebuilt
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "flash.md"
RUN_TIMEOUT = 300.0


def layout(rnd: random.Random) -> list[tuple[int, int]]:
    """(offset, length) of the data, like a balenaOS image of a 2 GiB card."""
    extents = [(0, MiB)]  # partition table and bootloader
    extents += [(4 * MiB + i * 3 * MiB, 2 * MiB) for i in range(12)]  # boot partition files
    pos = 100 * MiB  # root A: an ext4 root filesystem, mostly contiguous
    while pos < 300 * MiB:
        length = rnd.randrange(2, 24) * MiB
        extents.append((pos, length))
        pos += length + rnd.randrange(1, 64) * 64 * 1024
    for group in range(8):  # root B: only ext4 metadata (one block group every 128 MiB)
        extents.append((800 * MiB + group * 64 * MiB, 256 * 1024))
    extents.append((1500 * MiB, 2 * MiB))  # state
    for _ in range(40):  # data: scattered files
        extents.append((rnd.randrange(1600, 2040) * MiB, rnd.randrange(64, 1024) * 1024))
    return sorted(extents)


def build_image(workdir: Path) -> tuple[Path, Path, Path, str]:
    raw, zst = workdir / "balena.img", workdir / "balena.img.zst"
    bmap, stamp = workdir / "balena.img.bmap", workdir / "balena.stamp"
    if stamp.exists() and stamp.read_text().split()[0] == LAYOUT_VERSION and zst.exists():
        return raw, zst, bmap, stamp.read_text().split()[1]
    print(f"building the test image in {workdir} ...", flush=True)
    rnd = random.Random(2024)
    words = b" ".join(rnd.choice([b"systemd", b"balena", b"engine", b"kernel", b"/usr/lib",
                                  b"\x00\x00\x01", b"ELF", b"config"]) for _ in range(1 << 16))
    with open(raw, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for offset, length in layout(rnd):
            half = length // 2
            text = (words * (length // len(words) + 1))[: length - half]
            f.seek(offset)
            f.write(os.urandom(half) + text)  # half random, half compressible
    subprocess.run(["bmaptool", "create", "-o", str(bmap), str(raw)], check=True)
    subprocess.run(["zstd", "-q", "-f", "-T0", "-3", str(raw), "-o", str(zst)], check=True)
    digest = sha256_prefix(raw, IMAGE_SIZE)
    stamp.write_text(f"{LAYOUT_VERSION} {digest}\n")
    return raw, zst, bmap, digest


def sha256_prefix(path: Path | str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(16 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def warm(path: Path) -> None:
    """Read ``path`` into the page cache."""
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True, timeout=RUN_TIMEOUT)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class LoopTarget:
    """A loop device on a sparse backing file, emptied before each run (a fresh card)."""

    def __init__(self, workdir: Path) -> None:
        self.backing = workdir / "loop-backing.img"
        self.backing.write_bytes(b"")
        os.truncate(self.backing, IMAGE_SIZE + 64 * MiB)
        self.dev = subprocess.run(["losetup", "-f", "--show", str(self.backing)], check=True,
                                  capture_output=True, text=True).stdout.strip()

    def reset(self) -> None:
        fd = os.open(self.dev, os.O_WRONLY)
        try:  # punching the whole device empties the backing file
            import fcntl
            import struct
            fcntl.ioctl(fd, 0x1277, struct.pack("QQ", 0, IMAGE_SIZE + 64 * MiB))  # BLKDISCARD
        finally:
            os.close(fd)

    def close(self) -> None:
        subprocess.run(["losetup", "-d", self.dev], check=False)


@dataclass
class Case:
    source: str  # "raw" or "zst"
    target: str  # "file" or "loop"
    times: dict[str, list[float]] = field(default_factory=dict)


def commands(tool: str, src: Path, bmap: Path, target: str) -> str:
    python = shlex.quote(sys.executable)
    q = shlex.quote
    if tool == "ours":
        return (f"{python} -m hil.flash.cli flash {q(str(src))} {q(target)} --bmap {q(str(bmap))}"
                " --allow-fixed --no-progress")
    if tool == "ours-nobmap":
        return (f"{python} -m hil.flash.cli flash {q(str(src))} {q(target)} --no-bmap "
                "--allow-fixed --no-progress")
    if tool == "bmaptool":
        return f"bmaptool -q copy --bmap {q(str(bmap))} {q(str(src))} {q(target)}"
    if src.suffix == ".zst":
        return f"zstd -dcq {q(str(src))} | dd of={q(target)} bs=4M iflag=fullblock conv=fsync"
    return f"dd if={q(str(src))} of={q(target)} bs=4M conv=fsync"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("HIL_BENCH_DIR", "/var/tmp/hil-bench-flash")))
    parser.add_argument("--cache", choices=("cold", "hot"), default="cold",
                        help="cold: page cache dropped before every run; hot: the source read "
                        "into it just before (an image just built or downloaded)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()
    results = RESULTS if args.cache == "cold" else RESULTS.with_name("flash-hot.md")
    for tool in ("bmaptool", "zstd", "dd", "losetup"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("needs root (loop device, drop_caches)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    raw, zst, bmap, digest = build_image(args.workdir)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "hil/__init__.py", "hil/errors.py",
                    "hil/flash"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    loop = LoopTarget(args.workdir)
    file_target = args.workdir / "target.img"
    tools = ["ours", "ours-nobmap", "bmaptool", "dd"]
    cases = [Case(s, t) for t in ("file", "loop") for s in ("raw", "zst")]
    dropped = True
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    checked: set[tuple[str, str, str]] = set()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for rep in range(args.reps):
            order = tools[rep % len(tools):] + tools[:rep % len(tools)]
            for case in cases:
                src = raw if case.source == "raw" else zst
                target = str(file_target) if case.target == "file" else loop.dev
                for tool in order:
                    if case.target == "file":
                        file_target.unlink(missing_ok=True)
                    else:
                        loop.reset()
                    dropped = drop_caches() and dropped
                    if args.cache == "hot":
                        warm(src)
                    cmd = commands(tool, src, bmap, target)
                    start = time.monotonic()
                    result = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env,
                                            capture_output=True, text=True, timeout=RUN_TIMEOUT,
                                            cwd=REPO)
                    seconds = time.monotonic() - start
                    if result.returncode != 0:
                        print(f"FAILED ({result.returncode}): {cmd}\n{result.stderr}",
                              file=sys.stderr)
                        return 1
                    case.times.setdefault(tool, []).append(seconds)
                    key = (tool, case.source, case.target)
                    if key not in checked:  # once per combination: the bytes must be right
                        checked.add(key)
                        got = sha256_prefix(target, IMAGE_SIZE)
                        if got != digest:
                            print(f"WRONG CONTENT after: {cmd}", file=sys.stderr)
                            return 1
                    print(f"rep {rep + 1}/{args.reps} {case.source}->{case.target} "
                          f"{tool:12} {seconds:6.2f} s", flush=True)
    finally:
        loop.close()
        file_target.unlink(missing_ok=True)
    load = (load_before, Path("/proc/loadavg").read_text().split()[:3])
    report = render(cases, tools, args.reps, dropped, raw, zst, bmap, load, args.cache)
    print(report)
    if not args.no_write:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(report)
        print(f"written to {results.relative_to(REPO)}")
    return 0


def paired(c: Case) -> float:
    """Median over the rounds of ours / bmaptool in the same round."""
    return statistics.median(o / b for o, b in zip(c.times["ours"], c.times["bmaptool"],
                                                   strict=True))


def render(cases: list[Case], tools: list[str], reps: int, dropped: bool, raw: Path,
           zst: Path, bmap: Path, load: tuple[list[str], list[str]], cache: str = "cold") -> str:
    sys.path.insert(0, str(REPO))
    from hil.flash.bmap import parse_bmap

    mapped = parse_bmap(bmap).mapped_bytes
    med = {(c.source, c.target, t): statistics.median(c.times[t]) for c in cases for t in tools}
    lines = [
        "# Flashing benchmark",
        "",
        f"Image: {IMAGE_SIZE // MiB} MiB sparse, {mapped / MiB:.0f} MiB of data (half random, "
        f"half compressible), `.zst` {zst.stat().st_size / MiB:.0f} MiB. Targets: a new regular "
        "file, and a loop block device on an emptied sparse backing file. Median of "
        f"{reps} runs, tool order rotating; wall time of the whole command including process "
        "start (our bytecode compiled beforehand, as installed). Page cache dropped before "
        f"every run: {'yes' if dropped else 'NO (not root?)'}"
        + ("; then the source read into it (hot cache: an image just built or downloaded)."
           if cache == "hot" else "."),
        f"Machine: {os.cpu_count()} CPUs, kernel {platform.release()}, Python "
        f"{platform.python_version()}; load average {' '.join(load[0])} before, "
        f"{' '.join(load[1])} after (other work shares this machine: expect noise).",
        "",
        "| source → target | ours (verify) | ours, no bmap (verify) | bmaptool copy | dd | "
        "ours / bmaptool | same, per round | dd / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        ours, nob, bt, dd = (med[(c.source, c.target, t)] for t in tools)
        spread = f" ({min(c.times['ours']):.2f}-{max(c.times['ours']):.2f})"
        lines.append(f"| {c.source} → {c.target} | {ours:.2f} s{spread} | {nob:.2f} s | "
                     f"{bt:.2f} s | {dd:.2f} s | {ours / bt:.2f}x | {paired(c):.2f}x | "
                     f"{dd / ours:.1f}x |")
    raw_rows = [c for c in cases if c.source == "raw"]
    ok_bt = all(med[("raw", c.target, "ours")] <= med[("raw", c.target, "bmaptool")]
                for c in raw_rows)
    ok_dd = all(med[("raw", c.target, "dd")] >= 5 * med[("raw", c.target, "ours")]
                for c in raw_rows)
    per_round = ", ".join(f"{c.target} {paired(c):.2f}x" for c in raw_rows)
    lines += ["", f"Targets on the raw sparse image (file and loop): ours <= 1.0x bmaptool: "
              f"{'met' if ok_bt else 'NOT met'} by the medians (per round: {per_round}); "
              f"dd >= 5x ours: {'met' if ok_dd else 'NOT met'}."
              " \"ours / bmaptool\" divides the medians; \"per round\" is the median of the "
              "ratios within each round (the two ran seconds apart, under the same load). dd has "
              "no .zst input: its .zst rows pipe `zstd -dc` into it."]
    hot = " --cache hot" if cache == "hot" else ""
    lines += ["", f"Produced by `sudo .venv/bin/python bench/flash.py --reps {reps}{hot}`. "
              "Commands (`IMG` = balena.img or balena.img.zst, `T` = target):", ""]
    for tool in tools:
        cmd = commands(tool, Path("IMG"), Path("balena.img.bmap"), "T").replace(
            shlex.quote(sys.executable), "python")
        lines.append(f"- {tool}: `{cmd}`")
    lines += ["", "ours verifies by reading back every written byte past the page cache "
              "and comparing SHA-256 (with the bmap: against its checksums, so one hash pass "
              "checks the image and the target): O_DIRECT on the loop device, and on the file "
              "after a raw copy; while decompressing to a file, each range after "
              "sync_file_range and POSIX_FADV_DONTNEED. bmaptool checks the bmap's checksums "
              "of the source but does not read the target back; dd checks nothing.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
