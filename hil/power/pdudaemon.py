"""Network PDUs (and anything else pdudaemon drives) through pdudaemon's HTTP API:
``GET /power/control/{on,off}?hostname=<pdu>&port=<outlet>`` (or ``alias=``).

pdudaemon answers once the PDU has switched (200) or failed (500); it serialises requests per
PDU. It cannot report an outlet's state, so ``is_on()`` is None. Every request has a timeout:
a PDU that hangs is an infrastructure error after ``timeout`` seconds, never a hung run.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request

from pydantic import Field, model_validator

from hil.deadline import Deadline
from hil.errors import InfraError
from hil.registry import PartContext, Settings

log = logging.getLogger(__name__)


class PduDaemonSettings(Settings):
    url: str = Field("http://127.0.0.1:16421", description="pdudaemon's HTTP listener")
    hostname: str | None = Field(None, description="the PDU's name in pdudaemon's config")
    port: int | str | None = Field(None, description="outlet on that PDU")
    alias: str | None = Field(None, description="a pdudaemon alias instead of hostname+port")
    timeout: float = Field(20.0, gt=0, description="seconds for one request (a slow PDU "
                           "switches in a few seconds; pdudaemon queues requests per PDU)")

    @model_validator(mode="after")
    def _target(self) -> PduDaemonSettings:
        if self.alias is None and (self.hostname is None or self.port is None):
            raise ValueError("give 'hostname' and 'port', or 'alias'")
        if self.alias is not None and (self.hostname is not None or self.port is not None):
            raise ValueError("give either 'alias' or 'hostname' and 'port', not both")
        return self


class PduDaemon:
    Settings = PduDaemonSettings

    def __init__(self, settings: PduDaemonSettings, ctx: PartContext) -> None:
        self.settings, self.ctx = settings, ctx

    def _target(self) -> str:
        s = self.settings
        return f"alias {s.alias}" if s.alias else f"{s.hostname} outlet {s.port}"

    def _request(self, action: str, timeout: float) -> None:
        s = self.settings
        query = ({"alias": s.alias} if s.alias else {"hostname": s.hostname, "port": s.port})
        url = f"{s.url.rstrip('/')}/power/control/{action}?{urllib.parse.urlencode(query)}"
        deadline = Deadline(timeout)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                body = reply.read(4096).decode(errors="replace").strip()
        except urllib.error.HTTPError as exc:
            body = exc.read(4096).decode(errors="replace").strip()
            raise self.ctx.error(f"pdudaemon refused {action} for {self._target()}: HTTP "
                                 f"{exc.code} {body!r} (see pdudaemon's log)") from None
        except TimeoutError as exc:
            raise self.ctx.error(f"pdudaemon at {s.url} did not answer {action} for "
                                 f"{self._target()} within {timeout:.1f}s ({exc})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError | socket.timeout) or deadline.expired():
                what = f"did not answer {action} within {timeout:.1f}s"
            else:
                what = f"is unreachable ({reason})"
            raise self.ctx.error(f"pdudaemon at {s.url} {what} for {self._target()}") from None
        log.debug("%s: pdudaemon %s %s: %s", self.ctx.rig, action, self._target(), body)

    def on(self) -> None:
        try:
            self._request("on", self.settings.timeout)
        except InfraError:
            with contextlib.suppress(InfraError):
                self._request("off", min(5.0, self.settings.timeout))  # leave it powered off
            raise

    def off(self) -> None:
        self._request("off", self.settings.timeout)

    def is_on(self) -> bool | None:
        return None  # pdudaemon is write-only

    def close(self) -> None:
        pass
