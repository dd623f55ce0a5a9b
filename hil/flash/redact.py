"""Keep secrets (balena API keys, tokens, passwords, private keys) out of logs and messages.

``redact`` copies a config with secret values replaced; ``secret_values`` lists them so free text
(subprocess output, exception messages) can be scrubbed with ``redact_text``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"

# key names are compared lower-case with separators removed: apiKey, device_api_key, ...
_SECRET_SUFFIXES = ("apikey", "apikeys", "token", "password", "passwd", "psk", "secret",
                    "privatekey", "credentials")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


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
            text = str(o)
            if len(text) >= 4:  # never scrub tiny values such as "1" out of every message
                found.append(text)

    walk(obj, False)
    return sorted(set(found), key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return _PRIVATE_KEY.sub(REDACTED, text)
