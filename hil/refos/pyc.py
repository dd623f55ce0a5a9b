"""Bytecode for what the image's Python programs import, compiled when the image is built.

The root filesystem is read-only and its programs run with ``-B``, so without it Python
compiles each module it imports at every start: under QEMU's emulation the supervisor
stand-in's imports (http.server, email, json...) took 3-10 s of a board's one CPU at each
boot. The ``.pyc`` files are checked-hash ones: deterministic (no mtimes in them), and a
source replaced on the device (a bind mount over it) is compiled again from the new source,
never run from stale bytecode.
"""

from __future__ import annotations

import importlib.util
import logging
import py_compile
import subprocess
import sys
from pathlib import Path

from hil.errors import HilError

log = logging.getLogger(__name__)

# the image's Python (Debian 12's python3.11): its bytecode is what the builder's own Python
# writes only when both are 3.11
CACHE_TAG = "cpython-311"
STDLIB = "usr/lib/python3.11"

# Run in a child Python (isolated, no site) whose path is the image's standard library and the
# program's folder: it imports the program as a module (its main() does not run) and prints
# every source file then loaded, relative to the standard library it came from (the child's
# own start-up modules come from the builder's).
_LIST_IMPORTS = r"""
import importlib, sys, sysconfig
image_stdlib, folder, module = sys.argv[1:4]
own = sysconfig.get_paths()["stdlib"]
sys.path[:] = [folder, image_stdlib, sysconfig.get_paths()["platstdlib"] + "/lib-dynload"]
importlib.import_module(module)
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    for base in (folder, image_stdlib, own):
        if f.endswith(".py") and f.startswith(base + "/"):
            print(("program " if base == folder else "stdlib ") + f[len(base) + 1:])
            break
"""


def compile_imports(root: Path, program: str) -> None:
    """Compile ``program`` (a path in ``root``, a module with a ``__main__`` guard) and the
    standard-library modules it imports. Skipped, with a warning, where the builder's Python
    is not the image's version."""
    if sys.implementation.cache_tag != CACHE_TAG:
        log.warning("not compiling %s's imports: this Python is %s, the image's %s (the OS "
                    "still runs; its Python programs start slower)", program,
                    sys.implementation.cache_tag, CACHE_TAG)
        return
    src = root / program
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _LIST_IMPORTS,
                           str(root / STDLIB), str(src.parent), src.stem],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HilError(f"building the image: listing what {program} imports failed: "
                       f"{proc.stderr[-2000:]}")
    files: set[Path] = set()
    for line in proc.stdout.splitlines():
        kind, rel = line.split(" ", 1)
        path = (src.parent if kind == "program" else root / STDLIB) / rel
        if path.is_file():
            files.add(path)
    for path in sorted(files):
        guest = "/" + str(path.relative_to(root))  # what a traceback on the device names
        py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)),
                           dfile=guest, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    log.info("compiled %s and the %d modules it imports", program, len(files) - 1)
