"""Keeps secrets (balena API keys, tokens, passwords, private keys) out of logs and reports.

Two ways in: ``redact``/``secret_values`` work on a config object (key names tell what is
secret); ``register`` remembers secret values for the whole session, and ``text`` masks them,
plus any private key block or ``apiKey=...`` pair, wherever they show up (console slices,
error messages, report sections).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "<redacted>"
SECRET_KEYS = ("apiKey", "deviceApiKey", "provisioningKey")

# key names are compared lower-case with separators removed: apiKey, device_api_key, ...
_SECRET_SUFFIXES = ("apikey", "apikeys", "token", "password", "passwd", "psk", "secret",
                    "privatekey", "credentials")
# a block cut short (no END: a truncated slice) is masked to the end of the text
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"
                          r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*)", re.S)
_KEY_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
_NAMES = "|".join(SECRET_KEYS)
# "apiKey": "value"  |  apiKey=value  (JSON, env files, shell output)
_KEY_VALUE = re.compile(r"""(["']?(?:""" + _NAMES + r""")["']?\s*[:=]\s*["']?)([^"'\s,}]+)""")

_known: set[str] = set()
_lock = threading.Lock()


def is_secret_key(name: str) -> bool:
    norm = re.sub(r"[^a-z0-9]", "", name.lower())
    return norm.endswith(_SECRET_SUFFIXES) or "private" in norm


def _is_secret_value(value: object) -> bool:
    return isinstance(value, str) and bool(_PRIVATE_KEY.search(value))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (JSON-like) with every secret value replaced by ``<redacted>``."""
    if isinstance(obj, dict):
        return {k: REDACTED if (is_secret_key(str(k)) and v not in (None, "")) or
                _is_secret_value(v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [REDACTED if _is_secret_value(v) else redact(v) for v in obj]
    return REDACTED if _is_secret_value(obj) else obj


def secret_values(obj: Any) -> list[str]:
    """The secret strings inside ``obj``, longest first (so substrings are replaced last)."""
    found: list[str] = []

    def walk(o: Any, secret: bool) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, secret or is_secret_key(str(k)))
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v, secret)
        elif isinstance(o, str | int) and (secret or _is_secret_value(o)):
            value = str(o)
            if len(value) >= 4:  # never scrub tiny values such as "1" out of every message
                found.append(value)

    walk(obj, False)
    return sorted(set(found), key=len, reverse=True)


def redact_text(value: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        value = value.replace(secret, REDACTED)
    return _PRIVATE_KEY.sub(REDACTED, value)


_KEY_BODY_LINE = re.compile(r"^[A-Za-z0-9+/=]{16,}$", re.M)


MIN_SECRET = 6  # a shorter value would mask ordinary words ("root") out of every log line


def register(secret: str | None) -> None:
    """Remember a secret value so ``text`` masks it wherever it shows up this session. A
    private key's body lines are remembered one by one too: a console that interleaves other
    output may show a line of it alone, without the BEGIN line that marks it."""
    if secret and len(secret) >= MIN_SECRET:
        lines = _KEY_BODY_LINE.findall(secret) if _PRIVATE_KEY.search(secret) else []
        with _lock:
            _known.add(secret)
            _known.update(lines)


def register_config(config: dict[str, Any]) -> None:
    for secret in secret_values(config):
        register(secret)


def text(value: str) -> str:
    """``value`` with every registered secret, private key and ``apiKey=...`` masked."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    value = _KEY_VALUE.sub(lambda m: m.group(1) + REDACTED, value)
    return redact_text(value, known)


def mask_log_records() -> Callable[[], None]:
    """Mask every log record as it is made, wherever it then goes (live logs, ``--log-file``,
    captured logs), until the returned function is called."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        masked = text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return record

    logging.setLogRecordFactory(factory)
    return lambda: logging.setLogRecordFactory(previous)


def config(value: dict[str, Any]) -> str:
    """A config.json rendered for a log line, secrets masked."""
    return json.dumps(redact(value), sort_keys=True)


class Stream:
    """Masks secrets in a byte stream (the console's capture file) as it is written, a line
    at a time: a secret split across two reads is still whole when its line is masked, and a
    private key's block is masked from its BEGIN line to its END line. Everything else is
    kept byte for byte (control sequences included)."""

    HOLD = 64 * 1024  # a line longer than this is written (masked) without waiting for its end

    def __init__(self) -> None:
        self._partial = b""
        self._in_key = False  # inside a private key block printed over several lines

    def feed(self, data: bytes) -> bytes:
        """What of the stream so far can be written: its complete lines, masked."""
        self._partial += data
        # a line ends at a newline, or at a carriage return (progress bars redraw one line)
        cut = max(self._partial.rfind(b"\n"), self._partial.rfind(b"\r")) + 1
        if not cut and len(self._partial) < self.HOLD:
            return b""
        done, self._partial = self._partial[:cut or None], self._partial[cut:] if cut else b""
        return self._mask(done)

    def flush(self) -> bytes:
        """The rest (an unfinished line, such as a prompt), masked: at the stream's end."""
        done, self._partial = self._partial, b""
        return self._mask(done)

    def _mask(self, data: bytes) -> bytes:
        out = []
        for raw in data.splitlines(keepends=True):
            line = raw.decode("utf-8", errors="surrogateescape")
            body = line.rstrip("\r\n")
            if self._in_key:
                end = _KEY_END.search(body)
                if end is None:
                    continue  # a line of the key's body
                self._in_key = False
                body = REDACTED + body[end.end():]
            masked = text(body)
            start = _PRIVATE_KEY.search(body)
            if start and not _KEY_END.search(body, start.start()):
                self._in_key = True  # the block goes on over the next lines
            out.append((masked + line[len(line.rstrip("\r\n")):]).encode(
                "utf-8", errors="surrogateescape"))
        return b"".join(out)
