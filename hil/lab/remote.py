"""A served rig's SD mux and storage as a session reaches them: over SSH to the bench host
(``sd_mux: {driver: lab}``, ``storage: {driver: lab}`` in the rig file the lab agent
registers). Each operation runs ``hil lab mux|flash RIG --epoch N`` there (``hil.lab.benchops``)
with the lease's epoch, which the bench host checks against the lab database before it touches
the card. ``Rig.flash`` runs as for a local rig: mux to the host, the image streamed to the
bench host's writer (``BenchStorage.write``, its data only: ``hil.lab.imagestream``), mux to
the board. A refusal or a failure there is an ``InfraError`` naming this part and the rig."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from hil.deadline import Deadline
from hil.flash.writer import FlashReport
from hil.registry import PartContext, Settings

log = logging.getLogger(__name__)
KEY_ENV = "HIL_LAB_SSH_KEY"


class BenchSettings(Settings):
    host: str = Field(description="the bench host, as the session reaches it")
    port: int = Field(22, gt=0, lt=65536, description="its SSH server's port")
    user: str = Field(description="the lab's login on the bench host")
    key: Path | None = Field(None, description="private key file; default: $HIL_LAB_SSH_KEY, "
                             "else ssh-agent and ~/.ssh")
    host_key: str | None = Field(None, description="the bench host's public key ('ssh-ed25519 "
                                 "AAAA...'), checked; default: ~/.ssh/known_hosts")
    command: str = Field(description="`hil lab` on the bench host (a shell command line)")
    rig: str = Field(description="the rig's name on the bench host")
    epoch: int | Literal["${lease_epoch}"] = Field(
        description="the lease's epoch: ${lease_epoch}, which the lab fills in")
    timeout: float = Field(30.0, gt=0, description="seconds to connect, and for one switch")


class BenchLink:
    """One SSH connection to the bench host, opened at the first operation."""

    def __init__(self, settings: BenchSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx
        self.client: Any = None  # paramiko.SSHClient

    @property
    def where(self) -> str:
        return f"{self.settings.user}@{self.settings.host}:{self.settings.port}"

    def _connect(self) -> Any:
        import paramiko

        s = self.settings
        client = paramiko.SSHClient()
        if s.host_key:
            kind, _, blob = s.host_key.partition(" ")
            name = s.host if s.port == 22 else f"[{s.host}]:{s.port}"
            try:
                key = paramiko.PKey.from_type_string(kind, base64.b64decode(
                    blob.split()[0].encode()))
            except (ValueError, IndexError, binascii.Error, paramiko.SSHException) as exc:
                raise self.ctx.error(f"host_key is not an SSH public key: {exc}") from None
            client.get_host_keys().add(name, kind, key)
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_file = s.key or (Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else None)
        try:
            client.connect(s.host, port=s.port, username=s.user,
                           key_filename=str(key_file) if key_file else None,
                           look_for_keys=key_file is None, allow_agent=key_file is None,
                           timeout=s.timeout, banner_timeout=s.timeout, auth_timeout=s.timeout)
        except (OSError, paramiko.SSHException) as exc:
            client.close()
            raise self.ctx.error(f"cannot reach the bench host over SSH as {self.where}: "
                                 f"{exc or type(exc).__name__}") from None
        return client

    def run(self, words: list[str], *, timeout: float | None = None,
            feed: Any = None) -> str:
        """stdout of ``hil lab WORDS[0] RIG --epoch N WORDS[1:]`` on the bench host, ``feed``
        (called with a writer) giving its stdin; InfraError when it refuses or fails."""
        import paramiko

        s = self.settings
        if not isinstance(s.epoch, int):
            raise self.ctx.error("the rig file names no lease (epoch ${lease_epoch}): a served "
                                 "rig is reached through a lease, --rig=pool:...")
        what = f"hil lab {words[0]}"
        line = f"{s.command} {shlex.join([words[0], s.rig, '--epoch', str(s.epoch), *words[1:]])}"
        deadline = Deadline(timeout or s.timeout)
        if self.client is None:
            self.client = self._connect()
        try:
            channel = self.client.get_transport().open_session(timeout=s.timeout)
            channel.settimeout(max(1.0, deadline.remaining()))
            channel.exec_command(line)
            broken: Exception | None = None
            if feed is not None:
                try:
                    feed(lambda data: _send(channel, data, deadline))
                except OSError as exc:  # the command stopped reading: its stderr says why
                    broken = exc
                with contextlib.suppress(OSError):
                    channel.shutdown_write()
            out: str = channel.makefile("rb").read().decode(errors="replace")
            err = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
            status = channel.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            raise self.ctx.error(f"{what} on {self.where} did not complete within "
                                 f"{deadline.timeout:.0f}s: {exc or type(exc).__name__}"
                                 ) from None
        if status != 0 or broken is not None:
            # the command's reason is its last line; the lines before are its log
            log.debug("%s on %s: stderr:\n%s", what, self.where, err)
            reason = err.splitlines()[-1] if err else broken or "(no message)"
            raise self.ctx.error(f"the bench host {s.host} refused or failed `{what}` "
                                 f"(exit status {status}): {reason}")
        return out

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()


def _send(channel: Any, data: bytes, deadline: Deadline) -> None:
    if deadline.expired():
        raise TimeoutError(f"the image was still being sent after {deadline.timeout:.0f}s")
    channel.sendall(data)


class BenchMux:
    """The rig's SD mux, switched by the bench host (its own driver there)."""

    Settings = BenchSettings

    def __init__(self, settings: BenchSettings, ctx: PartContext) -> None:
        self.link = BenchLink(settings, ctx)

    def to_host(self) -> None:
        self.link.run(["mux", "host"])

    def to_dut(self) -> None:
        self.link.run(["mux", "dut"])

    def off(self) -> None:
        self.link.run(["mux", "off"])

    def state(self) -> str | None:
        position = self.link.run(["mux", "status"]).strip()
        return None if position == "unknown" else position

    def close(self) -> None:
        self.link.close()


class BenchStorage:
    """The rig's card as the bench host writes it: ``Rig.flash`` hands it the image."""

    Settings = BenchSettings
    fixed = False

    def __init__(self, settings: BenchSettings, ctx: PartContext) -> None:
        self.ctx = ctx
        self.link = BenchLink(settings, ctx)
        self.where = f"{settings.rig} on {settings.host}"

    def target(self, timeout: float) -> Path:
        raise self.ctx.error(f"the card is on the bench host ({self.where}): it is written "
                             "there (write), not from here")

    def write(self, image: Path, bmap: Path | None, timeout: float) -> FlashReport:
        """Stream the image (and its bmap) to the bench host's writer; its report, with the
        time on the wire included in ``seconds``."""
        from hil.lab.imagestream import send

        t0 = time.monotonic()
        out = self.link.run(["flash"], timeout=timeout,
                            feed=lambda write: send(image, bmap, write))
        try:
            fields = json.loads(out.strip().splitlines()[-1])
            remote = FlashReport(**fields)
        except (ValueError, TypeError, IndexError) as exc:
            raise self.ctx.error(f"the bench host's flash report is unreadable ({exc}): "
                                 f"{out[-300:]!r}") from None
        report = remote._replace(image=str(image),
                                 target=f"{self.link.settings.host}:{remote.target}",
                                 seconds=max(remote.seconds, time.monotonic() - t0))
        log.info("%s", report.summary())
        return report

    def close(self) -> None:
        self.link.close()
