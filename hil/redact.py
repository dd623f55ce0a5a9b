"""Keeps secrets (balena API keys, tokens, passwords, private keys) out of logs and reports.

Two ways in: ``redact``/``secret_values`` work on a config object (key names tell what is
secret); ``register`` remembers secret values for the whole session, and ``text`` masks them,
plus any private key block or ``apiKey=...`` pair, wherever they show up (console slices,
error messages, report sections).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"
SECRET_KEYS = ("apiKey", "deviceApiKey", "provisioningKey")

# key names are compared lower-case with separators removed: apiKey, device_api_key, ...
_SECRET_SUFFIXES = ("apikey", "apikeys", "token", "password", "passwd", "psk", "secret",
                    "privatekey", "credentials")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"
                          r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----)?", re.S)
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


def register(secret: str | None) -> None:
    """Remember a secret value so ``text`` masks it wherever it shows up this session."""
    if secret and len(secret) >= 6:
        with _lock:
            _known.add(secret)


def register_config(config: dict[str, Any]) -> None:
    for secret in secret_values(config):
        register(secret)


def text(value: str) -> str:
    """``value`` with every registered secret, private key and ``apiKey=...`` masked."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    value = _KEY_VALUE.sub(lambda m: m.group(1) + REDACTED, value)
    return redact_text(value, known)


def config(value: dict[str, Any]) -> str:
    """A config.json rendered for a log line, secrets masked."""
    return json.dumps(redact(value), sort_keys=True)
