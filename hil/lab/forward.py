"""A TCP port forward: how a bench host makes a board's SSH port reachable from the lab while a
lease is live. ``close()`` takes the listening port away and cuts every connection through it,
so a session whose lease ended loses its SSH connection as it loses its console."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from hil.errors import InfraError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0  # seconds to reach the board's port behind the forward


class Forward:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, rig: str,
                 part: str = "network") -> None:
        self.listen, self.target, self.rig, self.part = listen, target, rig, part
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> Forward:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(self.listen)
        except OSError as exc:
            server.close()
            raise InfraError(f"cannot forward {self.listen[0]}:{self.listen[1]} to "
                             f"{self.target[0]}:{self.target[1]}: {exc}", part=self.part,
                             rig=self.rig) from None
        server.listen(8)
        self._server = server
        self._spawn(self._accept, "accept")
        return self

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=f"forward-{self.rig}-{name}",
                             daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept(self) -> None:
        server = self._server
        assert server is not None
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # closed by close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
                upstream.settimeout(None)
            except OSError as exc:
                log.warning("%s: forward to %s:%d failed: %s", self.rig, *self.target, exc)
                client.close()
                continue
            with self._lock:
                if self._server is None:  # closed meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            self._spawn(self._pump, "up", client, upstream)
            self._spawn(self._pump, "down", upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side ended: the other is cut too
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._conns -= {src, dst}
        src.close()  # the other pump closes dst when its recv returns

    @property
    def connections(self) -> int:
        """Connections open through the forward (each is two sockets)."""
        with self._lock:
            return len(self._conns) // 2

    def close(self) -> None:
        """Stop listening and cut every connection through the forward."""
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, set()
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=2)
        for s in conns:
            s.close()
        self._threads.clear()
