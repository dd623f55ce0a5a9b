"""Keeps secrets (provisioning and device API keys, private keys) out of logs and reports."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

SECRET_KEYS = ("apiKey", "deviceApiKey", "provisioningKey")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                          re.S)
# "apiKey": "value"  |  apiKey=value  (JSON, env files, shell output)
_NAMES = "|".join(SECRET_KEYS)
_KEY_VALUE = re.compile(r"""(["']?(?:""" + _NAMES + r""")["']?\s*[:=]\s*["']?)([^"'\s,}]+)""")
MASK = "***"

_known: set[str] = set()
_lock = threading.Lock()


def register(secret: str | None) -> None:
    """Remember a secret value so it is masked wherever it shows up."""
    if secret and len(secret) >= 6:
        with _lock:
            _known.add(secret)


def register_config(config: dict[str, Any]) -> None:
    for key in SECRET_KEYS:
        value = config.get(key)
        if isinstance(value, str):
            register(value)


def text(value: str) -> str:
    value = _PRIVATE_KEY.sub("-----PRIVATE KEY " + MASK + "-----", value)
    value = _KEY_VALUE.sub(lambda m: m.group(1) + MASK, value)
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        value = value.replace(secret, MASK)
    return value


def config(value: dict[str, Any]) -> str:
    """A config.json rendered for a log line, secrets masked."""
    return text(json.dumps({k: (MASK if k in SECRET_KEYS else v) for k, v in value.items()}))
