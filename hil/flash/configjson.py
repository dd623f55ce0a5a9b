"""Read a user's ``config.json`` (``--config-json``, ``hil image configure --config``).

The one reader for it: whatever the file holds, the result is a JSON object whose known keys
have the types balenaOS reads them as, or a ``ConfigError`` naming the file (and the line, or
the key). Values are never quoted in errors: ``apiKey`` and its kind are secrets.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hil.errors import ConfigError

MAX_SIZE = 1 << 20  # balenaOS's config.json is a few KiB, and it must fit the boot partition
MAX_DEPTH = 32  # its deepest key is 4 levels down; what reads it (redaction, logs) recurses

# JSON type names of the keys balenaOS (its supervisor and os-config) reads
_TOP: dict[str, str] = {
    "uuid": "string", "deviceType": "string", "apiKey": "string", "deviceApiKey": "string",
    "apiEndpoint": "string", "deltaEndpoint": "string", "registryEndpoint": "string",
    "vpnEndpoint": "string", "hostname": "string", "ntpServers": "string",
    "dnsServers": "string", "country": "string", "balenaRootCA": "string",
    "mixpanelToken": "string", "username": "string", "developmentMode": "boolean",
    "persistentLogging": "boolean", "applicationId": "integer", "deviceId": "integer",
    "userId": "integer", "listenPort": "integer", "vpnPort": "integer",
    "registered_at": "integer", "appUpdatePollInterval": "integer", "os": "object",
    "installer": "object",
}
_OS: dict[str, str] = {"sshKeys": "array", "network": "object", "udevRules": "object",
                       "installer": "object"}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:  # json keeps the last one: the first would be lost without a word
            raise ValueError(f"key {key!r} given twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: object) -> int:
    deepest, todo = 0, [(value, 1)]
    while todo:  # not recursive: that is what this guards against
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict | list):
            todo += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _check(cfg: dict[str, Any], known: dict[str, str], prefix: str, file: str) -> None:
    for key, want in known.items():
        if key in cfg and _type_name(cfg[key]) != want:
            raise ConfigError(f"expected {'an' if want[0] in 'aeio' else 'a'} {want}, got "
                              f"{_type_name(cfg[key])}", file=file, key=prefix + key)


def load_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, its known keys type-checked."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_SIZE:
                raise ConfigError(f"{size} bytes is too big for a config.json (at most "
                                  f"{MAX_SIZE}; balenaOS's is a few KiB)", file=file)
            raw = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config.json: {exc.strerror}", file=file) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config.json is not UTF-8 text (byte {exc.start})", file=file
                          ) from None
    try:
        cfg = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc.msg} (column {exc.colno})",
                          file=file, line=exc.lineno) from None
    except ValueError as exc:  # a duplicate key, NaN, an integer too long to convert
        raise ConfigError(f"config.json is not valid JSON: {exc}", file=file) from None
    except RecursionError:
        raise ConfigError("config.json is not valid JSON: nested too deeply", file=file
                          ) from None
    if _depth(cfg) > MAX_DEPTH:
        raise ConfigError(f"config.json is nested more than {MAX_DEPTH} levels deep", file=file)
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json must be a JSON object, got {_type_name(cfg)}",
                          file=file, line=1)
    _check(cfg, _TOP, "", file)
    os_cfg = cfg.get("os", {})
    _check(os_cfg, _OS, "os.", file)
    keys = os_cfg.get("sshKeys", [])
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise ConfigError(f"expected a string, got {_type_name(key)}", file=file,
                              key=f"os.sshKeys[{i}]")
    return cfg

