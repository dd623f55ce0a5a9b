"""A serial line that garbles: a bad cable, a ground loop, a UART run past its clock tolerance.

It sits between a board's console socket (QEMU's chardev, a pty bridge) and the one the
framework's console opens (``unix://PATH``), and copies bytes both ways. Of what the board sends,
each byte is dropped with probability ``drop`` and has one bit flipped with probability ``flip``,
from a seeded generator, so a run can be repeated (both may be changed at any time: a line
that turns bad mid-session). With ``both_ways`` what the framework types is garbled the same
way (a command that arrives garbled must not run as another one).
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Noise:
    """What the line did to the bytes it garbles so far."""

    passed: int = 0
    dropped: int = 0
    flipped: int = 0


class NoisyLine:
    def __init__(self, board: Path, path: Path, *, drop: float, flip: float, seed: int,
                 both_ways: bool = False) -> None:
        if not (0 <= drop < 1 and 0 <= flip < 1):
            raise ValueError(f"drop and flip are probabilities per byte: {drop}, {flip}")
        self.board, self.path = board, path
        self.drop, self.flip, self.both_ways = drop, flip, both_ways
        self.rng = random.Random(seed)
        self.noise = Noise()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="noisy-line", daemon=True)
        self._thread.start()

    def garble(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            r = self.rng.random()
            if r < self.drop:
                self.noise.dropped += 1
                continue
            if r < self.drop + self.flip:
                byte ^= 1 << self.rng.randrange(8)
                self.noise.flipped += 1
            out.append(byte)
        self.noise.passed += len(data)
        return bytes(out)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            host, _ = self._server.accept()
            with host, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as board:
                board.connect(str(self.board))
                while not self._stop.is_set():
                    ready, _, _ = select.select([board, host], [], [], 0.1)
                    if board in ready:
                        data = board.recv(65536)
                        if not data:
                            return
                        host.sendall(self.garble(data))
                    if host in ready:
                        data = host.recv(65536)
                        if not data:
                            return
                        board.sendall(self.garble(data) if self.both_ways else data)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=2)
