"""The bench host's side of a served rig's SD mux and flashing: ``hil lab mux`` and ``hil lab
flash``, the commands a session runs over SSH (``hil.lab.remote``). Each asks the agent
(its control socket) to check the lease's epoch against the lab database and to drive the
rig's own parts, which the agent holds; the image arrives on stdin (``hil.lab.imagestream``)
and is written by ``hil.flash.writer`` to the card the agent found, verify included, asking
every few seconds whether the lease still holds (a lease that ends stops the write). A flash
prints its report as one JSON line; a refusal or a failure is one line on stderr and exit
status 1."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hil.emu import ctl
from hil.errors import ConfigError, HilError, InfraError
from hil.flash.progress import FlashProgress

AGENT_ENV = "HIL_LAB_AGENT"  # the agent's control socket, as the command it registers sets it


def ask(socket: Path, words: list[str], timeout: float) -> str:
    """The agent's answer to ``words`` after "ok"; InfraError with its refusal."""
    try:
        reply = ctl.request(socket, words, timeout=timeout)
    except OSError as exc:
        raise InfraError(f"the lab agent does not answer on {socket}: {exc}",
                         part="lab agent") from None
    if reply != "ok" and not reply.startswith("ok "):
        raise InfraError(reply.removeprefix("error: ") or "the lab agent closed the request",
                         part="lab agent")
    return reply[3:]


# how often a flash under way asks whether its lease still holds: a lease that ends (expired,
# kicked) stops the write within this and one chunk, as it cuts the session's console and power
LEASE_CHECK_INTERVAL = 2.0


def mux(socket: Path, rig: str, epoch: int, position: str, timeout: float) -> str:
    """Switch the mux, or its position for "status"; what ``hil lab mux`` prints."""
    return ask(socket, ["mux", rig, str(epoch), position], timeout) or "ok"


def _lease_guard(socket: Path, rig: str, epoch: int, timeout: float
                 ) -> Callable[[FlashProgress], None]:
    """A flash progress callback that raises InfraError once the agent no longer confirms the
    lease."""
    last = time.monotonic()

    def check(progress: FlashProgress) -> None:
        nonlocal last
        # the write only: the read-back touches nothing, and "flashed" asks once more at the end
        if progress.phase != "write" or time.monotonic() - last < LEASE_CHECK_INTERVAL:
            return
        last = time.monotonic()
        try:
            ask(socket, ["lease", rig, str(epoch)], timeout)
        except InfraError:  # flash() asks once more, and says why
            raise InfraError("the lease check refused to go on", part="lab agent") from None
    return check


def flash(socket: Path, rig: str, epoch: int, timeout: float) -> dict[str, object]:
    """Write the image on stdin to the rig's card; its ``FlashReport`` as a dict."""
    from hil.flash.writer import flash as write_image
    from hil.lab.imagestream import StreamedImage

    kind, _, target = ask(socket, ["storage", rig, str(epoch)], timeout).partition(" ")
    with tempfile.TemporaryDirectory(prefix="hil-lab-flash-") as folder:
        src = StreamedImage(sys.stdin.buffer, rig, Path(folder))
        try:
            report = write_image(src, target, bmap=src.bmap, allow_fixed=kind == "fixed",
                                 display=False, progress=_lease_guard(socket, rig, epoch, timeout))
        except InfraError as exc:
            # stopped by the guard, or by the agent's cleaning switching the mux off under the
            # write: either way the lease's end is the cause to report
            try:
                ask(socket, ["lease", rig, str(epoch)], timeout)
            except InfraError as ended:
                raise InfraError(f"the flash was stopped: {ended.message}; {exc.message}",
                                 part="lab agent") from None
            raise
    ask(socket, ["flashed", rig, str(epoch), f"{report.mb_per_s:.1f}"], timeout)
    return report._asdict()


def run(socket: str | None, rig: str, epoch: int, position: str | None, timeout: float
        ) -> int:
    """``hil lab mux`` (``position``) or ``hil lab flash`` (None), as the CLI runs them."""
    if not socket:
        raise ConfigError(f"which agent serves {rig}? give --agent SOCKET or ${AGENT_ENV}",
                          key="--agent")
    try:
        if position is not None:
            print(mux(Path(socket), rig, epoch, position, timeout))
        else:
            print(json.dumps(flash(Path(socket), rig, epoch, timeout)))
    except HilError as exc:
        message = exc.message if isinstance(exc, InfraError) else str(exc)
        print(message.replace("\n", " "), file=sys.stderr)
        return 1
    return 0
